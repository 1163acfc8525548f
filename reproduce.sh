#!/usr/bin/env bash
# SegGen end to end, each stage one script (paper §3–§4, appendices A.3–A.4):
#   caption -> train Text2Mask -> train Mask2Img -> MaskSyn + ImgSyn -> Mask2Former (real | real+synthetic) -> metrics
#
#   ./reproduce.sh --preset paper --data ade20k --data-root PATH --gpus 8     the paper's settings
#   ./reproduce.sh --preset toy                                               the toy world, learned from scratch on 2 CPU cores (~45 min)
#   ./reproduce.sh --preset toy --size demo                                   the same at reduced size (make demo, ~10 min)
#   ./reproduce.sh --preset tiny                                              tiny random models, built-in samples (plumbing smoke test)
#   ./reproduce.sh ... --dry-run                                              print the exact commands, run nothing
#   ./reproduce.sh ... --max-steps N                                          every trainer stops after N steps (a smoke run)
#
# Reruns resume: a stage whose output is complete (its marker in WORK/.done/) is skipped; a stage cut
# short continues where it stopped (caption/masksyn/imgsyn skip the ids already written, the trainers
# pass --resume latest when they have a checkpoint).
set -euo pipefail
cd "$(dirname "$0")"
REPO=$(pwd)

PRESET=paper DATA=ade20k DATA_ROOT="" GPUS=1 WORK="" DRY=0 MAX_STEPS="" SIZE=full
usage() { sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; echo "options: --preset {paper,toy,tiny} --size {full,demo,smoke} (toy) --data {ade20k,coco} --data-root PATH --gpus N --work DIR --max-steps N --dry-run"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --data-root) DATA_ROOT=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --max-steps) MAX_STEPS=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "reproduce.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$PRESET" in paper|tiny) ;; toy) DATA=toy ;; *) echo "reproduce.sh: --preset must be paper, toy or tiny (got $PRESET)" >&2; exit 2 ;; esac
case "$SIZE" in full|demo|smoke) ;; *) echo "reproduce.sh: --size must be full, demo or smoke (got $SIZE)" >&2; exit 2 ;; esac
[ "$PRESET" = toy ] || [ "$SIZE" = full ] || { echo "reproduce.sh: --size is for --preset toy" >&2; exit 2; }
case "$DATA" in ade20k|coco|toy) ;; *) echo "reproduce.sh: --data must be ade20k or coco (got $DATA)" >&2; exit 2 ;; esac
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || { echo "reproduce.sh: --gpus must be a positive integer (got $GPUS)" >&2; exit 2; }
[[ -z "$MAX_STEPS" || "$MAX_STEPS" =~ ^[1-9][0-9]*$ ]] || { echo "reproduce.sh: --max-steps must be a positive integer (got $MAX_STEPS)" >&2; exit 2; }

PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error} DIFFUSERS_VERBOSITY=${DIFFUSERS_VERBOSITY:-error}
# Idle OpenMP threads sleep instead of spinning (a busy machine: bench/threads.py, common/threads.py).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# ---------------------------------------------------------------- settings of each preset
if [ "$PRESET" = paper ]; then
  WORK=${WORK:-.}
  DATA_ROOT=${DATA_ROOT:-${SEGGEN_DATASETS:-datasets}}
  SDXL=stabilityai/stable-diffusion-xl-base-1.0
  CAPTION_ARGS=(--model Salesforce/blip2-flan-t5-xxl --batch-size 16)     # §3.2, the paper's prompt is the default
  GEN_TRAIN_ARGS=(--pretrained "$SDXL" --resolution 768 --max-steps 30000 --lr 1e-5 --batch-size 4
                  --mixed-precision bf16 --gradient-checkpointing --use-8bit-adam)  # A.4
  if [ "$DATA" = ade20k ]; then IMGSYN_PER_SAMPLE=50; else IMGSYN_PER_SAMPLE=10; fi  # §4.1
  MASKSYN_ARGS=(--per-sample 10 --text2mask-steps 200 --mask2img-steps 40 --resolution 768)  # §4.1, A.4
  IMGSYN_ARGS=(--per-sample "$IMGSYN_PER_SAMPLE" --steps 40 --resolution 768)
  SEG_ARGS=(--backbone r50 --max-steps 160000 --batch-size 16 --crop 512 --mixed-precision bf16)  # A.3, Table 1
