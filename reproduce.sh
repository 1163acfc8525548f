#!/usr/bin/env bash
# SegGen end to end, each stage one script (paper §3–§4, appendices A.3–A.4):
#   caption -> train Text2Mask -> train Mask2Img -> MaskSyn + ImgSyn -> Mask2Former (real | real+synthetic) -> metrics
#
#   ./reproduce.sh --preset paper --data ade20k --data-root PATH --gpus 8     the paper's settings
#   ./reproduce.sh --preset toy                                               the toy world, learned from scratch on 2 CPU cores (~24 min)
#   ./reproduce.sh --preset toy --size demo                                   the same at reduced size (make demo, ~10 min)
#   ./reproduce.sh --preset tiny                                              tiny random models, built-in samples (plumbing smoke test)
#   ./reproduce.sh ... --dry-run                                              print the exact commands, run nothing
#   ./reproduce.sh ... --max-steps N                                          every trainer stops after N steps (a smoke run)
#   ./reproduce.sh --preset paper --experiment table4 --data-root PATH --gpus 8  one of the paper's tables or figures (list: --experiment list)
#   ./reproduce.sh ... --gpus 8 --nodes 4 --node-rank R --main-ip HOST   the trainers over 4 machines (docs/training-on-clusters.md)
#   ./reproduce.sh --preset paper --experiment fig7 --seeds 3 ...             every segmentation run under 3 seeds; WORK/results.md: mean ± std
#   ./reproduce.sh --preset paper --data coco --backbone swin-l ...           the plain chain's segmenter: r50 (default), swin-l, hrnet-w48 (ADE20K)
#   ./reproduce.sh --preset paper ... --use-8bit-adam                         the generators' AdamW in 8 bits (bitsandbytes): less GPU memory, beyond A.4
#
# The plain paper chain trains each segmenter with the paper's recipe (A.3; docs/training-recipes.md):
# ADE20K: real and SegGen (aug, p_aug 0.6, MaskSyn + ImgSyn), 160k iterations (HRNet 100k), crop 512 (Swin-L 640,
# HRNet 520), single- and multi-scale evaluation (Table 1). COCO: Tables 2/3, panoptic and instance, each the real
# 50+50-epoch baseline (real-pretrain) against SegGen (pretrain on ImgSyn, then real), 368,750 + 368,750
# iterations (Swin-L 737,500 + 737,500), large-scale jitter at 1024 (train_seg.py's recipe).
#
# Reruns resume: a stage whose output is complete (its marker in WORK/.done/) is skipped; a stage cut
# short continues where it stopped (caption/masksyn/imgsyn skip the ids already written, the trainers
# pass --resume latest when they have a checkpoint).
set -euo pipefail
cd "$(dirname "$0")"
REPO=$(pwd)

NODES=1 NODE_RANK=0 MAIN_IP="" MAIN_PORT=29500
PRESET=paper DATA=ade20k DATA_ROOT="" GPUS=1 WORK="" DRY=0 MAX_STEPS="" SIZE=full COCO_MASKSYN=0 EXPERIMENT="" BUILD_BASE=0 GIVEN_BASE=""
BACKBONE=r50 SEEDS=1 ADAM8=0
usage() { sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; echo "options: --preset {paper,toy,tiny} --size {full,demo,smoke} (toy) --data {ade20k,coco} --data-root PATH --gpus N --work DIR --max-steps N --dry-run --coco-masksyn (COCO: add MaskSyn, beyond the paper) --build-base (toy: build the base here instead of using the shipped one) --base DIR (toy: a base of your own, a folder python -m common.toy.base wrote, instead of the shipped one) --experiment {NAME[,NAME...],all,list} (paper preset; tiny: its plumbing) --seeds N (experiments: each segmentation run under seeds 0..N-1) --backbone {r50,swin-l,hrnet-w48} (paper preset, plain chain) --use-8bit-adam (paper preset: 8-bit AdamW for Text2Mask / Mask2Img) --nodes N --node-rank R --main-ip HOST --main-port P (the trainers over N machines, --gpus each)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --data-root) DATA_ROOT=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --main-ip) MAIN_IP=$2; shift 2 ;;
    --main-port) MAIN_PORT=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --coco-masksyn) COCO_MASKSYN=1; shift ;;
    --build-base) BUILD_BASE=1; shift ;;
    --base) GIVEN_BASE=$2; shift 2 ;;
    --experiment) EXPERIMENT=$2; shift 2 ;;
    --max-steps) MAX_STEPS=$2; shift 2 ;;
    --backbone) BACKBONE=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --use-8bit-adam) ADAM8=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "reproduce.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
GIVEN_ROOT=$DATA_ROOT
case "$PRESET" in paper|tiny) ;; toy) DATA=toy ;; *) echo "reproduce.sh: --preset must be paper, toy or tiny (got $PRESET)" >&2; exit 2 ;; esac
case "$SIZE" in full|demo|smoke) ;; *) echo "reproduce.sh: --size must be full, demo or smoke (got $SIZE)" >&2; exit 2 ;; esac
[ "$PRESET" = toy ] || [ "$SIZE" = full ] || { echo "reproduce.sh: --size is for --preset toy" >&2; exit 2; }
case "$DATA" in ade20k|coco|toy) ;; *) echo "reproduce.sh: --data must be ade20k or coco (got $DATA)" >&2; exit 2 ;; esac
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || { echo "reproduce.sh: --gpus must be a positive integer (got $GPUS)" >&2; exit 2; }
[[ "$NODES" =~ ^[1-9][0-9]*$ && "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NODES" ]] || { echo "reproduce.sh: --nodes must be a positive integer and --node-rank one of 0..nodes-1 (got $NODES, $NODE_RANK)" >&2; exit 2; }
[ "$NODES" = 1 ] || [ -n "$MAIN_IP" ] || { echo "reproduce.sh: --nodes $NODES needs --main-ip (the address of the machine with --node-rank 0)" >&2; exit 2; }
[[ -z "$MAX_STEPS" || "$MAX_STEPS" =~ ^[1-9][0-9]*$ ]] || { echo "reproduce.sh: --max-steps must be a positive integer (got $MAX_STEPS)" >&2; exit 2; }
[[ "$SEEDS" =~ ^[1-9][0-9]*$ ]] || { echo "reproduce.sh: --seeds must be a positive integer (got $SEEDS)" >&2; exit 2; }
[ "$SEEDS" = 1 ] || [ -n "$EXPERIMENT" ] || { echo "reproduce.sh: --seeds is for --experiment NAME (the toy preset's seeds come with --size)" >&2; exit 2; }
case "$BACKBONE" in r50|swin-l|hrnet-w48) ;; *) echo "reproduce.sh: --backbone must be r50, swin-l or hrnet-w48 (got $BACKBONE)" >&2; exit 2 ;; esac
[ "$BACKBONE" = r50 ] || [ "$PRESET" = paper ] || { echo "reproduce.sh: --backbone is for --preset paper" >&2; exit 2; }
[ "$BACKBONE" != hrnet-w48 ] || [ "$DATA" = ade20k ] || { echo "reproduce.sh: --backbone hrnet-w48 is the paper's ADE20K semantic segmenter (A.3, Table 4b): use --data ade20k" >&2; exit 2; }
[ "$ADAM8" = 0 ] || [ "$PRESET" = paper ] || { echo "reproduce.sh: --use-8bit-adam is for --preset paper" >&2; exit 2; }
[ -z "$GIVEN_BASE" ] || [ "$PRESET" = toy ] || { echo "reproduce.sh: --base is for --preset toy (the paper preset starts from SDXL-base)" >&2; exit 2; }

