#!/usr/bin/env bash
# Issue 12, item 5: settle two open defaults with evidence from the toy world.
#   - caption dropout in both trainers: 0, 0.05 and 0.1 (the toy preset trains at 0.1);
#   - the sampler: the SDXL reference code's default (Euler on the legacy DDPM schedule, masksyn's and
#     imgsyn's default) vs the EDM paper's Heun on the Karras schedule, same step count;
#   - and, for the same models, the guidance scale (1, 2, 3 beside the reference default 5): measured, not
#     a default this script changes.
#
#   bench/toy_defaults.sh RUN [OUT]
#
# RUN is a finished `./reproduce.sh --preset toy --work RUN` (any --size): its world, base, segmenter (all
# real data) and floor images are reused, and its Text2Mask/Mask2Img are the caption-dropout-0.1 models.
# The other dropouts retrain both generators with RUN's own trainer settings (steps, lr, batch), two at a
# time, one torch thread each. Each model is scored as the report scores it: Text2Mask by off-palette share
# and class-histogram distance on RUN's validation captions, Mask2Img by ImgSyn alignment mIoU.
# Writes OUT/defaults.json and OUT/defaults.md (OUT defaults to RUN/defaults). Reruns skip finished parts.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2; }
RUN=$1 OUT=${2:-$1/defaults}
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$(pwd) HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE SEGGEN_THREADS=${SEGGEN_THREADS:-1}
for need in world runs/text2mask-toy/options.json runs/mask2img-toy/options.json runs/seg-toy-all/model eval/floor; do
  [ -e "$RUN/$need" ] || { echo "bench/toy_defaults.sh: $RUN/$need is missing: run ./reproduce.sh --preset toy --work $RUN first" >&2; exit 2; }
done
opt() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
W=$RUN/world CAP=$RUN/world/captions_train.jsonl
T2M_OPTS=$RUN/runs/text2mask-toy/options.json M2I_OPTS=$RUN/runs/mask2img-toy/options.json
BASE=$(opt "$T2M_OPTS" pretrained) SAMPLE_STEPS=$(opt "$RUN/eval/t2m-finetuned.json" steps)
N_EVAL=$(opt "$RUN/eval/t2m-finetuned.json" captions)
train_args() {  # train_args OPTIONS.JSON: the trainer settings RUN used
  echo --pretrained "$BASE" --resolution "$(opt "$1" resolution)" --max-steps "$(opt "$1" max_steps)" --lr "$(opt "$1" lr)" \
    --batch-size "$(opt "$1" batch_size)" --num-workers 0 --checkpointing-steps 100000 --validation-steps 0 --report-to none \
    $(flag "$1" ema) $(flag "$1" cache_latents) $(flag "$1" center_crop)
}
flag() { if [ "$(opt "$1" "$2")" = True ]; then echo "--${2//_/-}"; fi; }  # flag OPTIONS.JSON KEY: --key if RUN set it
mkdir -p "$OUT"
PIDS=()
bg() {  # bg DONE_FILE COMMAND...: run beside one other job unless DONE_FILE exists
  local done=$1; shift
  [ -e "$done" ] && return
  "$@" & PIDS+=($!)
  if [ "${#PIDS[@]}" -ge 2 ]; then wait "${PIDS[0]}"; PIDS=("${PIDS[@]:1}"); fi
}
join() { local p; for p in "${PIDS[@]}"; do wait "$p"; done; PIDS=(); }

# 1. caption dropout 0 and 0.05: retrain both generators (0.1 is RUN's own)
for d in 0 0.05; do
  # shellcheck disable=SC2046
  bg "$OUT/t2m-d$d/model_index.json" "$PY" train_text2mask.py --data toy --data-root "$W" --captions "$CAP" --output-dir "$OUT/t2m-d$d" \
    --caption-dropout "$d" $(train_args "$T2M_OPTS")
  # shellcheck disable=SC2046
  bg "$OUT/m2i-d$d/config.json" "$PY" train_mask2img.py --data toy --data-root "$W" --captions "$CAP" --output-dir "$OUT/m2i-d$d" \
    --caption-dropout "$d" $(train_args "$M2I_OPTS")
