#!/usr/bin/env bash
# run.sh: the whole RA3 pipeline against its NTP baseline, each stage in turn, for one or more seeds.
#
#   NTP    mstep.py on the raw mid-training traces                                  -> OUT/seedS/ntp
#   RA3    K times: estep.py (q learns where and what to think, annotates the traces)
#                   then mstep.py on the latent-infused traces (same token budget as NTP in total)  -> .../ra3
#   eval   eval_code.py on base, NTP and RA3 (held-out benchmark: pass@k, think rate)  -> .../eval-*
#   CE     mstep.py --steps 0: each model's cross-entropy on held-out expert code   -> .../ce-*
#   RLVR   rlvr.py from NTP and from RA3 with the same settings (held-out curve)    -> .../rl-*
#   report OUT/results.md (per seed, and mean +- sd over seeds), OUT/curves.png with matplotlib
#
# A stage whose summary.json exists is skipped, so a killed run picks up where it stopped.
#
#   bash run.sh                       # embedded default: minicode-base on minicode, ~12 min on a 2-core CPU
#   bash run.sh --seeds 3 --eval-n 10 --eval-limit 200     # the experiment of LOG.md (~1 h on 2 CPU cores)
#   bash run.sh --long                # a longer, stronger run
#   bash run.sh --gpus 8 --model Qwen/Qwen2.5-1.5B --data hf:/data/code.jsonl --bench humaneval \
#       --problems mbpp-train --long  # torchrun all the way down
# Flags: --model SPEC --data CORPUS --bench NAME --problems NAME --gpus N --k K --penalty C --mask-latents --seed S
#        --seeds N --eval-n N (samples per task; 1 = greedy) --eval-limit N --out DIR --long --tiny
set -euo pipefail
cd "$(dirname "$0")"

MODEL=minicode-base DATA=minicode-midtrain BENCH=minicode-heldout PROBLEMS=minicode-train
GPUS=0 K=2 PENALTY=0.05 SEED=0 SEEDS=1 EVAL_N=1 EVAL_LIMIT= OUT=runs/pipeline SIZE=default MASK=
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --bench) BENCH=$2; shift 2 ;;
    --problems) PROBLEMS=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --k) K=$2; shift 2 ;;
    --penalty) PENALTY=$2; shift 2 ;;
    --mask-latents) MASK=--mask-latents; shift ;;   # RA3's M-step: no loss on the comment tokens
    --seed) SEED=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --eval-n) EVAL_N=$2; shift 2 ;;
    --eval-limit) EVAL_LIMIT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --long) SIZE=long; shift ;;
    --tiny) SIZE=tiny; shift ;;   # a smoke test of the wiring (CI), not an experiment
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "run.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Budgets. M-step steps are split over the K EM iterations, so RA3 trains on as many tokens as NTP.
# MSHARE: share of the traces the M-step holds out for its own eval loss. E-step: ESTEPS updates of EB traces x EG
# rollouts; it skips traces of more than ELINES lines; EMICRO rollouts per forward (a real model's long traces
# need few). EVAL: held-out tasks for eval_code.py and for rlvr.py's greedy curve (every RLEVERY steps).
case $SIZE in
  tiny)    TASKS=60    MSTEPS=4   BATCH=2048  MSHARE=0    ESTEPS=1  EB=4  EG=4 ELINES=16 EMICRO=8  ANN=40    EVAL=4   RLSTEPS=1   RLEVERY=1  RLP=2  NEW=160 ;;
  default) TASKS=1000  MSTEPS=40  BATCH=8192  MSHARE=0.02 ESTEPS=6  EB=8  EG=8 ELINES=64 EMICRO=64 ANN=1000  EVAL=100 RLSTEPS=8   RLEVERY=2  RLP=8  NEW=256 ;;
  long)    TASKS=10000 MSTEPS=400 BATCH=32768 MSHARE=0.02 ESTEPS=40 EB=32 EG=8 ELINES=64 EMICRO=8  ANN=10000 EVAL=500 RLSTEPS=100 RLEVERY=10 RLP=32 NEW=256 ;;