set_flag() {  # set_flag ARRAY FLAG VALUE: the flag's value in the named array replaced (appended when absent)
  local -n arr=$1; local i
  for i in "${!arr[@]}"; do if [ "${arr[$i]}" = "$2" ]; then arr[i+1]=$3; return; fi; done
  arr+=("$2" "$3")
}
get_flag() {  # get_flag ARRAY FLAG: the flag's value in the named array (empty when absent)
  local -n arr=$1; local i
  for i in "${!arr[@]}"; do if [ "${arr[$i]}" = "$2" ]; then echo "${arr[i+1]}"; return; fi; done
}

PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error} DIFFUSERS_VERBOSITY=${DIFFUSERS_VERBOSITY:-error}
# Idle OpenMP threads sleep instead of spinning (a busy machine: bench/threads.py, common/runtime/threads.py).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# ---------------------------------------------------------------- settings of each preset
if [ "$PRESET" = paper ]; then
  WORK=${WORK:-.}
  DATA_ROOT=${DATA_ROOT:-${SEGGEN_DATASETS:-datasets}}
  SDXL=stabilityai/stable-diffusion-xl-base-1.0
  CAPTION_ARGS=(--model Salesforce/blip2-flan-t5-xxl --batch-size 16)     # §3.2, the paper's prompt is the default
  GEN_TRAIN_ARGS=(--pretrained "$SDXL" --resolution 768 --max-steps 30000 --lr 1e-5 --global-batch-size 32 --batch-size 4
                  --mixed-precision bf16 --gradient-checkpointing)  # A.4: AdamW
  # --use-8bit-adam: bitsandbytes' 8-bit AdamW, a memory saving beyond A.4 (its states take a quarter of the memory)
  if [ "$ADAM8" = 1 ]; then GEN_TRAIN_ARGS+=(--use-8bit-adam); fi
  if [ "$DATA" = ade20k ]; then IMGSYN_PER_SAMPLE=50; else IMGSYN_PER_SAMPLE=10; fi  # §4.1
  MASKSYN_ARGS=(--per-sample 10 --text2mask-steps 200 --mask2img-steps 40 --resolution 768)  # §4.1, A.4
  IMGSYN_ARGS=(--per-sample "$IMGSYN_PER_SAMPLE" --steps 40 --resolution 768)
  # A.3 / Tables 1-4 (docs/training-recipes.md): iterations at batch 16 per phase, and the crop, of each segmenter
  case "$DATA/$BACKBONE" in
    ade20k/r50) SEG_STEPS=160000 SEG_CROP=512 ;; ade20k/swin-l) SEG_STEPS=160000 SEG_CROP=640 ;; ade20k/hrnet-w48) SEG_STEPS=100000 SEG_CROP=520 ;;
    coco/r50) SEG_STEPS=368750 SEG_CROP=1024 ;; coco/swin-l) SEG_STEPS=737500 SEG_CROP=1024 ;;  # 50 / 100 epochs, large-scale jitter
  esac
  if [ -n "$MAX_STEPS" ]; then SEG_STEPS=$MAX_STEPS; fi
  # Mask2Former trains with AMP (its configs' SOLVER.AMP); HRNet's recipe in fp32. --eval-every 5000: the configs' TEST.EVAL_PERIOD.
  SEG_ARGS=(--backbone "$BACKBONE" --max-steps "$SEG_STEPS" --batch-size 16 --crop "$SEG_CROP" --eval-every 5000)
  [ "$BACKBONE" = hrnet-w48 ] || SEG_ARGS+=(--mixed-precision bf16)
