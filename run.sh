#!/usr/bin/env bash
# run.sh: the whole RA3 pipeline against its NTP baseline and an oracle, each stage in turn, for one or more seeds.
#
# On minicode (--data minicode-...: the world knows every trace's true plan):
#   NTP     mstep.py on the raw mid-training traces                                 -> OUT/seedS/ntp
#   oracle  mstep.py on the same traces with the world's true plan comments (same budget)  -> .../oracle
#   RA3     K times: estep.py (q learns where and what to think, annotates the traces)
#                    then mstep.py on the latent-infused traces (same token budget as NTP in total)  -> .../ra3
#   eval    eval_code.py on each model (held-out benchmark: pass@k, think rate)    -> .../eval-*
#   CE      mstep.py --steps 0: each model's cross-entropy on held-out expert code  -> .../ce-*
#   ELBO    estep.py --steps 0: each model's ELBO with its own comments             -> .../elbo-*
#   RLVR    rlvr.py from NTP, oracle and RA3 with the same settings (held-out curve) -> .../rl-*
# On real code (any other --data: stdlib, DIR, hf:NAME; the expert's full-line comments are the true plan):
#   RA3     one EM iteration (K=1): estep.py on stripped:DATA with --explore; it annotates the code and
#           writes it also bare and with the expert's comments                       -> .../ra3/e1
#   NTP, oracle, RA3   mstep.py --epochs 1 from the base on those three corpora: the same code  -> .../ntp, oracle, ra3/m1
#   CE, ELBO  as above, on the held-out files of stripped:DATA (never trained on)   -> .../ce-*, elbo-*
#   eval    only with --bench; no RLVR
# Then
#   report  report.py: OUT/results.md (per seed, and mean +- sd over seeds) and the figures, OUT/*.png
#
# Each stage records what it ran (command, code, the stages it read) in its folder. A rerun skips a stage
# that finished exactly that, resumes one that was killed, and stops at one that finished something else
# (other flags, other code, an input that changed) unless --fresh says to redo it.
#
#   bash run.sh                       # embedded default: minicode-chain-base on the chain world, ~10 min on 2 CPU cores
#   bash run.sh --world plain         # the plain world, where no comment pays: minicode-base, ~7 min
#   bash run.sh --seeds 3 --eval-n 10 --eval-limit 200 --rl-steps 30   # the experiment of LOG.md
#   bash run.sh --long                # a longer, stronger run
#   bash run.sh --model smollm2 --data stdlib --cpu-bf16   # real code: base, NTP, oracle, RA3 on CPython's stdlib
#   bash run.sh --gpus 8 --model Qwen/Qwen2.5-1.5B --data hf:/data/code.jsonl --bench humaneval+ \
#       --long                        # real code, torchrun all the way down
# Flags: --world W (minicode: chain (default), plain, ...; each sets the four below) --model SPEC --data CORPUS --bench NAME
#        --problems NAME --gpus N --k K --penalty C --mask-latents --seed S
#        --seeds N --eval-n N (samples per task; 1 = greedy) --eval-limit N --rl-steps N --out DIR --fresh --long --tiny
#        --cpu-bf16 --explore E (real code: the share of lines the E-step probes with comments; 0.2)
set -euo pipefail
cd "$(dirname "$0")"

WORLD=chain MODEL= DATA= BENCH= PROBLEMS=
GPUS=0 K= PENALTY=0.05 SEED=0 SEEDS=1 EVAL_N=1 EVAL_LIMIT= OUT= SIZE=default MASK= FRESH= RL_STEPS= BF16= EXPLORE=
while [ $# -gt 0 ]; do
  case "$1" in
    --world) WORLD=$2; shift 2 ;;   # a minicode world: its shipped base model, corpus, benchmark and problems
    --model) MODEL=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --bench) BENCH=$2; shift 2 ;;
    --problems) PROBLEMS=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --k) K=$2; shift 2 ;;
    --penalty) PENALTY=$2; shift 2 ;;
    --explore) EXPLORE=$2; shift 2 ;;
    --mask-latents) MASK=--mask-latents; shift ;;   # RA3's M-step: no loss on the comment tokens
    --seed) SEED=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --eval-n) EVAL_N=$2; shift 2 ;;
    --eval-limit) EVAL_LIMIT=$2; shift 2 ;;
    --rl-steps) RL_STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --fresh) FRESH=1; shift ;;    # redo stages that finished with other settings or code
    --cpu-bf16) BF16=--cpu-bf16; shift ;;   # the trainers in bf16 on a CPU that has it (about 2x faster)
    --long) SIZE=long; shift ;;
    --tiny) SIZE=tiny; shift ;;   # a smoke test of the wiring (CI), not an experiment
    -h|--help) sed -n 2,36p "$0"; exit 0 ;;
    *) echo "run.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $WORLD in  # --model, --data, --bench and --problems override the world's own
  plain|chain) W=${WORLD/#plain/}; W=${W:+$W-}; MODEL=${MODEL:-minicode-${W}base} ;;
  echo|anon|echo+anon|skills|arith) W=$WORLD-
    [ -n "$MODEL" ] || { echo "run.sh: no base model ships for the $WORLD world: pass --model (worlds.sh trains one)" >&2; exit 2; } ;;
  *) echo "run.sh: --world is plain, chain, echo, anon, echo+anon, skills or arith, not '$WORLD'" >&2; exit 2 ;;