elif [ "$PRESET" = toy ]; then
  # The toy world (common/toyworld.py) and its base (common/toybase.py), every model learned here from
  # scratch. Step counts are sized by wall time on 2 shared CPU cores (docs/toy-results.md has the
  # measured stage times), not by the results.
  WORK=${WORK:-runs/toy}
  export HF_HUB_OFFLINE=1
  DATA_ROOT=$WORK/world
  BASE=$WORK/base
  #         world: train val | base build      | generators: steps | masksyn: captions per-sample | imgsyn: labels per-sample | sampler steps | eval images | segmenter: steps, Table 4 steps, N, seeds
  case "$SIZE" in
    full)  WORLD=(--train 2000 --val 200); BASE_ARGS=(); GEN_STEPS=1500; MS=(--limit 200 --per-sample 2); IS=(--limit 200 --per-sample 2)
           SAMPLE_STEPS=20; EVAL_N=100; SEG_STEPS=400; TABLE_STEPS=150; TABLE_N=(50 500); SEEDS=(0 1 2) ;;
    demo)  WORLD=(--train 400 --val 100); BASE_ARGS=(--vae-steps 400 --unet-steps 600); GEN_STEPS=300; MS=(--limit 48 --per-sample 2); IS=(--limit 48 --per-sample 2)
           SAMPLE_STEPS=15; EVAL_N=48; SEG_STEPS=150; TABLE_STEPS=50; TABLE_N=(50); SEEDS=(0) ;;
    smoke) WORLD=(--train 24 --val 8); BASE_ARGS=(--quick); GEN_STEPS=2; MS=(--limit 2 --per-sample 1 --max-off-palette 1.0); IS=(--limit 2 --per-sample 1)
           SAMPLE_STEPS=2; EVAL_N=4; SEG_STEPS=2; TABLE_STEPS=2; TABLE_N=(8); SEEDS=(0) ;;
  esac
  if [ -n "$MAX_STEPS" ]; then GEN_STEPS=$MAX_STEPS; SEG_STEPS=$MAX_STEPS; TABLE_STEPS=$MAX_STEPS; fi
  CAPTION_ARGS=()
  GEN_TRAIN_ARGS=(--pretrained "$BASE" --resolution 64 --max-steps "$GEN_STEPS" --lr 1e-4 --batch-size 16 --num-workers 0
                  --caption-dropout 0.1 --checkpointing-steps 500 --validation-steps 0 --report-to none)
  MASKSYN_ARGS=("${MS[@]}" --text2mask-steps "$SAMPLE_STEPS" --mask2img-steps "$SAMPLE_STEPS" --resolution 64 --batch-size 16 --preview 4)
  IMGSYN_ARGS=("${IS[@]}" --steps "$SAMPLE_STEPS" --resolution 64 --batch-size 16 --preview 4)
  SEG_ARGS=(--backbone hrnet-small --batch-size 8 --num-workers 0 --checkpoint-every 0 --log-every 20)
else
  WORK=${WORK:-runs/demo}
  DATA_ROOT=${DATA_ROOT:-tests/data/$DATA}
  export HF_HUB_OFFLINE=1  # everything is local; never wait on the hub
  TINY=$WORK/tiny
  SDXL=$TINY/sdxl
  # A random tiny BLIP-2 writes gibberish; the class-name captioner gives readable prompts for free.
  CAPTION_ARGS=(--captioner labels)
  GEN_TRAIN_ARGS=(--pretrained "$SDXL" --resolution 64 --max-steps 20 --lr 1e-4 --batch-size 2 --num-workers 0
                  --checkpointing-steps 10 --validation-steps 0 --report-to none)
  MASKSYN_ARGS=(--per-sample 2 --text2mask-steps 4 --mask2img-steps 4 --resolution 64 --max-off-palette 1.0 --preview 2)
  IMGSYN_ARGS=(--per-sample 2 --steps 4 --resolution 64 --preview 2)
  SEG_ARGS=(--model "$TINY/mask2former" --max-steps 40 --batch-size 2 --crop 128 --num-workers 0
            --checkpoint-every 20 --log-every 10)
fi
if [ -n "$MAX_STEPS" ] && [ "$PRESET" != toy ]; then GEN_TRAIN_ARGS+=(--max-steps "$MAX_STEPS"); SEG_ARGS+=(--max-steps "$MAX_STEPS"); fi
CAPTIONS=$WORK/captions/${DATA}_train.jsonl
if [ "$PRESET" = toy ]; then CAPTIONS=$DATA_ROOT/captions_train.jsonl; fi  # the world's own captions (common/toyworld.py)
T2M=$WORK/runs/text2mask-$DATA
M2I=$WORK/runs/mask2img-$DATA
MASKSYN=$WORK/synth/masksyn-$DATA
IMGSYN=$WORK/synth/imgsyn-$DATA
SEG_REAL=$WORK/runs/seg-$DATA-real
if [ "$DATA" = ade20k ]; then SEG_STRATEGY=aug; else SEG_STRATEGY=pretrain; fi  # §3.4, §4.2
SEG_SYN=$WORK/runs/seg-$DATA-$SEG_STRATEGY