elif [ "$PRESET" = toy ]; then
  # The toy world (common/toy/world.py) and its base (common/toy/base.py), every model learned on 2 CPU cores.
  WORK=${WORK:-runs/toy}
  export HF_HUB_OFFLINE=1
  DATA_ROOT=$WORK/world
  # The base (SDXL-base's stand-in) ships in the repo, built by the command in common/assets/toybase/README.md
  # (python -m common.toy.base, ~10 min on 2 cores); --build-base builds it again here, --size smoke always
  # builds a quick one (the build's code path, in seconds).
  BASE=common/assets/toybase
  if [ "$BUILD_BASE" = 1 ] || [ "$SIZE" = smoke ]; then BASE=$WORK/base; fi
  if [ -n "$GIVEN_BASE" ]; then  # --base DIR: a base built elsewhere (e.g. with other VAE settings, docs/toy-results.md)
    [ -f "$GIVEN_BASE/model_index.json" ] || { echo "reproduce.sh: --base $GIVEN_BASE is not a pipeline folder (no model_index.json); build one with python -m common.toy.base DIR --world WORLD" >&2; exit 2; }
    [ "$BUILD_BASE" = 0 ] || { echo "reproduce.sh: --base and --build-base exclude each other (one gives a base, the other builds one)" >&2; exit 2; }
    BASE=$GIVEN_BASE
  fi
  # Step counts are sized by wall time (a Text2Mask step costs about half a Mask2Img step; the two train side by
  # side), not by the results; docs/toy-results.md has the measurements. lr 1e-3, not the paper's 1e-5: these
  # models are ~1000x smaller than SDXL (measured on the demo: Mask2Img at 1e-4 did not leave the floor). At that
  # lr the raw weights swing from checkpoint to checkpoint (demo Text2Mask off-palette 11.7 / 15.7 / 9.6% at 1500 /
  # 2000 / 2500 steps), so both trainers keep an EMA (--ema; the paper is silent), which is what is saved and sampled
  # (10.8 / 10.6 / 9.7 / 8.8% at 1500 / 2000 / 2500 / 3000). --cache-latents: the toy images are 64 px, so the centre crop is the whole image and
  # caching changes nothing but the speed (Text2Mask ~1.7x, Mask2Img ~1.2x per step).
  # Table 4 steps (issue 24): full 800, where real only at N = 50 has plateaued (bench/toy_curve.py: 40.8 / 42.3 / 42.2 /
  # 42.7 mIoU at 400 / 800 / 1200 / 1600 steps, demo world, seed 0); the demo's 200 show the plumbing, not the regime.
  #         world: train val | base build | steps: Text2Mask Mask2Img | masksyn: captions per-sample | imgsyn: labels per-sample | sampler steps | eval images | segmenter: steps, Table 4 steps, N, seeds
  case "$SIZE" in
    full)  WORLD=(--train 2000 --val 200); BASE_ARGS=(); T2M_STEPS=4000; M2I_STEPS=3000; MS=(--limit 200 --per-sample 2); IS=(--limit 200 --per-sample 2)
           SAMPLE_STEPS=20; EVAL_N=100; SEG_STEPS=1500; TABLE_STEPS=800; TABLE_N=(50 500); SEEDS=(0 1 2) ;;
    demo)  WORLD=(--train 400 --val 100); BASE_ARGS=(); T2M_STEPS=2500; M2I_STEPS=1500; MS=(--limit 48 --per-sample 2); IS=(--limit 48 --per-sample 2)
           SAMPLE_STEPS=15; EVAL_N=48; SEG_STEPS=600; TABLE_STEPS=200; TABLE_N=(50); SEEDS=(0) ;;
    smoke) WORLD=(--train 24 --val 8); BASE_ARGS=(--quick); T2M_STEPS=2; M2I_STEPS=2; MS=(--limit 2 --per-sample 1 --max-off-palette 1.0); IS=(--limit 2 --per-sample 1)
           SAMPLE_STEPS=2; EVAL_N=4; SEG_STEPS=2; TABLE_STEPS=2; TABLE_N=(8); SEEDS=(0) ;;
  esac
  if [ -n "$MAX_STEPS" ]; then T2M_STEPS=$MAX_STEPS; M2I_STEPS=$MAX_STEPS; SEG_STEPS=$MAX_STEPS; TABLE_STEPS=$MAX_STEPS; fi
  CAPTION_ARGS=()
  GEN_TRAIN_ARGS=(--pretrained "$BASE" --resolution 64 --lr 1e-3 --global-batch-size 16 --batch-size 16 --num-workers 0
                  --caption-dropout 0.1 --ema --cache-latents --center-crop --checkpointing-steps 500 --validation-steps 0 --report-to none)
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
  GEN_TRAIN_ARGS=(--pretrained "$SDXL" --resolution 64 --max-steps 20 --lr 1e-4 --global-batch-size 2 --batch-size 2 --num-workers 0
                  --checkpointing-steps 10 --validation-steps 0 --report-to none)
  MASKSYN_ARGS=(--per-sample 2 --text2mask-steps 4 --mask2img-steps 4 --resolution 64 --max-off-palette 1.0 --preview 2)
  IMGSYN_ARGS=(--per-sample 2 --steps 4 --resolution 64 --preview 2)
  SEG_ARGS=(--model "$TINY/mask2former" --max-steps 40 --batch-size 2 --crop 128 --num-workers 0
            --checkpoint-every 20 --log-every 10)
fi
if [ -n "$MAX_STEPS" ] && [ "$PRESET" != toy ]; then GEN_TRAIN_ARGS+=(--max-steps "$MAX_STEPS"); set_flag SEG_ARGS --max-steps "$MAX_STEPS"; fi
CAPTIONS=$WORK/captions/${DATA}_train.jsonl
if [ "$PRESET" = toy ]; then CAPTIONS=$DATA_ROOT/captions_train.jsonl; fi  # the world's own captions (common/toy/world.py)
T2M=$WORK/runs/text2mask-$DATA
M2I=$WORK/runs/mask2img-$DATA
MASKSYN=$WORK/synth/masksyn-$DATA
IMGSYN=$WORK/synth/imgsyn-$DATA
SEG_REAL=$WORK/runs/seg-$DATA-real
if [ "$DATA" = ade20k ]; then SEG_STRATEGY=aug; else SEG_STRATEGY=pretrain; fi  # §3.4, §4.2
SEG_SYN=$WORK/runs/seg-$DATA-$SEG_STRATEGY

# One process for the tiny preset; accelerate over the GPUs otherwise. The trainers (LAUNCH) may span --nodes machines
# (every machine runs this script with its --node-rank; accelerate's --num_processes counts them all).
if [ "$PRESET" != paper ]; then LAUNCH=("$PY"); LAUNCH_MANY=("$PY")
elif [ "$GPUS" -gt 1 ]; then LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$GPUS"); LAUNCH_MANY=("${LAUNCH[@]}")
else LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1); LAUNCH_MANY=("${LAUNCH[@]}"); fi
if [ "$PRESET" = paper ] && [ "$NODES" -gt 1 ]; then
  LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes $((GPUS * NODES)) --num_machines "$NODES"
          --machine_rank "$NODE_RANK" --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT")
fi

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
    if [ "$1" = --synthetic ]; then grep -qs . "$2"/manifest*.jsonl || return 1; shift; fi  # (no cat | grep -q: pipefail + SIGPIPE)
    shift
  done
}
PAR=${SEGGEN_JOBS:-2} PIDS=()
spawn() {  # spawn NAME COMMAND...: a stage beside others, at most $PAR at once (SEGGEN_JOBS), one torch thread each
  if [ "$DRY" = 1 ] || [ "$PAR" -le 1 ]; then stage "$@"; return; fi
  ( export SEGGEN_THREADS=${SEGGEN_THREADS:-1}; stage "$@" ) &
  PIDS+=($!)
  if [ "${#PIDS[@]}" -ge "$PAR" ]; then wait "${PIDS[0]}"; PIDS=("${PIDS[@]:1}"); fi
}
join() {  # wait for every spawned stage; a failed one stops the script (set -e)
  local p
  for p in "${PIDS[@]}"; do wait "$p"; done
  PIDS=()
}
resume_if_checkpoint() {  # --resume latest when the run folder holds a checkpoint
  if compgen -G "$1/checkpoint-*" >/dev/null || compgen -G "$1/checkpoints/*" >/dev/null; then echo --resume latest; fi
}