esac
EVAL_LIMIT=${EVAL_LIMIT:-$EVAL}
EPK=$(( MSTEPS / K ))
[ "$EPK" -ge 1 ] || { echo "run.sh: --k $K is more than the $MSTEPS M-step steps" >&2; exit 2; }
if [ "$EVAL_N" -gt 1 ]; then SAMPLING="--n $EVAL_N --temperature 0.8 --k 1,$(( EVAL_N < 5 ? EVAL_N : 5 ))"
else SAMPLING="--n 1 --temperature 0"
fi

if [ "$GPUS" -gt 0 ]; then launch() { torchrun --nproc_per_node="$GPUS" --master_port="${MASTER_PORT:-29511}" "$@"; }
else launch() { python "$@"; }
fi
stage() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
done_in() { [ -f "$1/summary.json" ] && echo "    done already: $1/summary.json"; }

pipeline() {  # one seed: pipeline SEED DIR
  local seed=$1 dir=$2 pi=$MODEL k name m
  local mstep_args="--n-tasks $TASKS --batch-tokens $BATCH --seed $seed --eval-share $MSHARE --eval-every $MSTEPS --resume
    --save-every $(( MSTEPS / 4 > 1 ? MSTEPS / 4 : 1 ))"
  mkdir -p "$dir"

  stage "seed $seed: NTP baseline, $MSTEPS M-step steps on raw traces"
  done_in "$dir/ntp" || launch mstep.py --model "$MODEL" --data "$DATA" --steps "$MSTEPS" $mstep_args --out "$dir/ntp"

  for k in $(seq 1 "$K"); do
    stage "seed $seed: RA3 EM iteration $k/$K, E-step (penalty c = $PENALTY)"
    done_in "$dir/ra3/e$k" || launch estep.py --model "$pi" --data "$DATA" --n-tasks "$TASKS" --steps "$ESTEPS" \
      --batch-traces "$EB" --group "$EG" --max-lines "$ELINES" --micro-rows "$EMICRO" --penalty "$PENALTY" \
      --annotate-limit "$ANN" --seed $(( seed * 100 + k )) --out "$dir/ra3/e$k"
    stage "seed $seed: RA3 EM iteration $k/$K, M-step ($EPK steps)"
    done_in "$dir/ra3/m$k" || launch mstep.py --model "$pi" --data "$dir/ra3/e$k/traces.jsonl" --steps "$EPK" \
      $mstep_args $MASK --out "$dir/ra3/m$k"
    pi=$dir/ra3/m$k/model
  done

  for name in base ntp ra3; do
    case $name in base) m=$MODEL ;; ntp) m=$dir/ntp/model ;; ra3) m=$pi ;; esac
    stage "seed $seed: eval $name on $BENCH ($EVAL_LIMIT tasks, $SAMPLING)"
    done_in "$dir/eval-$name" || python eval_code.py --model "$m" --bench "$BENCH" --limit "$EVAL_LIMIT" $SAMPLING \
      --seed "$seed" --max-new-tokens "$NEW" --out "$dir/eval-$name"
    case $BENCH in minicode-*)  # expert solutions exist only for minicode's held-out tasks
      stage "seed $seed: cross-entropy of $name on held-out expert code"
      done_in "$dir/ce-$name" || launch mstep.py --model "$m" --data "$BENCH" --n-tasks "$EVAL_LIMIT" --steps 0 --eval-share 1 \
        --mask-prompt --out "$dir/ce-$name" ;;
    esac
  done

  for name in ntp ra3; do
    case $name in ntp) m=$dir/ntp/model ;; ra3) m=$pi ;; esac
    stage "seed $seed: RLVR from $name, $RLSTEPS steps"
    done_in "$dir/rl-$name" || launch rlvr.py --model "$m" --problems "$PROBLEMS" --eval-bench "$BENCH" \
      --eval-limit "$EVAL" --steps "$RLSTEPS" --eval-every "$RLEVERY" --batch-prompts "$RLP" --max-new-tokens "$NEW" \
      --seed "$seed" --resume --out "$dir/rl-$name"
  done
}

for seed in $(seq "$SEED" $(( SEED + SEEDS - 1 ))); do
  pipeline "$seed" "$OUT/seed$seed"