esac
DATA=${DATA:-minicode-${W}midtrain} PROBLEMS=${PROBLEMS:-minicode-${W}train}
REAL=; [[ "$DATA" == minicode-* ]] || REAL=1  # real code: the expert's full-line comments are its true plan
if [ -n "$REAL" ]; then K=${K:-1} EXPLORE=${EXPLORE:-0.2}  # and pass@k only if --bench names a benchmark
else K=${K:-2} BENCH=${BENCH:-minicode-${W}heldout}
fi

# Budgets. M-step steps are split over the K EM iterations, so RA3 trains on as many tokens as NTP.
# MSHARE: share of the traces the M-step holds out for its own eval loss. E-step: ESTEPS updates of EB traces x EG
# rollouts; it skips traces of more than ELINES lines; EMICRO rollouts per forward (a real model's long traces
# need few); its instruments run on EHELD held-out traces every EEVERY updates. EVAL: held-out tasks for
# eval_code.py and for rlvr.py's greedy curve (every RLEVERY steps).
case $SIZE in
  tiny)    TASKS=60    MSTEPS=4   BATCH=2048  MSHARE=0    ESTEPS=1  EB=4  EG=4 ELINES=16 EMICRO=8  EHELD=8  EEVERY=1  ANN=40    EVAL=4   RLSTEPS=1   RLEVERY=1  RLP=2  NEW=160 ;;
  default) TASKS=1000  MSTEPS=40  BATCH=8192  MSHARE=0.02 ESTEPS=40 EB=8  EG=8 ELINES=64 EMICRO=64 EHELD=64 EEVERY=10 ANN=1000  EVAL=100 RLSTEPS=8   RLEVERY=2  RLP=8  NEW=256 ;;
  long)    TASKS=10000 MSTEPS=400 BATCH=32768 MSHARE=0.02 ESTEPS=60 EB=32 EG=8 ELINES=64 EMICRO=8  EHELD=256 EEVERY=10 ANN=10000 EVAL=500 RLSTEPS=100 RLEVERY=10 RLP=32 NEW=256 ;;
esac
# Real code: one EM iteration; each M-step is one pass over the traces the E-step annotated (ANN), so NTP, the
# oracle and RA3 read the same code and MSTEPS, TASKS and MSHARE do not apply.
if [ -n "$REAL" ]; then
  case $SIZE in
    tiny)    BATCH=2048  ESTEPS=1  EB=2  EG=2 ELINES=16 EMICRO=8  EHELD=4   EEVERY=1  ANN=16 ;;
    default) BATCH=8192  ESTEPS=30 EB=8  EG=4 ELINES=24 EMICRO=32 EHELD=64  EEVERY=5  ANN=256 ;;
    long)    BATCH=16384 ESTEPS=60 EB=16 EG=8 ELINES=32 EMICRO=32 EHELD=128 EEVERY=10 ANN=4096 ;;
  esac
fi
OUT=${OUT:-runs/$([ "$SIZE" = default ] && echo pipeline || echo "$SIZE")}  # --tiny never lands in a real run's folder
EVAL_LIMIT=${EVAL_LIMIT:-$EVAL}
if [ -n "$RL_STEPS" ]; then RLSTEPS=$RL_STEPS RLEVERY=$(( RL_STEPS / 6 > 1 ? RL_STEPS / 6 : 1 )); fi
for pair in "k:$K:1" "seeds:$SEEDS:1" "eval-n:$EVAL_N:1" "eval-limit:$EVAL_LIMIT:1" "gpus:$GPUS:0" "seed:$SEED:0" \
            "rl-steps:$RLSTEPS:1"; do
  IFS=: read -r flag value least <<< "$pair"
  [[ "$value" =~ ^[0-9]+$ ]] && [ "$value" -ge "$least" ] || { echo "run.sh: --$flag must be an integer >= $least, not '$value'" >&2; exit 2; }