if [ "$DRY" = 0 ]; then mkdir -p "$WORK"; fi
echo "# SegGen reproduce.sh --preset $PRESET --data $DATA --data-root $DATA_ROOT --gpus $GPUS (work: $WORK)"

# ---------------------------------------------------------------- named experiments: --experiment NAME (paper preset)
# The paper's tables and figures, one row per segmentation run (§4, A.3, A.6, A.9–A.11). Every row runs
# after the generation chain it names; a chain shared by several experiments runs once.
#   chain      full: caption -> Text2Mask, Mask2Img -> MaskSyn (ADE20K) + ImgSyn on every training sample (§4.1)
#              n1000: the same on 1,000 training samples (python -m common.data.subset; --real-subset in every stage; Table 4)
#              sd15: Text2Mask and Mask2Img on SD-1.5, 10 MaskSyn + 10 ImgSyn per sample (A.11: 200K + 200K; Table 9)
#   strategy   train_seg.py --strategy: real, aug (p_aug), pretrain (synthetic then real), real-pretrain (real then
#              real: the 50+50 baselines of Tables 2/3), synthetic (synthetic only)
#   synthetic  the chain's folders: imgsyn, masksyn, both; NAME:k takes the first k samples per source
#              (train_seg --synthetic FOLDER:k; Fig. 8: ImgSyn x1/10/30/50 = 20K/200K/600K/1M; Table 8: MaskSyn x2/4/8/10 = 40K..200K)
#   steps      iterations at batch 16 (A.3: ADE20K 160k, HRNet 100k; COCO R50 368,750 = 50 epochs, Swin-L 737,500 = 100); A+B: two phases
#   extra      more train_seg.py flags (- for none)
# Not here: Mask DINO (Tables 1/2 rows; needs detectron2, not installable), DiffuMask (Table 5's other row).
# Our choices where the paper is silent: COCO's aug run of Table 6b uses p_aug 0.6 (ADE20K's); SD-1.5 trains
# and samples at 512 (its native size; A.11 names no resolution); the 1,000-sample chain keeps §4.1's per-sample counts.
EXPERIMENTS='
# experiment run                    data    chain  backbone   task      strategy       p_aug  synthetic   steps           extra
table1       r50-real               ade20k  full   r50        semantic  real           -      -           160000          --multiscale
table1       r50-seggen             ade20k  full   r50        semantic  aug            0.6    both        160000          --multiscale
table1       swinl-real             ade20k  full   swin-l     semantic  real           -      -           160000          --multiscale
table1       swinl-seggen           ade20k  full   swin-l     semantic  aug            0.6    both        160000          --multiscale
table2       r50-real               coco    full   r50        panoptic  real-pretrain  -      -           368750+368750   -
table2       r50-seggen             coco    full   r50        panoptic  pretrain       -      imgsyn      368750+368750   -
table2       swinl-real             coco    full   swin-l     panoptic  real-pretrain  -      -           737500+737500   -
table2       swinl-seggen           coco    full   swin-l     panoptic  pretrain       -      imgsyn      737500+737500   -
table3       r50-real               coco    full   r50        instance  real-pretrain  -      -           368750+368750   -
table3       r50-seggen             coco    full   r50        instance  pretrain       -      imgsyn      368750+368750   -
table3       swinl-real             coco    full   swin-l     instance  real-pretrain  -      -           737500+737500   -
table3       swinl-seggen           coco    full   swin-l     instance  pretrain       -      imgsyn      737500+737500   -
table4       r50-real               ade20k  full   r50        semantic  real           -      -           160000          -
table4       r50-masksyn            ade20k  full   r50        semantic  aug            0.6    masksyn     160000          -
table4       r50-imgsyn             ade20k  full   r50        semantic  aug            0.6    imgsyn      160000          -
table4       r50-both               ade20k  full   r50        semantic  aug            0.6    both        160000          -
table4       r50-real-1000          ade20k  n1000  r50        semantic  real           -      -           160000          -
table4       r50-masksyn-1000       ade20k  n1000  r50        semantic  aug            0.6    masksyn     160000          -
table4       r50-imgsyn-1000        ade20k  n1000  r50        semantic  aug            0.6    imgsyn      160000          -
table4       r50-both-1000          ade20k  n1000  r50        semantic  aug            0.6    both        160000          -
table4       hrnet-real             ade20k  full   hrnet-w48  semantic  real           -      -           100000          -
table4       hrnet-masksyn          ade20k  full   hrnet-w48  semantic  aug            0.6    masksyn     100000          -
table4       hrnet-imgsyn           ade20k  full   hrnet-w48  semantic  aug            0.6    imgsyn      100000          -
table4       hrnet-both             ade20k  full   hrnet-w48  semantic  aug            0.6    both        100000          -
table4       hrnet-real-1000        ade20k  n1000  hrnet-w48  semantic  real           -      -           100000          -
table4       hrnet-masksyn-1000     ade20k  n1000  hrnet-w48  semantic  aug            0.6    masksyn     100000          -
table4       hrnet-imgsyn-1000      ade20k  n1000  hrnet-w48  semantic  aug            0.6    imgsyn      100000          -
table4       hrnet-both-1000        ade20k  n1000  hrnet-w48  semantic  aug            0.6    both        100000          -
table5       real                   ade20k  full   r50        semantic  real           -      -           160000          -
table5       masksyn                ade20k  full   r50        semantic  synthetic      -      masksyn     160000          -
table5       imgsyn                 ade20k  full   r50        semantic  synthetic      -      imgsyn      160000          -
table5       both                   ade20k  full   r50        semantic  synthetic      -      both        160000          -
table6       ade20k-pretrain        ade20k  full   r50        semantic  pretrain       -      both        160000+160000   -
table6       ade20k-aug             ade20k  full   r50        semantic  aug            0.6    both        160000          -
table6       coco-pretrain          coco    full   r50        panoptic  pretrain       -      imgsyn      368750+368750   -
table6       coco-aug               coco    full   r50        panoptic  aug            0.6    imgsyn      368750          -
table6       coco-pretrain-instance coco    full   r50        instance  pretrain       -      imgsyn      368750+368750   -
table6       coco-aug-instance      coco    full   r50        instance  aug            0.6    imgsyn      368750          -
table7       real                   ade20k  full   r50        semantic  real           -      -           160000          -
table7       seggen                 ade20k  full   r50        semantic  aug            0.6    both        160000          -
table7       real-noaug             ade20k  full   r50        semantic  real           -      -           160000          --no-augment
table7       seggen-noaug           ade20k  full   r50        semantic  aug            0.6    both        160000          --no-augment
fig7         p0.0                   ade20k  full   r50        semantic  aug            0.0    both        160000          -
fig7         p0.2                   ade20k  full   r50        semantic  aug            0.2    both        160000          -
fig7         p0.4                   ade20k  full   r50        semantic  aug            0.4    both        160000          -
fig7         p0.6                   ade20k  full   r50        semantic  aug            0.6    both        160000          -
fig7         p0.8                   ade20k  full   r50        semantic  aug            0.8    both        160000          -
fig7         p1.0                   ade20k  full   r50        semantic  aug            1.0    both        160000          -
fig8         real                   ade20k  full   r50        semantic  real           -      -           160000          -
fig8         imgsyn-20k             ade20k  full   r50        semantic  aug            0.6    imgsyn:1    160000          -
fig8         imgsyn-200k            ade20k  full   r50        semantic  aug            0.6    imgsyn:10   160000          -
fig8         imgsyn-600k            ade20k  full   r50        semantic  aug            0.6    imgsyn:30   160000          -
fig8         imgsyn-1m              ade20k  full   r50        semantic  aug            0.6    imgsyn:50   160000          -
fig11        imgsyn-20k             ade20k  full   r50        semantic  aug            0.6    imgsyn:1    160000          --eval-every 5000
fig11        imgsyn-1m              ade20k  full   r50        semantic  aug            0.6    imgsyn:50   160000          --eval-every 5000
table8       real                   ade20k  full   r50        semantic  real           -      -           160000          -
table8       masksyn-40k            ade20k  full   r50        semantic  aug            0.6    masksyn:2   160000          -
table8       masksyn-80k            ade20k  full   r50        semantic  aug            0.6    masksyn:4   160000          -
table8       masksyn-160k           ade20k  full   r50        semantic  aug            0.6    masksyn:8   160000          -
table8       masksyn-200k           ade20k  full   r50        semantic  aug            0.6    masksyn:10  160000          -
table9       real                   ade20k  sd15   r50        semantic  real           -      -           160000          -
table9       masksyn                ade20k  sd15   r50        semantic  aug            0.6    masksyn     160000          -
table9       imgsyn                 ade20k  sd15   r50        semantic  aug            0.6    imgsyn      160000          -
table9       both                   ade20k  sd15   r50        semantic  aug            0.6    both        160000          -
'
NOTES='
table1 Table 1: ADE20K val mIoU, single- and multi-scale (metrics.json: single_scale, multi_scale)
table2 Table 2: COCO panoptic val2017, real 50+50 (100+100) epochs against synthetic pre-training + real fine-tuning
table3 Table 3: COCO instance AP (80 things), against annotations/instances_val2017.json when present (metrics.json: ap_source)
table4 Table 4: MaskSyn / ImgSyn ablation, Mask2Former R50 (a) and HRNet-W48 (b), all 20,210 and 1,000 real samples
table5 Table 5: synthetic data only; the IoU of bus, car and person is in metrics.json single_scale.per_class_iou
table6 Table 6: pre-training against augmentation, ADE20K (a) and COCO PQ / AP (b)
table7 Table 7 (A.9): without colour augmentation, random flipping and random cropping
fig7 Fig. 7: p_aug from 0 (real only) to 1 (synthetic only)
fig8 Fig. 8, A.6: the number of ImgSyn samples (first k per real sample)
fig11 Fig. 11 (A.6): training loss and validation mIoU with 20K against 1M ImgSyn samples (WORK/runs/fig11/fig11.png; --eval-every 5000, the TEST.EVAL_PERIOD of the Mask2Former configs)
table8 Table 8 (A.10): the number of MaskSyn samples (first k per caption)
table9 Table 9 (A.11): the generators on SD-1.5
'
SD15=${SD15:-stable-diffusion-v1-5/stable-diffusion-v1-5}  # A.11; the weights once at runwayml/stable-diffusion-v1-5
SUBSET_N=1000 SUBSET_SEED=0  # Table 4's 1,000 real samples, one seeded choice for every stage


