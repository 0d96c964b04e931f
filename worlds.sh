#!/usr/bin/env bash
# worlds.sh: in which minicode world does latent intent pay? The oracle (an M-step on the traces with their
# true plan comments) bounds what any latents can buy; RA3 is worth comparing only where it beats NTP.
# For each world, side by side:
#   base    mstep.py --init scratch on the world's pretraining corpus (docs/mstep.md's base-model command)
#   ntp     mstep.py from that base on the raw mid-training traces          } run.sh's default budget,
#   oracle  mstep.py from that base on the same traces with the true plan   } --seeds of each
#   eval    greedy pass@1 on the world's dev split: held-out compositions that the test tasks
#           (minicode-heldout) never use, so the world is chosen without looking at the test tasks
# and prints oracle - NTP per world. Meant for a GPU (the base model is 106 s on an H200, ~3.5 h on 2 CPU
# cores in fp32); --base-steps trades quality for time. On a CPU: --serial (one job at a time, not every
# world and seed side by side) and --cpu-bf16 (the trainers in bf16: a base model in about 55 minutes on 2
# cores with AVX512-BF16). A stage whose summary.json exists is reused as it is, so after changing a world
# (its lengths, its text) write to a new --out, or the table mixes the old world's runs with the new one's.
#
#   bash worlds.sh                                   # echo, anon and echo+anon, 3 seeds, into runs/worlds
#   bash worlds.sh --worlds "plain echo" --seeds 1 --base-steps 100 --out runs/worlds-quick
#   bash worlds.sh --worlds anon --hidden 256 --layers 8 --out runs/worlds-256    # an 8.1M-parameter base
#   bash worlds.sh --worlds skills --out runs/worlds-skills   # docstrings name skills, comments expand them
#   bash worlds.sh --worlds skills --serial --cpu-bf16 --out runs/worlds-cpu     # the same on a 2-core CPU
#   bash worlds.sh --worlds arith --serial --cpu-bf16 --out runs/worlds-arith   # parameters as sums
set -euo pipefail
cd "$(dirname "$0")"

WORLDS="echo anon echo+anon" SEEDS=3 BASE_STEPS=800 DEV=200 OUT=runs/worlds HIDDEN=128 LAYERS=4 SERIAL="" BF16=""
while [ $# -gt 0 ]; do
  case "$1" in
    --worlds) WORLDS=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --base-steps) BASE_STEPS=$2; shift 2 ;;
    --hidden) HIDDEN=$2; shift 2 ;;   # base model size: hidden width (heads of 32) and layers
    --layers) LAYERS=$2; shift 2 ;;
    --dev) DEV=$2; shift 2 ;;     # dev tasks to evaluate on
    --out) OUT=$2; shift 2 ;;
    --serial) SERIAL=1; shift ;;
    --cpu-bf16) BF16=--cpu-bf16; shift ;;
    -h|--help) sed -n 2,21p "$0"; exit 0 ;;
    *) echo "worlds.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done

in_turn() {  # run a job now (--serial) or in the background
  if [ -n "$SERIAL" ]; then "$@"; else "$@" & fi
}

m_step() {  # m_step WORLD ntp|oracle SEED: one M-step from the world's base, then its dev evals
  local w=$1 name=$2 seed=$3 dir=$OUT/$1 split data="minicode-$1-midtrain"
  [ "$name" = oracle ] && data="$data-oracle"
  { [ -f "$dir/$name$seed/summary.json" ] || python mstep.py --model "$dir/base/model" --data "$data" $BF16 --resume \
      --n-tasks 1000 --steps 40 --batch-tokens 8192 --seed "$seed" --eval-share 0.02 --eval-every 40 \
      --out "$dir/$name$seed"
    for split in dev dev-long; do
      [ -f "$dir/$split-$name$seed/summary.json" ] || python eval_code.py --model "$dir/$name$seed/model" \
        --bench "minicode-$w-$split" --limit "$DEV" --n 1 --temperature 0 --max-new-tokens 320 --seed "$seed" \
        --out "$dir/$split-$name$seed"
    done; } > "$dir/$name$seed.log" 2>&1
}

one_world() {  # one_world WORLD: base, then NTP and oracle per seed, then their dev evals
  local w=$1 dir=$OUT/$1 seed name
  mkdir -p "$dir"
  [ -f "$dir/base/summary.json" ] || python mstep.py --init scratch --data "minicode-$w-pretrain" --n-tasks 100000 \
    --hidden "$HIDDEN" --layers "$LAYERS" --heads $(( HIDDEN / 32 )) --kv-heads 2 --vocab-size 1024 --seq-len 512 --batch-tokens 65536 \
    --micro-rows 128 --steps "$BASE_STEPS" --lr 3e-3 --warmup 40 --eval-every 100 --save-every 50 $BF16 --resume \
    --out "$dir/base" > "$dir/base.log" 2>&1
  for seed in $(seq 0 $(( SEEDS - 1 ))); do
    for name in ntp oracle; do in_turn m_step "$w" $name "$seed"; done
  done
  wait
}

for w in $WORLDS; do in_turn one_world "$w"; done
wait

python report.py "$OUT" --worlds $WORLDS   # the tables, also written to OUT/worlds.md