done
[[ "$PENALTY" =~ ^[0-9]*\.?[0-9]+$ ]] || { echo "run.sh: --penalty must be a number >= 0, not '$PENALTY'" >&2; exit 2; }
[[ -z "$EXPLORE" || "$EXPLORE" =~ ^[0-9]*\.?[0-9]+$ ]] \
  || { echo "run.sh: --explore must be a number in [0, 1], not '$EXPLORE'" >&2; exit 2; }  # estep.py checks the 1
[ -z "$REAL" ] || [ "$K" -eq 1 ] \
  || { echo "run.sh: real code runs one EM iteration (--k 1), not --k $K" >&2; exit 2; }
EPK=$(( MSTEPS / K ))
[ "$EPK" -ge 1 ] || { echo "run.sh: --k $K is more than the $MSTEPS M-step steps" >&2; exit 2; }
if [ "$EVAL_N" -gt 1 ]; then SAMPLING="--n $EVAL_N --temperature 0.8 --k 1,$(( EVAL_N < 5 ? EVAL_N : 5 ))"
else SAMPLING="--n 1 --temperature 0"
fi

if [ "$GPUS" -gt 0 ]; then launch() { torchrun --nproc_per_node="$GPUS" --master_port="${MASTER_PORT:-29511}" "$@"; }
else launch() { python "$@"; }
fi
stage() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
ORACLE=; [[ "$DATA" =~ ^minicode-(.*-)?midtrain$ ]] && ORACLE=1  # minicode knows every trace's true plan
# The chain world: its workings run to 80 tokens (cut, they are no help); at q's usual learning rate RL noise wears
# the 1.25M model's arithmetic down within 10 updates (chosen on its held-out traces); the M-step keeps the habit of
# working a chain out only if nearly every trace shows it, which one rollout of q at temperature 0.5 writes and the
# gain filter does not (sampled dev pass@1 0.91 against 0.67); rlvr.py's lr 2e-5 lowers every start's dev pass@1
# over 30 steps, where 5e-6 leaves it about flat (all chosen on dev: LOG 2026-12-06, 2026-12-07)
LATENT=32 ELR=1e-4 ANNOTATE= RLLR=
[[ "$DATA" == minicode-chain-* ]] && LATENT=96 ELR=3e-5 ANNOTATE="--annotate one --annotate-temperature 0.5" RLLR=5e-6
CODE=$(cat model.py data.py minicode.py flags.py estep.py mstep.py rlvr.py eval_code.py | sha1sum | cut -c1-12)

stage_key() {  # what a stage's result depends on: the code, its command, and the stages whose outputs it reads
  local arg key="$CODE $*"
  for arg in "$@"; do
    if [ -f "$(dirname -- "$arg")/stage.key" ]; then key="$key $(cat "$(dirname -- "$arg")/stage.key")"; fi
  done
  echo "$key" | sha1sum | cut -c1-16
}

run_in() {  # run_in DIR CMD...: the stage whose outputs go to DIR; skipped when DIR finished this very stage
  local dir=$1; shift
  local key; key=$(stage_key "$@")
  if [ -f "$dir/summary.json" ]; then
    if [ "$(cat "$dir/stage.key" 2>/dev/null)" = "$key" ]; then echo "    done already: $dir"; return 0; fi
    if [ -z "$FRESH" ]; then
      { echo "run.sh: $dir holds a finished run of something else. It ran:"
        echo "    $(cat "$dir/stage.cmd" 2>/dev/null || echo '(unrecorded: an older run.sh)')"
        echo "  this run would run:"
        echo "    $*"
        echo "  (if the two read the same, the code or a stage it reads has changed)."
        echo "  Choose another --out, or pass --fresh to redo such stages."; } >&2
      exit 2
    fi
    rm -rf "$dir"
  fi
  mkdir -p "$dir"
  echo "$*" > "$dir/stage.cmd"
  "$@"
  echo "$key" > "$dir/stage.key"
}