declare -A ONCE=()
once() {  # once NAME COMMAND...: stage, but only the first time this run asks for NAME (chains shared by experiments)
  [ -z "${ONCE[$1]:-}" ] || return 0
  ONCE[$1]=1
  stage "$@"
}
data_root() {  # data_root DATA: where DATA's rows read it (the tiny preset: its own samples of each dataset)
  if [ "$PRESET" = tiny ] && [ -z "$GIVEN_ROOT" ]; then echo "tests/data/$1"; else echo "$DATA_ROOT"; fi
}
chain() {  # chain KIND DATA NEEDS: the generation stages one row needs (each once per run; NEEDS: masksyn and/or imgsyn);
  #                               sets CH_MASKSYN, CH_IMGSYN, CH_SUBSET. Text2Mask and MaskSyn run only for a row that uses MaskSyn.
  local kind=$1 data=$2 needs=$3 tag=$2 caps=$WORK/captions/$2_train.jsonl root; root=$(data_root "$2")
  local gen=("${GEN_TRAIN_ARGS[@]}") ms=("${MASKSYN_ARGS[@]}") is=("${IMGSYN_ARGS[@]}") sub=()
  if [ "$PRESET" = tiny ]; then :  # the tiny preset's own small counts (its plumbing, not the paper's numbers)
  elif [ "$data" = coco ]; then set_flag is --per-sample 10; else set_flag is --per-sample 50; fi  # §4.1
  CH_SUBSET=""
  case $kind in
    n1000) tag=$data-$SUBSET_N CH_SUBSET=$WORK/subsets/$data-$SUBSET_N.txt caps=$WORK/captions/${data}_train-$SUBSET_N.jsonl
           sub=(--real-subset "$CH_SUBSET") ;;
    sd15)  tag=$data-sd15; set_flag gen --pretrained "$SD15"; set_flag gen --resolution 512
           set_flag ms --resolution 512; set_flag is --resolution 512; set_flag is --per-sample 10 ;;  # A.11: 200K + 200K
  esac
  local t2m=$WORK/runs/text2mask-$tag m2i=$WORK/runs/mask2img-$tag
  CH_MASKSYN=$WORK/synth/masksyn-$tag CH_IMGSYN=$WORK/synth/imgsyn-$tag
  if [ -n "$CH_SUBSET" ]; then  # one seeded subset (real-only rows train on it too)
    once "$tag-subset" "$PY" -m common.data.subset --data "$data" --data-root "$root" --n "$SUBSET_N" --seed "$SUBSET_SEED" --out "$CH_SUBSET"
  fi
  [ -n "$needs" ] || return 0  # a real-only row: no generator
  if [ -n "$CH_SUBSET" ]; then  # the subset's own captions file
    once "$tag-caption" "${LAUNCH_MANY[@]}" caption.py --data "$data" --data-root "$root" --split train --out "$caps" "${sub[@]}" "${CAPTION_ARGS[@]}"
  else  # the full chain and SD-1.5 share the captions (§3.2: BLIP-2 captions, whatever the base)
    once "$data-caption" "${LAUNCH_MANY[@]}" caption.py --data "$data" --data-root "$root" --split train --out "$caps" "${CAPTION_ARGS[@]}"
  fi
  if [[ " $needs " == *" masksyn "* ]]; then
    # shellcheck disable=SC2046
    once "$tag-train-text2mask" "${LAUNCH[@]}" train_text2mask.py --data "$data" --data-root "$root" --captions "$caps" "${sub[@]}" \
      --output-dir "$t2m" "${gen[@]}" $(resume_if_checkpoint "$t2m")
  fi
  # shellcheck disable=SC2046
  once "$tag-train-mask2img" "${LAUNCH[@]}" train_mask2img.py --data "$data" --data-root "$root" --captions "$caps" "${sub[@]}" \
    --output-dir "$m2i" "${gen[@]}" $(resume_if_checkpoint "$m2i")
  if [[ " $needs " == *" masksyn "* ]]; then  # ADE20K's rows only (§4.1: COCO uses ImgSyn)
    once "$tag-masksyn" "${LAUNCH_MANY[@]}" masksyn.py --data "$data" --captions "$caps" "${sub[@]}" --text2mask "$t2m" --mask2img "$m2i" \
      --out "$CH_MASKSYN" "${ms[@]}"
  fi
  if [[ " $needs " == *" imgsyn "* ]]; then
    once "$tag-imgsyn" "${LAUNCH_MANY[@]}" imgsyn.py --data "$data" --data-root "$root" --split train --captions "$caps" "${sub[@]}" \
      --mask2img "$m2i" --out "$CH_IMGSYN" "${is[@]}"
  fi
}