# One process for the tiny preset; accelerate over the GPUs otherwise.
if [ "$PRESET" != paper ]; then LAUNCH=("$PY"); LAUNCH_MANY=("$PY")
elif [ "$GPUS" -gt 1 ]; then LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$GPUS"); LAUNCH_MANY=("${LAUNCH[@]}")
else LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1); LAUNCH_MANY=("${LAUNCH[@]}"); fi

# ---------------------------------------------------------------- stage runner
DONE=$WORK/.done
TIMES=$WORK/stage_times.tsv
stage() {  # stage NAME COMMAND...: skip when done, else run, time it, mark done
  local name=$1; shift
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; return; fi
  if [ -e "$DONE/$name" ]; then echo "== $name: done before, skipped"; return; fi
  echo "== $name: $*"
  local t0=$EPOCHREALTIME
  "$@"
  mkdir -p "$DONE"
  awk -v n="$name" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%s\t%.1f\n", n, b - a }' >> "$TIMES"
  touch "$DONE/$name"
}
has_samples() {  # has_samples ARGS...: every --synthetic DIR among ARGS holds at least one manifest line
  while [ $# -gt 0 ]; do
    if [ "$1" = --synthetic ]; then cat "$2"/manifest*.jsonl 2>/dev/null | grep -q . || return 1; shift; fi
    shift
  done
}
resume_if_checkpoint() {  # --resume latest when the run folder holds a checkpoint
  if compgen -G "$1/checkpoint-*" >/dev/null || compgen -G "$1/checkpoints/*" >/dev/null; then echo --resume latest; fi
}

if [ "$DRY" = 0 ]; then mkdir -p "$WORK"; fi
echo "# SegGen reproduce.sh --preset $PRESET --data $DATA --data-root $DATA_ROOT --gpus $GPUS (work: $WORK)"

if [ "$PRESET" = toy ]; then
  # world -> base -> Text2Mask, Mask2Img -> MaskSyn, ImgSyn -> the measurements -> Table 4 (bench/toy.py measures)
  TOY=("$PY" bench/toy.py)
  EVAL=$WORK/eval
  SEG_ALL=$WORK/runs/seg-toy-all
  stage world "$PY" -m common.toyworld "$DATA_ROOT" "${WORLD[@]}" --seed 0
  stage base "$PY" -m common.toybase "$BASE" --world "$DATA_ROOT" "${BASE_ARGS[@]}"
  # shellcheck disable=SC2046
  stage train-text2mask "$PY" train_text2mask.py --data toy --data-root "$DATA_ROOT" --captions "$CAPTIONS" \
    --output-dir "$T2M" "${GEN_TRAIN_ARGS[@]}" $(resume_if_checkpoint "$T2M")
  # shellcheck disable=SC2046
  stage train-mask2img "$PY" train_mask2img.py --data toy --data-root "$DATA_ROOT" --captions "$CAPTIONS" \
    --output-dir "$M2I" "${GEN_TRAIN_ARGS[@]}" $(resume_if_checkpoint "$M2I")
  stage masksyn "$PY" masksyn.py --data toy --captions "$CAPTIONS" --text2mask "$T2M" --mask2img "$M2I" --out "$MASKSYN" "${MASKSYN_ARGS[@]}"
  stage imgsyn "$PY" imgsyn.py --data toy --data-root "$DATA_ROOT" --split train --captions "$CAPTIONS" --mask2img "$M2I" \
    --out "$IMGSYN" "${IMGSYN_ARGS[@]}"
  # Text2Mask quality: the fine-tuned model and the untrained base, same captions and sampler
  stage eval-text2mask "${TOY[@]}" text2mask --model "$T2M" --world "$DATA_ROOT" --out "$EVAL/t2m-finetuned.json" --n "$EVAL_N" --steps "$SAMPLE_STEPS"
  stage eval-text2mask-base "${TOY[@]}" text2mask --model "$BASE" --world "$DATA_ROOT" --out "$EVAL/t2m-base.json" --n "$EVAL_N" --steps "$SAMPLE_STEPS"
  # Mask2Img alignment: one segmenter on all real data; ImgSyn vs real val (ceiling) vs base, caption only (floor)
  stage seg-all "$PY" train_seg.py --data toy --data-root "$DATA_ROOT" --strategy real --max-steps "$SEG_STEPS" \
    --output-dir "$SEG_ALL" "${SEG_ARGS[@]}"
  stage eval-floor "${TOY[@]}" floor --base "$BASE" --world "$DATA_ROOT" --out "$EVAL/floor" --n "$EVAL_N" --steps "$SAMPLE_STEPS"
  stage eval-alignment "${TOY[@]}" align --segmenter "$SEG_ALL/model" --world "$DATA_ROOT" --imgsyn "$IMGSYN" --floor "$EVAL/floor" \
    --out "$EVAL/alignment.json"
  # Table 4 at toy scale: N real samples x {real, +ImgSyn, +MaskSyn, +both}, --strategy aug --p-aug 0.6, seeds
  for n in "${TABLE_N[@]}"; do
    for syn in real imgsyn masksyn both; do
      case $syn in real) S=(--strategy real) ;; imgsyn) S=(--strategy aug --p-aug 0.6 --synthetic "$IMGSYN") ;;
        masksyn) S=(--strategy aug --p-aug 0.6 --synthetic "$MASKSYN") ;; both) S=(--strategy aug --p-aug 0.6 --synthetic "$IMGSYN" --synthetic "$MASKSYN") ;; esac
      if [ "$DRY" = 0 ] && [ "$syn" != real ] && ! has_samples "${S[@]}"; then
        echo "== table4 $syn: skipped, a synthetic folder has no samples (see its tally.json)"; continue
      fi
      for seed in "${SEEDS[@]}"; do
        stage "table4-n$n-$syn-s$seed" "$PY" train_seg.py --data toy --data-root "$DATA_ROOT" "${S[@]}" --max-real-samples "$n" \
          --seed "$seed" --max-steps "$TABLE_STEPS" --output-dir "$WORK/runs/table4/n$n-$syn-s$seed" "${SEG_ARGS[@]}"
      done
    done
  done
  if [ "$DRY" = 0 ]; then "$PY" -m common.report "$WORK" --data toy --preset toy; fi
  exit 0
