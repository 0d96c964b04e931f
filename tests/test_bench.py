"""bench.py --estep / --rlvr: the stage benchmarks run end to end on a tiny model (the wiring, not a speed)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_GIT = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.parametrize("stage,flags", [
    ("estep", ["--estep", "--estep-batch", "2", "--estep-annotate", "4"] + (["--baseline-commit", "HEAD"] if IN_GIT else [])),
    ("rlvr", ["--rlvr"])])
def test_stage_benchmark_times_every_phase(tmp_path, stage, flags):
    p = subprocess.run([sys.executable, "bench.py", *flags, "--model", "tiny-llama", "--updates", "2", "--threads", "1",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    phases = {"estep": ("rollout_s", "reward_s", "train_s"), "rlvr": ("sample_s", "score_s", "reward_wait_s", "train_s")}
    assert res[stage]["runs"][0]["updates"] == 2
    assert res[stage]["update_s"] > 0 and all(res[stage][k] >= 0 for k in phases[stage])
    if "--baseline-commit" in flags:  # the committed tree timed the same way, and the ratio printed
        assert set(res["speedup"]) >= {"update_s", *phases[stage]} and "speed-up against HEAD" in p.stdout