row_args() {  # row_args BACKBONE STEPS EXTRA: ROW (train_seg.py flags of the model, steps and precision) for one row
  local backbone=$1 steps=$2 extra=$3 every
  if [ "$PRESET" = tiny ]; then  # the tiny preset's plumbing: every row on the tiny Mask2Former, tiny steps
    ROW=("${SEG_ARGS[@]}"); steps=$(get_flag SEG_ARGS --max-steps); [[ "$2" != *+* ]] || steps=$steps+$steps
  else
    ROW=(--backbone "$backbone" --batch-size 16)  # A.3
    [[ "$backbone" == hrnet* ]] || ROW+=(--mixed-precision bf16)  # Mask2Former trains with AMP; HRNet's recipe in fp32
    if [ -n "$MAX_STEPS" ]; then if [[ "$steps" == *+* ]]; then steps=$MAX_STEPS+$MAX_STEPS; else steps=$MAX_STEPS; fi; fi
  fi
  if [[ "$steps" == *+* ]]; then set_flag ROW --pretrain-steps "${steps%+*}"; fi
  set_flag ROW --max-steps "${steps#*+}"
  # shellcheck disable=SC2206
  [ "$extra" = - ] || ROW+=($extra)
  # Runs cut short (--max-steps, tiny) still draw curves: 4 evaluations and loss points a phase.
  every=$(( ${steps#*+} / 4 > 0 ? ${steps#*+} / 4 : 1 ))
  if [[ " ${ROW[*]} " == *" --eval-every "* ]] && { [ -n "$MAX_STEPS" ] || [ "$PRESET" = tiny ]; }; then
    set_flag ROW --eval-every "$every"; set_flag ROW --log-every "$every"
  fi
}

experiment() {  # experiment NAME: the chains its rows need, then its segmentation runs (each under --seeds seeds)
  local name=$1 exp run data kind backbone task strategy p syn steps extra needs seed
  echo "# experiment $name:$(sed -n "s/^$name / /p" <<< "$NOTES")"
  local runs=()
  while read -r exp run data kind backbone task strategy p syn steps extra <&3; do
    [ "$exp" = "$name" ] || continue
    needs=$(tr ' ' '\n' <<< "${syn//both/masksyn imgsyn}" | sed 's/:.*//' | grep -v '^-$' | sort -u | tr '\n' ' ' || true)
    chain "$kind" "$data" "$needs"
    local args=(--data "$data" --data-root "$(data_root "$data")" --task "$task" --strategy "$strategy")
    [ "$p" = - ] || args+=(--p-aug "$p")
    local s k folder
    for s in ${syn//both/masksyn imgsyn}; do
      [ "$s" = - ] && continue
      k=""; [[ "$s" == *:* ]] && k=":${s#*:}"
      case ${s%%:*} in masksyn) folder=$CH_MASKSYN ;; imgsyn) folder=$CH_IMGSYN ;; esac
      args+=(--synthetic "$folder$k")
    done
    [ -z "$CH_SUBSET" ] || args+=(--real-subset "$CH_SUBSET")
    row_args "$backbone" "$steps" "$extra"
    for ((seed = 0; seed < SEEDS; seed++)); do
      local out=$WORK/runs/$name/$run tag=$name-$run sd=()
      if [ "$SEEDS" -gt 1 ]; then out=$out-s$seed tag=$tag-s$seed sd=(--seed "$seed"); fi
      # shellcheck disable=SC2046
      stage "$tag" "${LAUNCH[@]}" train_seg.py "${args[@]}" "${ROW[@]}" "${sd[@]}" --output-dir "$out" $(resume_if_checkpoint "$out")
      runs+=("$out")
    done
  done 3<<< "$EXPERIMENTS"
  if [ "$name" = fig11 ]; then  # A.6: training loss and validation mIoU of the small and the full synthetic set
    report "$PY" -m common.report.curves "${runs[@]}" --out "$WORK/runs/fig11/fig11.png"
  fi
}
report() {  # report COMMAND...: printed in a dry run, else run (every time: the figures follow the runs)
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

NAMES=($(awk '!/^#/ && NF { if (!seen[$1]++) print $1 }' <<< "$EXPERIMENTS"))
if [ -n "$EXPERIMENT" ]; then
  [ "$PRESET" != toy ] || { echo "reproduce.sh: --experiment is for --preset paper (or tiny, its plumbing)" >&2; exit 2; }
  if [ "$EXPERIMENT" = list ]; then
    for n in "${NAMES[@]}"; do sed -n "s/^$n //p" <<< "$NOTES"; done
    exit 0
  fi
  if [ "$EXPERIMENT" = all ]; then todo=("${NAMES[@]}"); else IFS=, read -r -a todo <<< "$EXPERIMENT"; fi
  for n in "${todo[@]}"; do
    [[ " ${NAMES[*]} " == *" $n "* ]] || { echo "reproduce.sh: --experiment $n is none of: ${NAMES[*]} (or all, list)" >&2; exit 2; }
  done
  if [ "$PRESET" = tiny ]; then
    for kind in sdxl mask2former; do stage "tiny-$kind" "$PY" -m common.models.tiny "$kind" "$TINY/$kind"; done
  fi
  for n in "${todo[@]}"; do experiment "$n"; done
  # One table of every run asked for: mean ± std over the seeds (common/report/seeds.py)
  report "$PY" -m common.report.seeds "${todo[@]/#/$WORK/runs/}" --out "$WORK/results.md"
  exit 0
fi

if [ "$PRESET" = toy ]; then
  # world -> base -> Text2Mask, Mask2Img -> MaskSyn, ImgSyn -> the measurements -> Table 4 (bench/toy.py measures)
  TOY=("$PY" bench/toy.py)
  EVAL=$WORK/eval
  SEG_ALL=$WORK/runs/seg-toy-all
  stage world "$PY" -m common.toy.world "$DATA_ROOT" "${WORLD[@]}" --seed 0
  if [ "$BASE" = "$WORK/base" ]; then stage base "$PY" -m common.toy.base "$BASE" --world "$DATA_ROOT" "${BASE_ARGS[@]}"; fi
  # Independent stages run side by side, one torch thread each (spawn ... join): on 2 cores two
  # one-thread processes finish sooner than one two-thread process after the other.
  # shellcheck disable=SC2046
  spawn train-text2mask "$PY" train_text2mask.py --data toy --data-root "$DATA_ROOT" --captions "$CAPTIONS" \
    --output-dir "$T2M" --max-steps "$T2M_STEPS" "${GEN_TRAIN_ARGS[@]}" $(resume_if_checkpoint "$T2M")
  # shellcheck disable=SC2046
  spawn train-mask2img "$PY" train_mask2img.py --data toy --data-root "$DATA_ROOT" --captions "$CAPTIONS" \
    --output-dir "$M2I" --max-steps "$M2I_STEPS" "${GEN_TRAIN_ARGS[@]}" $(resume_if_checkpoint "$M2I")
  # the segmenter for the alignment measure (all real data) and the floor's images need no generator
  spawn seg-all "$PY" train_seg.py --data toy --data-root "$DATA_ROOT" --strategy real --max-steps "$SEG_STEPS" \
    --output-dir "$SEG_ALL" "${SEG_ARGS[@]}"
  spawn eval-floor "${TOY[@]}" floor --base "$BASE" --world "$DATA_ROOT" --out "$EVAL/floor" --n "$EVAL_N" --steps "$SAMPLE_STEPS"
  # a perfect generator's folders for Table 4's oracle rows: the real images of ImgSyn's labels, raw and through the base's VAE
  spawn oracle "${TOY[@]}" oracle --world "$DATA_ROOT" --limit "${IS[1]}" --vae "$BASE" --out "$WORK/synth"
  join
  spawn masksyn "$PY" masksyn.py --data toy --captions "$CAPTIONS" --text2mask "$T2M" --mask2img "$M2I" --out "$MASKSYN" "${MASKSYN_ARGS[@]}"
  spawn imgsyn "$PY" imgsyn.py --data toy --data-root "$DATA_ROOT" --split train --captions "$CAPTIONS" --mask2img "$M2I" \
    --out "$IMGSYN" "${IMGSYN_ARGS[@]}"
  # Text2Mask quality: the fine-tuned model and the untrained base, same captions and sampler
  spawn eval-text2mask "${TOY[@]}" text2mask --model "$T2M" --world "$DATA_ROOT" --out "$EVAL/t2m-finetuned.json" --n "$EVAL_N" --steps "$SAMPLE_STEPS"
  spawn eval-text2mask-base "${TOY[@]}" text2mask --model "$BASE" --world "$DATA_ROOT" --out "$EVAL/t2m-base.json" --n "$EVAL_N" --steps "$SAMPLE_STEPS"
  join
  # Mask2Img alignment (beside the first Table 4 runs): the segmenter on ImgSyn images vs on real val (ceiling; and through the base's VAE) vs on
  # base images, caption only (floor)
  spawn eval-alignment "${TOY[@]}" align --segmenter "$SEG_ALL/model" --world "$DATA_ROOT" --imgsyn "$IMGSYN" --floor "$EVAL/floor" \
    --vae "$BASE" --out "$EVAL/alignment.json"
  # Table 4 at toy scale: N real samples x {real, +ImgSyn, +MaskSyn, +both, + the two oracles}, --strategy aug --p-aug 0.6,
  # seeds. The oracle rows (issue 24) put the real images of ImgSyn's labels, raw or through the base's VAE, where
  # ImgSyn's images go: each synthetic row reads as a share of what a perfect generator behind this decoder gives.
  for n in "${TABLE_N[@]}"; do
    for syn in real imgsyn masksyn both oracle-real oracle-vae; do
      case $syn in real) S=(--strategy real) ;; imgsyn) S=(--strategy aug --p-aug 0.6 --synthetic "$IMGSYN") ;;
        masksyn) S=(--strategy aug --p-aug 0.6 --synthetic "$MASKSYN") ;; both) S=(--strategy aug --p-aug 0.6 --synthetic "$IMGSYN" --synthetic "$MASKSYN") ;;
        oracle-*) S=(--strategy aug --p-aug 0.6 --synthetic "$WORK/synth/$syn-toy") ;; esac
      if [ "$DRY" = 0 ] && [ "$syn" != real ] && ! has_samples "${S[@]}"; then
        echo "== table4 $syn: skipped, a synthetic folder has no samples (see its tally.json)"; continue
      fi
      for seed in "${SEEDS[@]}"; do
        spawn "table4-n$n-$syn-s$seed" "$PY" train_seg.py --data toy --data-root "$DATA_ROOT" "${S[@]}" --max-real-samples "$n" \
          --seed "$seed" --max-steps "$TABLE_STEPS" --output-dir "$WORK/runs/table4/n$n-$syn-s$seed" "${SEG_ARGS[@]}"
      done
    done
  done
  join
  if [ "$DRY" = 0 ]; then "$PY" -m common.report.run "$WORK" --data toy --preset toy; fi
  exit 0