done
join
# 2. score every dropout with the default sampler, and RUN's models with Heun + Karras too
declare -A T2M=([0]=$OUT/t2m-d0 [0.05]=$OUT/t2m-d0.05 [0.1]=$RUN/runs/text2mask-toy)
declare -A M2I=([0]=$OUT/m2i-d0 [0.05]=$OUT/m2i-d0.05 [0.1]=$RUN/runs/mask2img-toy)
for d in 0 0.05 0.1; do
  for s in euler heun; do
    [ "$s" = heun ] && [ "$d" != 0.1 ] && continue
    bg "$OUT/t2m-d$d-$s.json" "$PY" bench/toy.py text2mask --model "${T2M[$d]}" --world "$W" --out "$OUT/t2m-d$d-$s.json" \
      --n "$N_EVAL" --steps "$SAMPLE_STEPS" --sampler "$s"
    if [ "$s" = euler ]; then SAMPLER=(--sampler euler --schedule legacy); else SAMPLER=(--sampler heun --schedule karras); fi
    bg "$OUT/imgsyn-d$d-$s/tally.json" "$PY" imgsyn.py --data toy --data-root "$W" --split train --captions "$CAP" \
      --mask2img "${M2I[$d]}" --out "$OUT/imgsyn-d$d-$s" --limit "$N_EVAL" --per-sample 2 --steps "$SAMPLE_STEPS" \
      --resolution 64 --batch-size 16 "${SAMPLER[@]}"
  done
done
for g in 1 2 3; do  # guidance, RUN's models, the default sampler
  bg "$OUT/t2m-g$g.json" "$PY" bench/toy.py text2mask --model "${T2M[0.1]}" --world "$W" --out "$OUT/t2m-g$g.json" \
    --n "$N_EVAL" --steps "$SAMPLE_STEPS" --guidance "$g"
  bg "$OUT/imgsyn-g$g/tally.json" "$PY" imgsyn.py --data toy --data-root "$W" --split train --captions "$CAP" \
    --mask2img "${M2I[0.1]}" --out "$OUT/imgsyn-g$g" --limit "$N_EVAL" --per-sample 2 --steps "$SAMPLE_STEPS" \
    --resolution 64 --batch-size 16 --guidance "$g"
done
join
for g in 1 2 3; do
  bg "$OUT/align-g$g.json" "$PY" bench/toy.py align --segmenter "$RUN/runs/seg-toy-all/model" --world "$W" \
    --imgsyn "$OUT/imgsyn-g$g" --floor "$RUN/eval/floor" --out "$OUT/align-g$g.json"
done
for d in 0 0.05 0.1; do
  for s in euler heun; do
    [ "$s" = heun ] && [ "$d" != 0.1 ] && continue
    bg "$OUT/align-d$d-$s.json" "$PY" bench/toy.py align --segmenter "$RUN/runs/seg-toy-all/model" --world "$W" \
      --imgsyn "$OUT/imgsyn-d$d-$s" --floor "$RUN/eval/floor" --out "$OUT/align-d$d-$s.json"
  done
done
join
# 3. one table
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for d in ("0", "0.05", "0.1"):
    for s in ("euler", "heun"):
        if not (out / f"t2m-d{d}-{s}.json").exists():
            continue
        t, a = json.loads((out / f"t2m-d{d}-{s}.json").read_text()), json.loads((out / f"align-d{d}-{s}.json").read_text())
        m = a["miou"] if "miou" in a else a
        rows.append({"caption_dropout": float(d), "sampler": s, "guidance": 5.0, "text2mask_off_palette": t["off_palette"],
                     "text2mask_histogram_tv": t["histogram_tv"], "alignment_miou": m})
for g in ("1", "2", "3"):
    if (out / f"t2m-g{g}.json").exists():
        t, m = json.loads((out / f"t2m-g{g}.json").read_text()), json.loads((out / f"align-g{g}.json").read_text())
        rows.append({"caption_dropout": 0.1, "sampler": "euler", "guidance": float(g), "text2mask_off_palette": t["off_palette"],
                     "text2mask_histogram_tv": t["histogram_tv"], "alignment_miou": m})
(out / "defaults.json").write_text(json.dumps(rows, indent=1) + "\n")
lines = ["| caption dropout | sampler | guidance | Text2Mask off-palette | Text2Mask histogram TV | alignment mIoU (ImgSyn / floor / ceiling, %) |",
         "| --- | --- | --- | --- | --- | --- |"]
for r in rows:
    m = r["alignment_miou"]
    lines.append(f"| {r['caption_dropout']:g} | {r['sampler']} | {r['guidance']:g} | {r['text2mask_off_palette']:.1%} | {r['text2mask_histogram_tv']:.3f} | "
                 f"{m['imgsyn']:.1f} / {m['floor']:.1f} / {m['ceiling']:.1f} |")
(out / "defaults.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