fi

if [ "$PRESET" = tiny ]; then
  for kind in sdxl mask2former; do stage "tiny-$kind" "$PY" -m common.tiny "$kind" "$TINY/$kind"; done
fi
stage caption "${LAUNCH_MANY[@]}" caption.py --data "$DATA" --data-root "$DATA_ROOT" --split train --out "$CAPTIONS" "${CAPTION_ARGS[@]}"
# shellcheck disable=SC2046
stage train-text2mask "${LAUNCH[@]}" train_text2mask.py --data "$DATA" --data-root "$DATA_ROOT" --captions "$CAPTIONS" \
  --output-dir "$T2M" "${GEN_TRAIN_ARGS[@]}" $(resume_if_checkpoint "$T2M")
# shellcheck disable=SC2046
stage train-mask2img "${LAUNCH[@]}" train_mask2img.py --data "$DATA" --data-root "$DATA_ROOT" --captions "$CAPTIONS" \
  --output-dir "$M2I" "${GEN_TRAIN_ARGS[@]}" $(resume_if_checkpoint "$M2I")
if [ "$DATA" = ade20k ]; then  # COCO: ImgSyn only, instances cannot be read back from colour maps (§4.1, A.2)
  stage masksyn "${LAUNCH_MANY[@]}" masksyn.py --data "$DATA" --captions "$CAPTIONS" --text2mask "$T2M" --mask2img "$M2I" \
    --out "$MASKSYN" "${MASKSYN_ARGS[@]}"
fi
stage imgsyn "${LAUNCH_MANY[@]}" imgsyn.py --data "$DATA" --data-root "$DATA_ROOT" --split train --captions "$CAPTIONS" \
  --mask2img "$M2I" --out "$IMGSYN" "${IMGSYN_ARGS[@]}"
SYNTH=(--synthetic "$IMGSYN")
if [ "$DATA" = ade20k ]; then SYNTH+=(--synthetic "$MASKSYN"); fi
# shellcheck disable=SC2046
stage seg-real "${LAUNCH[@]}" train_seg.py --data "$DATA" --data-root "$DATA_ROOT" --strategy real \
  --output-dir "$SEG_REAL" "${SEG_ARGS[@]}" $(resume_if_checkpoint "$SEG_REAL")
# shellcheck disable=SC2046
stage "seg-$SEG_STRATEGY" "${LAUNCH[@]}" train_seg.py --data "$DATA" --data-root "$DATA_ROOT" --strategy "$SEG_STRATEGY" \
  --p-aug 0.6 "${SYNTH[@]}" --output-dir "$SEG_SYN" "${SEG_ARGS[@]}" $(resume_if_checkpoint "$SEG_SYN")
if [ "$DRY" = 0 ]; then
  "$PY" -m common.report "$WORK" --data "$DATA" --preset "$PRESET"
fi
