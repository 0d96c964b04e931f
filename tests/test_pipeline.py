"""run.sh: the whole pipeline on tiny budgets, end to end (the wiring, not an experiment)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import model as M

ROOT = Path(__file__).resolve().parent.parent


def test_run_sh_tiny_end_to_end(tmp_path):
    out = tmp_path / "pipe"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", str(ROOT / "run.sh"), "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for stage in ("ntp/model", "ra3/e1/traces.jsonl", "ra3/e2/traces.jsonl", "ra3/m2/model", "eval-base/summary.json",
                  "eval-ra3/summary.json", "rl-ntp/model", "rl-ra3/metrics.jsonl", "results.md"):
        assert (out / stage).exists(), stage
    # the second EM iteration starts from the first one's M-step
    assert json.loads((out / "ra3/e2/summary.json").read_text())["stage"] == "estep"
    assert M.read_meta(out / "ra3/e2/q")["args"]["model"] == str(out / "ra3/m1/model")
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ("base", "ntp", "ra3"))