done

stage "report"
python - "$OUT" "$K" <<'EOF'
import json, statistics, sys
from pathlib import Path

TARGET = 0.85  # "steps to reach": the first RLVR step whose held-out greedy pass@1 is at least this
out, k = Path(sys.argv[1]), int(sys.argv[2])
seeds = sorted(out.glob("seed*/"), key=lambda d: int(d.name[4:]))
load = lambda d, p: json.loads((d / p / "summary.json").read_text()) if (d / p / "summary.json").exists() else {}
curve = lambda d, n: [json.loads(x) for x in (d / f"rl-{n}" / "metrics.jsonl").read_text().splitlines()] \
    if (d / f"rl-{n}" / "metrics.jsonl").exists() else []
nan = float("nan")

def row(d, name):
    ev, ce, rl = load(d, f"eval-{name}"), load(d, f"ce-{name}"), curve(d, name)
    evals = [(x["step"], x["eval_pass1"]) for x in rl if "eval_pass1" in x]
    reach = next((s for s, p in evals if p >= TARGET), None)
    return {"pass@1": ev.get("pass@1", nan), "pass@5": ev.get("pass@5", nan), "think rate": ev.get("think_rate", nan),
            "CE on expert code": ce.get("eval_loss", nan),
            "RLVR pass@1 start": evals[0][1] if evals else nan, "RLVR pass@1 end": evals[-1][1] if evals else nan,
            "RLVR think rate end": [x for x in rl if "think_rate" in x][-1]["think_rate"] if rl else nan,
            f"RLVR steps to {TARGET}": nan if not evals or name == "base" else (reach if reach is not None else f">{evals[-1][0]}")}

fmt = lambda v: v if isinstance(v, str) else ("-" if v != v else (f"{v}" if isinstance(v, int) else f"{v:.3f}"))
table = {(d.name, n): row(d, n) for d in seeds for n in ("base", "ntp", "ra3")}
cols = list(next(iter(table.values())))
lines = ["| seed | model | " + " | ".join(cols) + " |", "| --- " * (len(cols) + 2) + "|"]
lines += [f"| {s} | {n} | " + " | ".join(fmt(r[c]) for c in cols) + " |" for (s, n), r in table.items()]
if len(seeds) > 1:
    for n in ("base", "ntp", "ra3"):
        cells = []
        for c in cols:
            v = [table[d.name, n][c] for d in seeds]
            if c.startswith("RLVR steps"):
                cells.append(f"reached in {sum(isinstance(x, int) for x in v)}/{len(v)}" if n != "base" else "-")
                continue
            v = [x for x in v if x == x]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else "-")
        lines.append(f"| mean ± sd ({len(seeds)}) | {n} | " + " | ".join(cells) + " |")
think = [", ".join(f"{load(d, f'ra3/e{i}').get('think_rate', nan):.3f}" for i in range(1, k + 1)) for d in seeds]
text = "\n".join(lines) + "\n\nE-step think rate per EM iteration: " + "; ".join(
    f"{d.name}: {t}" for d, t in zip(seeds, think)) + "\n"
(out / "results.md").write_text(text)
print(text)
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("(matplotlib not installed: no plots)")
    sys.exit(0)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for d in seeds:
    for name, color in (("ntp", "C0"), ("ra3", "C1")):
        m = curve(d, name)
        steps, evals = [x for x in m if "reward" in x], [x for x in m if "eval_pass1" in x]
        label = name if d == seeds[0] else None
        axes[0].plot([x["step"] for x in steps], [x["reward"] for x in steps], color=color, label=label)
        axes[1].plot([x["step"] for x in evals], [x["eval_pass1"] for x in evals], color=color, marker="o", label=label)
        axes[2].plot([x["step"] for x in steps], [x["think_rate"] for x in steps], color=color, label=label)
for ax, title in zip(axes, ("RLVR reward", "held-out greedy pass@1", "think rate of samples")):
    ax.set_title(title)
    ax.set_xlabel("RLVR step")
    ax.legend()
fig.tight_layout()
fig.savefig(out / "curves.png", dpi=120)
print(f"plots: {out / 'curves.png'}")
EOF