pipeline() {  # one seed: pipeline SEED DIR
  local seed=$1 dir=$2 pi=$MODEL k name m models="base ntp ra3"
  local mstep_args="--n-tasks $TASKS --batch-tokens $BATCH --seed $seed --eval-share $MSHARE --eval-every $MSTEPS --resume $BF16
    --save-every $(( MSTEPS / 4 > 1 ? MSTEPS / 4 : 1 ))"
  mkdir -p "$dir"

  stage "seed $seed: NTP baseline, $MSTEPS M-step steps on raw traces"
  run_in "$dir/ntp" launch mstep.py --model "$MODEL" --data "$DATA" --steps "$MSTEPS" $mstep_args --out "$dir/ntp"

  if [ -n "$ORACLE" ]; then  # the world knows the true plan: what any latents could buy
    models="base ntp oracle ra3"
    stage "seed $seed: oracle, $MSTEPS M-step steps on the traces with their true plan comments"
    run_in "$dir/oracle" launch mstep.py --model "$MODEL" --data "$DATA-oracle" --steps "$MSTEPS" \
      $mstep_args $MASK --out "$dir/oracle"
  fi

  for k in $(seq 1 "$K"); do
    stage "seed $seed: RA3 EM iteration $k/$K, E-step (penalty c = $PENALTY, $ESTEPS updates)"
    run_in "$dir/ra3/e$k" launch estep.py --model "$pi" --data "$DATA" --n-tasks "$TASKS" --steps "$ESTEPS" \
      --batch-traces "$EB" --group "$EG" --max-lines "$ELINES" --micro-rows "$EMICRO" --penalty "$PENALTY" \
      --max-latent "$LATENT" --lr "$ELR" $ANNOTATE --eval-traces "$EHELD" --eval-every "$EEVERY" --annotate-limit "$ANN" --seed $(( seed * 100 + k )) \
      ${EXPLORE:+--explore "$EXPLORE"} --resume --save-every 10 $BF16 --out "$dir/ra3/e$k"
    stage "seed $seed: RA3 EM iteration $k/$K, M-step ($EPK steps)"
    run_in "$dir/ra3/m$k" launch mstep.py --model "$pi" --data "$dir/ra3/e$k/traces.jsonl" --steps "$EPK" \
      $mstep_args $MASK --out "$dir/ra3/m$k"
    pi=$dir/ra3/m$k/model
  done

  for name in $models; do
    case $name in base) m=$MODEL ;; ra3) m=$pi ;; *) m=$dir/$name/model ;; esac
    stage "seed $seed: eval $name on $BENCH ($EVAL_LIMIT tasks, $SAMPLING)"
    run_in "$dir/eval-$name" python eval_code.py --model "$m" --bench "$BENCH" --limit "$EVAL_LIMIT" $SAMPLING \
      --seed "$seed" --max-new-tokens "$NEW" --out "$dir/eval-$name"
    case $BENCH in minicode-*)  # expert solutions exist only for minicode's held-out tasks
      stage "seed $seed: cross-entropy of $name on held-out expert code"
      run_in "$dir/ce-$name" launch mstep.py --model "$m" --data "$BENCH" --n-tasks "$EVAL_LIMIT" --steps 0 \
        --eval-share 1 --mask-prompt --out "$dir/ce-$name" ;;
    esac
    if [ -n "$ORACLE" ]; then  # CE alone penalises a model that comments: its ELBO with its own comments
      stage "seed $seed: ELBO of $name on held-out mid-training traces, its own comments"
      run_in "$dir/elbo-$name" python estep.py --model "$m" --data "$DATA" --steps 0 --penalty 0 --n-tasks "$EHELD" \
        --max-latent "$LATENT" --eval-traces "$EHELD" --annotate-limit 1 --seed "$seed" --out "$dir/elbo-$name"
    fi
  done

  for name in ${models#base }; do
    case $name in ra3) m=$pi ;; *) m=$dir/$name/model ;; esac
    stage "seed $seed: RLVR from $name, $RLSTEPS steps"
    run_in "$dir/rl-$name" launch rlvr.py --model "$m" --problems "$PROBLEMS" --eval-bench "$BENCH" \
      --eval-limit "$EVAL" --steps "$RLSTEPS" --eval-every "$RLEVERY" --batch-prompts "$RLP" --max-new-tokens "$NEW" \
      ${RLLR:+--lr "$RLLR"} --seed "$seed" --resume $BF16 --out "$dir/rl-$name"
  done
}

