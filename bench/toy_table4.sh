#!/usr/bin/env bash
# Issue 24: the toy Table 4 and the paper's other knobs, on a finished toy run's world and synthetic folders.
#
#   bench/toy_table4.sh RUN OUT ROW...
#
# RUN is a finished `./reproduce.sh --preset toy --work RUN` (any --size): its world, synth/imgsyn-toy,
# synth/masksyn-toy and, for the oracle rows, synth/oracle-{real,vae}-toy (bench/toy.py oracle). Each ROW
# trains HRNet-small once per N and seed into OUT/n{N}-{ROW}-s{SEED}/ (metrics.json: mIoU and per-class
# IoU); finished runs are skipped, two run side by side, one torch thread each. ROW is one of
#   real                              --strategy real (the baseline)
#   imgsyn masksyn both               --strategy aug --p-aug $P_AUG with RUN's ImgSyn / MaskSyn / both
#   oracle-real oracle-vae oracle-down2   the same with a perfect generator's folder (bench/toy.py oracle)
#   imgsyn-subset masksyn-subset both-subset   with $SUBSET_RUN's folders (generators trained on the N samples)
#   ROW-pNN                           ROW at --p-aug 0.NN (Fig. 7's sweep), e.g. both-p20
#   ROW-pretrain                      --strategy pretrain: ROW's synthetic data for $STEPS, then real for $STEPS
#   real-pretrain                     --strategy real-pretrain: real for $STEPS, then real for $STEPS (Table 6's baseline)
#   ROW-kK                            only the first K samples per source of each folder (FOLDER:K, Fig. 8)
# Settings (environment): N ("50 400"), SEEDS ("0 1 2"), STEPS (1600), P_AUG (0.6), SUBSETS ("": N random
# samples per seed, --max-real-samples; a folder: SUBSETS/n{N}.txt, one fixed subset, --real-subset, as
# python -m common.subset writes), SUBSET_RUN, JOBS (2).
# Then: python bench/toy_table4.py OUT  (OUT/table4.md, OUT/table4.json).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2; }
RUN=$1 OUT=$2; shift 2
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$(pwd) HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE SEGGEN_THREADS=1
N=${N:-50 400} SEEDS=${SEEDS:-0 1 2} STEPS=${STEPS:-1600} P_AUG=${P_AUG:-0.6} JOBS=${JOBS:-2}
SUBSETS=${SUBSETS:-} SUBSET_RUN=${SUBSET_RUN:-}
S=$RUN/synth
folders() {  # folders KIND: the --synthetic flags of a row kind
  local from=$S
  case $1 in *-subset) [ -n "$SUBSET_RUN" ] || { echo "bench/toy_table4.sh: row $1 needs SUBSET_RUN=a run of generators on the N samples" >&2; exit 2; }
                       from=$SUBSET_RUN/synth ;; esac
  case ${1%-subset} in
    imgsyn) echo "--synthetic $from/imgsyn-toy$K" ;; masksyn) echo "--synthetic $from/masksyn-toy$K" ;;
    both) echo "--synthetic $from/imgsyn-toy$K --synthetic $from/masksyn-toy$K" ;;
    oracle-real|oracle-vae|oracle-down2) echo "--synthetic $S/${1}-toy$K" ;;
    *) echo "bench/toy_table4.sh: unknown row $1 (see bench/toy_table4.sh's header)" >&2; exit 2 ;;
  esac
}
args() {  # args ROW: train_seg's data flags for a row name
  local row=$1 p=$P_AUG; K=""
  if [[ $row =~ ^(.*)-k([0-9]+)$ ]]; then row=${BASH_REMATCH[1]}; K=:${BASH_REMATCH[2]}; fi
  if [[ $row =~ ^(.*)-p([0-9]+)$ ]]; then row=${BASH_REMATCH[1]}; p=0.${BASH_REMATCH[2]}; fi
  case $row in
    real) echo "--strategy real" ;;
    real-pretrain) echo "--strategy real-pretrain --pretrain-steps $STEPS" ;;
    *-pretrain) echo "--strategy pretrain --pretrain-steps $STEPS $(folders "${row%-pretrain}")" ;;
    *) echo "--strategy aug --p-aug $p $(folders "$row")" ;;
  esac
}
mkdir -p "$OUT"
jobs=$OUT/jobs.txt
: > "$jobs"
for row in "$@"; do
  a=$(args "$row")
  for n in $N; do
    if [ -n "$SUBSETS" ]; then pick="--real-subset $SUBSETS/n$n.txt"; else pick="--max-real-samples $n"; fi
    for seed in $SEEDS; do
      dir=$OUT/n$n-$row-s$seed
      [ -f "$dir/metrics.json" ] && continue
      echo "$PY train_seg.py --data toy --data-root $RUN/world $a $pick --seed $seed --max-steps $STEPS --output-dir $dir \
--backbone hrnet-small --batch-size 8 --num-workers 0 --checkpoint-every 0 --log-every 100 > $dir.log 2>&1" >> "$jobs"
    done
  done
done
echo "bench/toy_table4.sh: $(wc -l < "$jobs") runs to do ($JOBS at a time), list in $jobs"
start=$(date +%s)
tr '\n' '\0' < "$jobs" | xargs -0 -P "$JOBS" -I{} bash -c '{} || echo "FAILED: {}" >&2'
echo "bench/toy_table4.sh: $(( $(date +%s) - start )) s wall; load $(cut -d' ' -f1-3 /proc/loadavg)"