fi

# The chain's stage markers carry no dataset: one WORK holds one --data's chain (WORK/.data names it).
if [ "$DRY" = 0 ]; then
  if [ -s "$WORK/.data" ] && [ "$(cat "$WORK/.data")" != "$DATA" ]; then
    echo "reproduce.sh: --work $WORK already holds the --data $(cat "$WORK/.data") chain (its finished stages, marked in $DONE," \
         "would be skipped for --data $DATA); give --data $DATA its own --work" >&2
    exit 2
  fi
  echo "$DATA" > "$WORK/.data"
fi
if [ "$PRESET" = tiny ]; then
  for kind in sdxl mask2former; do stage "tiny-$kind" "$PY" -m common.models.tiny "$kind" "$TINY/$kind"; done
fi
stage caption "${LAUNCH_MANY[@]}" caption.py --data "$DATA" --data-root "$DATA_ROOT" --split train --out "$CAPTIONS" "${CAPTION_ARGS[@]}"
if [ "$DATA" = ade20k ] || [ "$COCO_MASKSYN" = 1 ]; then  # Text2Mask serves MaskSyn only: COCO trains it with --coco-masksyn
# shellcheck disable=SC2046
stage train-text2mask "${LAUNCH[@]}" train_text2mask.py --data "$DATA" --data-root "$DATA_ROOT" --captions "$CAPTIONS" \
  --output-dir "$T2M" "${GEN_TRAIN_ARGS[@]}" $(resume_if_checkpoint "$T2M")
