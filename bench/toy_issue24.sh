#!/usr/bin/env bash
# Issue 24's experiments, in the order they were run: the toy Table 4 in the paper's regime with oracle rows,
# the paper's other knobs, and one Mask2Img lever. Every part skips what is finished, so a rerun resumes.
#
#   bench/toy_issue24.sh RUN EXP [PART...]
#
# RUN: a finished `./reproduce.sh --preset toy --size demo --work RUN` (its world, base and generators);
# EXP: where everything goes. PART: curve pools align table4 knobs pool-size lever segall n400 subset knobs-seeds
# (default: all, in order).
#   curve      real only, N = 50, seed 0, 3200 steps, scored every 400 (bench/toy_curve.py): has it plateaued?
#   pools      ImgSyn, MaskSyn (RUN's generators) and the two oracles on the first 200 training labels, 1 each
#   align      that ImgSyn's alignment, with RUN's alignment segmenter and floor
#   table4     N = 50, $STEPS steps, seeds 0 1 2: real, + oracle-VAE, + oracle-real, + ImgSyn, + MaskSyn, + both
#   knobs      N = 50, seed 0: p_aug 0.2 / 0.4 / 0.8 (Fig. 7), pretrain -> finetune vs real -> real (Table 6)
#   pool-size  N = 50, seeds 0 1 2: + oracle-VAE and + both from RUN's own 48-label pools (Fig. 8: how many labels)
#   lever      Mask2Img trained on to $LEVER_STEPS steps (resumed from RUN's), its ImgSyn, alignment, Table 4 rows
#   segall     the alignment segmenter's curve: all 400 real images, 3000 steps, scored every 1000 (does it see things?)
#   n400       N = 400 (all of the demo world), seeds 0 1 2: real, + oracle-VAE, + both
#   subset     Table 4's other generators: Text2Mask and Mask2Img trained on one fixed 50-sample subset (--real-subset,
#              RUN's steps), its ImgSyn and MaskSyn (4 per subset label), and N = 50 on that subset, seeds 0 1 2:
#              real, + ImgSyn / + both from these generators and from RUN's all-data ones (and + MaskSyn from those),
#              + oracle-VAE, + oracle-real
#   knobs-seeds  the knobs above under seeds 1 and 2 (the first session ran seed 0 only)
#   guidance   ImgSyn drawn again at classifier-free guidance $GUIDANCES (the demo's is 5), its alignment, and
#              Table 4 on PART subset's fixed subset (+ ImgSyn per guidance)
#   vae-probe  VAEs alone on the base's 2000-image world (bench/toy_vae_probe.py $VAES), each behind the oracle in
#              Table 4's N = 50 rows (random subsets, seeds 0 1 2)
#   sharper    a base rebuilt with $BASE_ARGS (default: the probe's best, 16 latent channels, width 16, 3000 VAE
#              steps) in EXP/base-$NAME, the demo's chain on it (reproduce.sh --base), its 200-label pools and
#              alignment, and Table 4 on PART subset's fixed subset: + oracle-VAE, + ImgSyn, + MaskSyn, + both
# lever runs one process; it was run beside the others (a second bench/toy_issue24.sh RUN EXP lever). As run for
# docs/toy-results.md: every part with the defaults, except lever with LEVER_STEPS=2000 (the 3000-step run was
# stopped at its step-2000 checkpoint for time and resumed to 2000).
# Second session (docs/toy-results.md, "Issue 24, continued"): subset, guidance, knobs-seeds and vae-probe with the
# defaults; sharper twice, with the defaults and with NAME=lat4-w16-s3000 BASE_ARGS="--vae-latent-channels 4
# --vae-width 16 --vae-steps 3000" (the base shipped since ab1762b); its real and oracle-real rows were linked from
# PART subset's runs rather than run again (they do not depend on the base). Every part before sharper ran with
# the base shipped before ab1762b: to repeat them as run, pass BASE=DIR with that base
# (git worktree add OLD a21da22; BASE=OLD/common/assets/toybase) and a RUN made from it (--base the same).
# Tables: python bench/toy_table4.py EXP/table4 (and EXP/knobs, EXP/pool-size, EXP/lever, EXP/n400).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2; }
RUN=$1 EXP=$2; shift 2
[ -f "$RUN/world/captions_train.jsonl" ] || { echo "bench/toy_issue24.sh: RUN $RUN has no world/captions_train.jsonl; make it with ./reproduce.sh --preset toy --size demo --work $RUN" >&2; exit 2; }
PARTS=${*:-curve pools align table4 knobs pool-size lever segall n400 subset knobs-seeds guidance vae-probe sharper}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$(pwd) HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE SEGGEN_THREADS=1 PYTHON=$PY
STEPS=${STEPS:-800} LEVER_STEPS=${LEVER_STEPS:-3000}
GUIDANCES=${GUIDANCES:-1 2 8} VAES=${VAES:-lat16-w8-s1500 f4-lat4-w8-s1500 lat16-w16-s3000} NAME=${NAME:-lat16-w16-s3000}
BASE_ARGS=${BASE_ARGS:---vae-latent-channels 16 --vae-width 16 --vae-steps 3000}
W=$RUN/world CAP=$RUN/world/captions_train.jsonl BASE=${BASE:-common/assets/toybase}  # BASE=DIR: RUN was made with --base DIR
SEG=(--backbone hrnet-small --batch-size 8 --num-workers 0 --log-every 100)
SAMPLE=(--resolution 64 --batch-size 16 --preview 0)
# the demo's generator training flags (reproduce.sh's toy GEN_TRAIN_ARGS)
GEN=(--data toy --data-root "$W" --captions "$CAP" --pretrained "$BASE" --resolution 64 --lr 1e-3 --global-batch-size 16
     --batch-size 16 --num-workers 0 --caption-dropout 0.1 --ema --cache-latents --center-crop --checkpointing-steps 500
     --validation-steps 0 --report-to none)
