#!/usr/bin/env bash
# run.sh: the whole RA3 pipeline against its NTP baseline, each stage in turn.
#
#   NTP    mstep.py on the raw mid-training traces                                  -> OUT/ntp
#   RA3    K times: estep.py (q learns where and what to think, annotates the traces)
#                   then mstep.py on the latent-infused traces (same token budget as NTP in total)  -> OUT/ra3
#   eval   eval_code.py on base, NTP and RA3 (held-out benchmark)                   -> OUT/eval-*
#   RLVR   rlvr.py from NTP and from RA3 with the same settings                     -> OUT/rl-*
#   report a markdown table (OUT/results.md) and, with matplotlib, OUT/curves.png
#
#   bash run.sh                       # embedded default: minicode-base on minicode, ~15 min on a 2-core CPU
#   bash run.sh --long                # a longer, stronger run
#   bash run.sh --gpus 8 --model Qwen/Qwen2.5-1.5B --data hf:/data/code.jsonl --bench humaneval \
#       --problems mbpp-train --long  # torchrun all the way down
# Flags: --model SPEC --data CORPUS --bench NAME --problems NAME --gpus N --k K --seed S --out DIR --long --tiny
set -euo pipefail
cd "$(dirname "$0")"

MODEL=minicode-base DATA=minicode-midtrain BENCH=minicode-heldout PROBLEMS=minicode-train
GPUS=0 K=2 SEED=0 OUT=runs/pipeline SIZE=default
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --bench) BENCH=$2; shift 2 ;;
    --problems) PROBLEMS=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --k) K=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --long) SIZE=long; shift ;;
    --tiny) SIZE=tiny; shift ;;   # a smoke test of the wiring (CI), not an experiment
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) echo "run.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Budgets. M-step steps are split over the K EM iterations, so RA3 trains on as many tokens as NTP.
case $SIZE in
  tiny)    TASKS=60    MSTEPS=4   BATCH=2048  ESTEPS=1  EB=4  ANN=40   EVAL=4   RLSTEPS=1  RLP=2  NEW=160 ;;
  default) TASKS=1000  MSTEPS=40  BATCH=8192  ESTEPS=6  EB=8  ANN=1000 EVAL=100 RLSTEPS=8  RLP=8  NEW=256 ;;
  long)    TASKS=10000 MSTEPS=400 BATCH=32768 ESTEPS=40 EB=32 ANN=10000 EVAL=500 RLSTEPS=100 RLP=32 NEW=256 ;;
esac
EPK=$(( MSTEPS / K ))
[ "$EPK" -ge 1 ] || { echo "run.sh: --k $K is more than the $MSTEPS M-step steps" >&2; exit 2; }

if [ "$GPUS" -gt 0 ]; then launch() { torchrun --nproc_per_node="$GPUS" --master_port="${MASTER_PORT:-29511}" "$@"; }
else launch() { python "$@"; }
fi
mkdir -p "$OUT"
stage() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
MSTEP="--n-tasks $TASKS --batch-tokens $BATCH --seed $SEED --eval-every $MSTEPS --save-every 1000000"

stage "NTP baseline: $MSTEPS M-step steps on raw traces"
launch mstep.py --model "$MODEL" --data "$DATA" --steps "$MSTEPS" $MSTEP --out "$OUT/ntp"

PI=$MODEL
for k in $(seq 1 "$K"); do
  stage "RA3 EM iteration $k/$K: E-step"
  launch estep.py --model "$PI" --data "$DATA" --n-tasks "$TASKS" --steps "$ESTEPS" --batch-traces "$EB" \
    --annotate-limit "$ANN" --seed $(( SEED + k )) --out "$OUT/ra3/e$k"
  stage "RA3 EM iteration $k/$K: M-step ($EPK steps)"
  launch mstep.py --model "$PI" --data "$OUT/ra3/e$k/traces.jsonl" --steps "$EPK" $MSTEP --out "$OUT/ra3/m$k"
  PI=$OUT/ra3/m$k/model
done
RA3=$PI

for name in base ntp ra3; do
  case $name in base) M=$MODEL ;; ntp) M=$OUT/ntp/model ;; ra3) M=$RA3 ;; esac
  stage "eval: $name on $BENCH ($EVAL problems, greedy)"
  python eval_code.py --model "$M" --bench "$BENCH" --limit "$EVAL" --max-new-tokens "$NEW" --out "$OUT/eval-$name"
done

for name in ntp ra3; do
  case $name in ntp) M=$OUT/ntp/model ;; ra3) M=$RA3 ;; esac
  stage "RLVR from $name: $RLSTEPS steps"
  launch rlvr.py --model "$M" --problems "$PROBLEMS" --eval-bench "$BENCH" --eval-limit "$EVAL" \
    --steps "$RLSTEPS" --eval-every "$RLSTEPS" --batch-prompts "$RLP" --max-new-tokens "$NEW" --seed "$SEED" \
    --out "$OUT/rl-$name"
done

stage "report"
python - "$OUT" "$K" <<'EOF'
import json, sys
from pathlib import Path

out, k = Path(sys.argv[1]), int(sys.argv[2])
load = lambda p: json.loads((out / p).read_text())
curves = {n: [json.loads(x) for x in (out / f"rl-{n}" / "metrics.jsonl").read_text().splitlines()] for n in ("ntp", "ra3")}
rows = ["| model | held-out pass@1 | think rate after RLVR | RLVR reward (last step) | RLVR held-out pass@1 |",
        "| --- | --- | --- | --- | --- |"]
for name in ("base", "ntp", "ra3"):
    ev = load(f"eval-{name}/summary.json")
    rl = curves.get(name)
    last = rl[-1] if rl else {}
    rows.append(f"| {name} | {ev['pass@1']:.3f} | {last.get('think_rate', float('nan')):.3f} | "
                f"{last.get('reward', float('nan')):.3f} | {last.get('eval_pass1', float('nan')):.3f} |")
e = [load(f"ra3/e{i}/summary.json") for i in range(1, k + 1)]
text = "\n".join(rows) + "\n\nE-step think rate per EM iteration: " + \
    ", ".join(f"{s['think_rate']:.3f}" for s in e) + "\n"
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
for name, m in curves.items():
    steps = [x for x in m if "reward" in x]
    axes[0].plot([x["step"] for x in steps], [x["reward"] for x in steps], label=name)
    evals = [x for x in m if "eval_pass1" in x]
    axes[1].plot([x["step"] for x in evals], [x["eval_pass1"] for x in evals], marker="o", label=name)
    axes[2].plot([x["step"] for x in steps], [x["think_rate"] for x in steps], label=name)
for ax, title in zip(axes, ("RLVR reward", "held-out pass@1", "think rate of samples")):
    ax.set_title(title)
    ax.set_xlabel("RLVR step")
    ax.legend()
fig.tight_layout()
fig.savefig(out / "curves.png", dpi=120)
print(f"plots: {out / 'curves.png'}")
EOF