fi
# shellcheck disable=SC2046
stage train-mask2img "${LAUNCH[@]}" train_mask2img.py --data "$DATA" --data-root "$DATA_ROOT" --captions "$CAPTIONS" \
  --output-dir "$M2I" "${GEN_TRAIN_ARGS[@]}" $(resume_if_checkpoint "$M2I")
# COCO: ImgSyn only in the paper (§4.1; A.2 leaves instance recovery open). --coco-masksyn adds MaskSyn,
# its instances recovered from the edge-coloured maps (common/masks/colormap.py: color_to_panoptic), beyond the paper.
if [ "$DATA" = ade20k ] || [ "$COCO_MASKSYN" = 1 ]; then
  stage masksyn "${LAUNCH_MANY[@]}" masksyn.py --data "$DATA" --captions "$CAPTIONS" --text2mask "$T2M" --mask2img "$M2I" \
    --out "$MASKSYN" "${MASKSYN_ARGS[@]}"
fi
stage imgsyn "${LAUNCH_MANY[@]}" imgsyn.py --data "$DATA" --data-root "$DATA_ROOT" --split train --captions "$CAPTIONS" \
  --mask2img "$M2I" --out "$IMGSYN" "${IMGSYN_ARGS[@]}"
SYNTH=(--synthetic "$IMGSYN")
if [ "$DATA" = ade20k ] || [ "$COCO_MASKSYN" = 1 ]; then SYNTH+=(--synthetic "$MASKSYN"); fi
seg_run() {  # seg_run NAME RUN_FOLDER TRAIN_SEG_FLAGS...: one segmentation run of the plain chain
  local name=$1 out=$2; shift 2
  # shellcheck disable=SC2046
  stage "$name" "${LAUNCH[@]}" train_seg.py --data "$DATA" --data-root "$DATA_ROOT" "$@" --output-dir "$out" "${SEG_ARGS[@]}" $(resume_if_checkpoint "$out")
}
if [ "$DATA" = ade20k ]; then  # Table 1: real against SegGen's synthetic augmentation (§3.4), single- and multi-scale
  MS=(); if [ "$PRESET" = paper ]; then MS=(--multiscale); fi
  seg_run seg-real "$SEG_REAL" --task semantic --strategy real "${MS[@]}"
  seg_run "seg-$SEG_STRATEGY" "$SEG_SYN" --task semantic --strategy "$SEG_STRATEGY" --p-aug 0.6 "${SYNTH[@]}" "${MS[@]}"
else  # Tables 2/3: panoptic and instance, each the real 50+50-epoch baseline against synthetic pre-training + real fine-tuning
  PRE=(); if [ "$PRESET" = paper ]; then PRE=(--pretrain-steps "$SEG_STEPS"); fi
  for task in panoptic instance; do
    sfx=""; [ "$task" = panoptic ] || sfx=-$task
    seg_run "seg-real$sfx" "$SEG_REAL$sfx" --task "$task" --strategy real-pretrain "${PRE[@]}"
    seg_run "seg-$SEG_STRATEGY$sfx" "$SEG_SYN$sfx" --task "$task" --strategy "$SEG_STRATEGY" "${SYNTH[@]}" "${PRE[@]}"
  done
fi
if [ "$DRY" = 0 ]; then
  "$PY" -m common.report.run "$WORK" --data "$DATA" --preset "$PRESET"
fi