real_pipeline() {  # one seed on real code: real_pipeline SEED DIR
  local seed=$1 dir=$2 e=$2/ra3/e1 name m
  local mstep_args="--epochs 1 --batch-tokens $BATCH --seed $seed --eval-share 0 --resume $BF16 --save-every 10"
  mkdir -p "$dir"

  stage "seed $seed: RA3 E-step on stripped:$DATA (c = $PENALTY, explore $EXPLORE, $ESTEPS updates), annotating $ANN traces"
  run_in "$e" launch estep.py --model "$MODEL" --data "stripped:$DATA" --steps "$ESTEPS" --batch-traces "$EB" \
    --group "$EG" --max-lines "$ELINES" --micro-rows "$EMICRO" --penalty "$PENALTY" --explore "$EXPLORE" \
    --eval-traces "$EHELD" --eval-every "$EEVERY" --annotate-limit "$ANN" --seed $(( seed * 100 + 1 )) \
    --resume --save-every 10 $BF16 --out "$e"

  # the E-step wrote the traces it annotated three ways: one epoch of each is the same code for all three
  stage "seed $seed: NTP, one epoch of those traces without comments"
  run_in "$dir/ntp" launch mstep.py --model "$MODEL" --data "$e/stripped.jsonl" $mstep_args --out "$dir/ntp"
  stage "seed $seed: oracle, one epoch of the same traces with the expert's comments"
  run_in "$dir/oracle" launch mstep.py --model "$MODEL" --data "$e/oracle.jsonl" $mstep_args $MASK --out "$dir/oracle"
  stage "seed $seed: RA3 M-step, one epoch of the same traces with q's comments"
  run_in "$dir/ra3/m1" launch mstep.py --model "$MODEL" --data "$e/traces.jsonl" $mstep_args $MASK --out "$dir/ra3/m1"

  for name in base ntp oracle ra3; do
    case $name in base) m=$MODEL ;; ra3) m=$dir/ra3/m1/model ;; *) m=$dir/$name/model ;; esac
    if [ -n "$BENCH" ]; then
      stage "seed $seed: eval $name on $BENCH ($EVAL_LIMIT tasks, $SAMPLING)"
      run_in "$dir/eval-$name" python eval_code.py --model "$m" --bench "$BENCH" --limit "$EVAL_LIMIT" $SAMPLING \
        --seed "$seed" --max-new-tokens "$NEW" --out "$dir/eval-$name"
    fi
    # held out: the files the E-step measured on (mstep.py --eval-share 0.05), so no M-step trained on them
    stage "seed $seed: cross-entropy of $name on held-out code without its comments"
    run_in "$dir/ce-$name" launch mstep.py --model "$m" --data "stripped:$DATA" --steps 0 --eval-share 0.05 \
      --mask-prompt --out "$dir/ce-$name"
    stage "seed $seed: ELBO of $name on held-out code, its own comments"
    run_in "$dir/elbo-$name" python estep.py --model "$m" --data "stripped:$DATA" --steps 0 --penalty 0 \
      --eval-traces "$EHELD" --max-lines "$ELINES" --micro-rows "$EMICRO" --annotate-limit 1 --seed "$seed" \
      --out "$dir/elbo-$name"
  done
}

mkdir -p "$OUT"
if [ -n "$REAL" ]; then
  echo "run.sh $SIZE, real code: model $MODEL, data stripped:$DATA (the expert's comments as the true plan), \
bench ${BENCH:-none}${BENCH:+ ($EVAL_LIMIT tasks, eval-n $EVAL_N)}; K=1, c=$PENALTY, explore $EXPLORE\
${MASK:+, masked latents}, E-step $ESTEPS updates of B=$EB x G=$EG on traces of at most $ELINES lines, \
$EHELD held-out traces; M-steps one epoch of the $ANN annotated traces in batches of $BATCH tokens; no RLVR; \
seeds $SEED..$(( SEED + SEEDS - 1 ))${BF16:+; trainers in bf16}; code $CODE" > "$OUT/settings.txt"
else
  echo "run.sh $SIZE: model $MODEL, data $DATA, bench $BENCH ($EVAL_LIMIT tasks, eval-n $EVAL_N), RLVR on $PROBLEMS; K=$K, \
c=$PENALTY${MASK:+, masked latents}, E-step $ESTEPS updates of B=$EB x G=$EG; M-step $MSTEPS steps of $BATCH tokens; \
seeds $SEED..$(( SEED + SEEDS - 1 ))${BF16:+; trainers in bf16}; code $CODE" > "$OUT/settings.txt"
fi
for seed in $(seq "$SEED" $(( SEED + SEEDS - 1 ))); do
  if [ -n "$REAL" ]; then real_pipeline "$seed" "$OUT/seed$seed"; else pipeline "$seed" "$OUT/seed$seed"; fi
done

stage "report"
python report.py "$OUT"