imgsyn() {  # imgsyn MASK2IMG OUT [FLAG...]: one ImgSyn image for each of the first 200 training labels
  local m2i=$1 out=$2; shift 2
  "$PY" imgsyn.py --data toy --data-root "$W" --split train --captions "$CAP" --mask2img "$m2i" --out "$out" --limit 200 \
    --per-sample 1 --steps 15 "${SAMPLE[@]}" "$@"
}
align() {  # align IMGSYN OUT: its alignment with RUN's alignment segmenter and floor
  "$PY" bench/toy.py align --segmenter "$RUN/runs/seg-toy-all/model" --world "$W" --imgsyn "$1" --floor "$RUN/eval/floor" \
    --vae "$BASE" --out "$2"
}
world2000() { [ -f "$EXP/world2000/captions_val.jsonl" ] || "$PY" -m common.toy.world "$EXP/world2000" --train 2000 --val 200 --seed 0; }
mkdir -p "$EXP/synth"
[ -e "$EXP/world" ] || ln -s "$(realpath "$W")" "$EXP/world"
log() { echo "== $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg): $*"; }
for part in $PARTS; do
  log "$part"
  case $part in
    curve)
      [ -f "$EXP/curve/n50-real-s0/metrics.json" ] || "$PY" train_seg.py --data toy --data-root "$W" --strategy real --max-real-samples 50 \
        --seed 0 --max-steps 3200 --checkpoint-every 400 --keep-checkpoints 0 --output-dir "$EXP/curve/n50-real-s0" "${SEG[@]}"
      "$PY" bench/toy_curve.py "$EXP/curve/n50-real-s0" ;;
    pools)
      [ -f "$EXP/synth/oracle-vae-toy/manifest.jsonl" ] || "$PY" bench/toy.py oracle --world "$W" --limit 200 --vae "$BASE" --out "$EXP/synth"
      imgsyn "$RUN/runs/mask2img-toy" "$EXP/synth/imgsyn-toy" &
      "$PY" masksyn.py --data toy --captions "$CAP" --text2mask "$RUN/runs/text2mask-toy" --mask2img "$RUN/runs/mask2img-toy" \
        --out "$EXP/synth/masksyn-toy" --limit 200 --per-sample 1 --text2mask-steps 15 --mask2img-steps 15 "${SAMPLE[@]}"
      wait ;;
    align)
      align "$EXP/synth/imgsyn-toy" "$EXP/alignment.json" ;;
    table4)
      N=50 STEPS=$STEPS bench/toy_table4.sh "$EXP" "$EXP/table4" real oracle-vae oracle-real imgsyn masksyn both ;;
    knobs)
      N=50 SEEDS=0 STEPS=$STEPS bench/toy_table4.sh "$EXP" "$EXP/knobs" both-p20 both-p40 both-p80 oracle-vae-p20 oracle-vae-p80 \
        real-pretrain both-pretrain ;;
    pool-size)
      N=50 STEPS=$STEPS bench/toy_table4.sh "$RUN" "$EXP/pool-size" oracle-vae both ;;
    lever)
      M2I=$EXP/runs/mask2img-toy-$LEVER_STEPS
      if [ ! -f "$M2I/.done" ]; then
        mkdir -p "$M2I" && cp -rn "$RUN/runs/mask2img-toy/." "$M2I/"
        "$PY" train_mask2img.py "${GEN[@]}" --output-dir "$M2I" --max-steps "$LEVER_STEPS" --resume latest
        touch "$M2I/.done"
      fi
      L=$EXP/lever
      mkdir -p "$L/synth" && ln -sfn "$(realpath "$W")" "$L/world"
      imgsyn "$M2I" "$L/synth/imgsyn-toy"
      align "$L/synth/imgsyn-toy" "$L/alignment.json"
      N=50 STEPS=$STEPS bench/toy_table4.sh "$L" "$L/table4" imgsyn ;;
    segall)
      [ -f "$EXP/curve/all-real-s0/metrics.json" ] || "$PY" train_seg.py --data toy --data-root "$W" --strategy real --seed 0 \
        --max-steps 3000 --checkpoint-every 1000 --keep-checkpoints 0 --output-dir "$EXP/curve/all-real-s0" "${SEG[@]}"
      "$PY" bench/toy_curve.py "$EXP/curve/all-real-s0" ;;
    n400)
      N=400 STEPS=$STEPS bench/toy_table4.sh "$EXP" "$EXP/n400" real oracle-vae both ;;
    subset)
      S=$EXP/subset SUB=$EXP/subset/subsets/n50.txt
      mkdir -p "$S/synth" "$S/subsets" && ln -sfn "$(realpath "$W")" "$S/world"
      [ -f "$SUB" ] || "$PY" -m common.data.subset --data toy --data-root "$W" --n 50 --seed 0 --out "$SUB"
      resume() { compgen -G "$1/checkpoint-*" > /dev/null && echo "--resume latest" || true; }  # a cut run continues
      [ -f "$S/runs/text2mask-toy/.done" ] || { "$PY" train_text2mask.py "${GEN[@]}" --real-subset "$SUB" --output-dir "$S/runs/text2mask-toy" --max-steps 2500 \
        $(resume "$S/runs/text2mask-toy") && touch "$S/runs/text2mask-toy/.done"; } &
      [ -f "$S/runs/mask2img-toy/.done" ] || "$PY" train_mask2img.py "${GEN[@]}" --real-subset "$SUB" --output-dir "$S/runs/mask2img-toy" --max-steps 1500 \
        $(resume "$S/runs/mask2img-toy") && touch "$S/runs/mask2img-toy/.done"
      wait
      [ -f "$S/runs/text2mask-toy/.done" ] && [ -f "$S/runs/mask2img-toy/.done" ] || { echo "bench/toy_issue24.sh: subset's generators did not finish" >&2; exit 1; }
      "$PY" imgsyn.py --data toy --data-root "$W" --split train --captions "$CAP" --real-subset "$SUB" --mask2img "$S/runs/mask2img-toy" \
        --out "$S/synth/imgsyn-toy" --per-sample 4 --steps 15 "${SAMPLE[@]}" &
      "$PY" masksyn.py --data toy --captions "$CAP" --real-subset "$SUB" --text2mask "$S/runs/text2mask-toy" --mask2img "$S/runs/mask2img-toy" \
        --out "$S/synth/masksyn-toy" --per-sample 4 --text2mask-steps 15 --mask2img-steps 15 "${SAMPLE[@]}"
      wait
      N=50 STEPS=$STEPS SUBSETS=$S/subsets SUBSET_RUN=$S bench/toy_table4.sh "$EXP" "$S/table4" real oracle-vae oracle-real imgsyn masksyn \
        both imgsyn-subset both-subset ;;
    knobs-seeds)
      N=50 SEEDS="1 2" STEPS=$STEPS bench/toy_table4.sh "$EXP" "$EXP/knobs" both-p20 both-p40 both-p80 oracle-vae-p20 oracle-vae-p80 \
        real-pretrain both-pretrain ;;
    guidance)
      for g in $GUIDANCES; do
        G=$EXP/guidance/g$g && mkdir -p "$G/synth" && ln -sfn "$(realpath "$W")" "$G/world"
        imgsyn "$RUN/runs/mask2img-toy" "$G/synth/imgsyn-toy" --guidance "$g"
        align "$G/synth/imgsyn-toy" "$G/alignment.json"
        N=50 STEPS=$STEPS SUBSETS=$EXP/subset/subsets bench/toy_table4.sh "$G" "$G/table4" imgsyn
      done ;;
    vae-probe)
      world2000
      for v in $VAES; do
        [ -f "$EXP/vae/$v/probe.json" ] || "$PY" bench/toy_vae_probe.py "$EXP/world2000" "$EXP/vae" "$v"
        O=$EXP/vae/$v/run && mkdir -p "$O" && ln -sfn "$(realpath "$W")" "$O/world"
        [ -f "$O/synth/oracle-vae-toy/manifest.jsonl" ] || "$PY" bench/toy.py oracle --world "$W" --limit 200 --vae "$EXP/vae/$v/vae" --out "$O/synth"
        N=50 STEPS=$STEPS bench/toy_table4.sh "$O" "$O/table4" oracle-vae
      done ;;
    sharper)
      world2000
      B=$EXP/base-$NAME D=$EXP/demo-$NAME
      # shellcheck disable=SC2086
      [ -f "$B/toybase.json" ] || "$PY" -m common.toy.base "$B" --world "$EXP/world2000" $BASE_ARGS
      ./reproduce.sh --preset toy --size demo --base "$B" --work "$D"
      BASE=$B "$0" "$D" "$D/exp" pools align
      T=$D/exp/table4-fixed && mkdir -p "$T"
      N=50 STEPS=$STEPS SUBSETS=$EXP/subset/subsets bench/toy_table4.sh "$D/exp" "$T" real oracle-real oracle-vae imgsyn masksyn both ;;
    *) echo "bench/toy_issue24.sh: unknown part $part (curve pools align table4 knobs pool-size lever segall n400 subset knobs-seeds guidance vae-probe sharper)" >&2; exit 2 ;;
  esac
done
log "done"
