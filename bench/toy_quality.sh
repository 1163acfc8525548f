#!/usr/bin/env bash
# Issue 13, item 4: does judging and cleaning the synthetic data help, on the toy world?
#   A. quality.py on copies of RUN's ImgSyn and MaskSyn folders with RUN's segmenter trained on all real
#      data: alignment (mean/median mIoU), and FreeMask's filter at tolerance 1.25 (share of pixels ignored);
#   B. Table-4-like rows at N real samples, --strategy aug --p-aug 0.6 --synthetic IMGSYN --synthetic MASKSYN,
#      seeds 0 1 2, three variants: plain, --synthetic-filtered, --synthetic-sampling hardness; and real only;
#   C. the alignment of RUN's Mask2Img against an untrained one (train_mask2img.py --max-steps 1 --lr 1e-8:
#      the ControlNet copied from the UNet, its zero convolutions still ~0), same imgsyn labels and sampler.
#
#   bench/toy_quality.sh RUN [OUT]
#
# RUN is a finished `./reproduce.sh --preset toy --work RUN` (any --size). Its synthetic folders are copied
# to OUT/synth first (quality.py --filter writes into the folder; RUN is never written). Settings come from
# RUN: the Table 4 runs' steps/N/segmenter flags, the segmenter's eval size, Mask2Img's trainer settings,
# ImgSyn's sampler settings. One job at a time, one torch thread (SEGGEN_THREADS, default 1).
# Writes OUT/quality.json and OUT/quality.md (OUT defaults to RUN/quality). Reruns skip finished parts.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2; }
RUN=$1 OUT=${2:-$1/quality}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$(pwd) HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE SEGGEN_THREADS=${SEGGEN_THREADS:-1}
T4=$RUN/runs/table4/n50-real-s0
for need in world synth/imgsyn-toy/manifest.jsonl synth/masksyn-toy/manifest.jsonl runs/seg-toy-all/model \
            runs/mask2img-toy/options.json runs/table4/n50-real-s0/options.json; do
  [ -e "$RUN/$need" ] || { echo "bench/toy_quality.sh: $RUN/$need is missing: run ./reproduce.sh --preset toy --work $RUN first" >&2; exit 2; }
done
opt() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
setting() { "$PY" -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['settings'][sys.argv[2]])" "$1" "$2"; }
W=$RUN/world CAP=$RUN/world/captions_train.jsonl SEG=$RUN/runs/seg-toy-all/model M2I_OPTS=$RUN/runs/mask2img-toy/options.json
SIZE=$(opt "$RUN/runs/seg-toy-all/options.json" eval_size)  # train_seg's eval size (64 on the toy world)
N=$(opt "$T4/options.json" max_real_samples) STEPS=$(opt "$T4/options.json" max_steps)
SEG_ARGS=(--backbone "$(opt "$T4/options.json" backbone)" --batch-size "$(opt "$T4/options.json" batch_size)" --num-workers 0
          --checkpoint-every 0 --log-every 20)
BASE=$(opt "$M2I_OPTS" pretrained)
[ -d "$BASE" ] || { echo "bench/toy_quality.sh: Mask2Img's base $BASE (from $M2I_OPTS) is not here: run from the clone that made RUN" >&2; exit 2; }
IS_MAN=$RUN/synth/imgsyn-toy/manifest.jsonl
IS_PER=$("$PY" -c "import json,sys; print(1 + max(json.loads(l)['k'] for l in open(sys.argv[1])))" "$IS_MAN")
IS_LIMIT=$("$PY" -c "import json,sys; print(len({json.loads(l)['source_id'] for l in open(sys.argv[1])}))" "$IS_MAN")
IS_ARGS=(--limit "$IS_LIMIT" --per-sample "$IS_PER" --steps "$(setting "$IS_MAN" steps)" --resolution "$(setting "$IS_MAN" resolution)"
         --guidance "$(setting "$IS_MAN" guidance)" --sampler "$(setting "$IS_MAN" sampler)" --schedule "$(setting "$IS_MAN" schedule)"
         --seed "$(setting "$IS_MAN" seed)" --batch-size 16 --preview 4)
job() { echo "== $*" >&2; nice -n 10 "$@"; }
mkdir -p "$OUT/synth" "$OUT/runs"
IS=$OUT/synth/imgsyn-toy MS=$OUT/synth/masksyn-toy UN=$OUT/synth/imgsyn-untrained
for f in imgsyn-toy masksyn-toy; do [ -e "$OUT/synth/$f/manifest.jsonl" ] || cp -r "$RUN/synth/$f" "$OUT/synth/"; done
# A. judge and filter both folders
for f in "$IS" "$MS"; do
  [ -e "$f/annotations_filtered/filter.json" ] || job "$PY" quality.py --data toy --data-root "$W" --synthetic "$f" --segmenter "$SEG" \
    --size "$SIZE" --filter --tolerance 1.25
done
# B. the rows
for seed in 0 1 2; do
  for v in real plain filtered hardness; do
    case $v in real) S=(--strategy real) ;; plain) S=(--strategy aug --p-aug 0.6 --synthetic "$IS" --synthetic "$MS") ;;
      filtered) S=(--strategy aug --p-aug 0.6 --synthetic "$IS" --synthetic "$MS" --synthetic-filtered) ;;
      hardness) S=(--strategy aug --p-aug 0.6 --synthetic "$IS" --synthetic "$MS" --synthetic-sampling hardness) ;; esac
    d=$OUT/runs/n$N-$v-s$seed
    [ -e "$d/metrics.json" ] || job "$PY" train_seg.py --data toy --data-root "$W" "${S[@]}" --max-real-samples "$N" --seed "$seed" \
      --max-steps "$STEPS" --output-dir "$d" "${SEG_ARGS[@]}"
  done
done
# C. an untrained Mask2Img: one step at lr 1e-8, RUN's other trainer settings; its ImgSyn folder, judged alike
[ -e "$OUT/runs/mask2img-untrained/config.json" ] || job "$PY" train_mask2img.py --data toy --data-root "$W" --captions "$CAP" \
  --output-dir "$OUT/runs/mask2img-untrained" --pretrained "$BASE" --resolution "$(opt "$M2I_OPTS" resolution)" --max-steps 1 --lr 1e-8 \
  --batch-size "$(opt "$M2I_OPTS" batch_size)" --num-workers 0 --caption-dropout "$(opt "$M2I_OPTS" caption_dropout)" \
  --checkpointing-steps 500 --validation-steps 0 --report-to none
[ -e "$UN/manifest.jsonl" ] && [ "$(wc -l < "$UN/manifest.jsonl")" -ge "$(wc -l < "$IS_MAN")" ] || job "$PY" imgsyn.py --data toy --data-root "$W" \
  --split train --captions "$CAP" --mask2img "$OUT/runs/mask2img-untrained" --out "$UN" "${IS_ARGS[@]}"
[ -e "$UN/quality_summary.json" ] || job "$PY" quality.py --data toy --data-root "$W" --synthetic "$UN" --segmenter "$SEG" --size "$SIZE"
"$PY" bench/toy_quality_report.py "$OUT" --n "$N"
