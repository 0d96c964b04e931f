"""bench.py --estep / --rlvr and gpu.sh: the benchmarks run end to end on a tiny model (the wiring, not a speed)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_GIT = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.parametrize("stage,flags", [
    ("estep", ["--estep", "--estep-batch", "2", "--estep-annotate", "4", "--stage-args", "--max-lines 24"] +
     (["--baseline-commit", "HEAD", "--baseline-args", "--micro-rows 8"] if IN_GIT else [])),
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
    if "--stage-args" in flags:  # the extra flags reach the stage script, the baseline's only the baseline
        assert "--max-lines" in res[stage]["runs"][0]["flags"] and "--micro-rows" not in res[stage]["runs"][0]["flags"]
    if "--baseline-args" in flags:
        assert res["baseline"]["runs"][0]["flags"][-2:] == ["--micro-rows", "8"]


def test_gpu_script_runs_its_parts_and_names_a_failure(tmp_path):
    """gpu.sh on the CPU at tiny sizes: each part leaves its log and results in OUT; a part that fails is
    named, the others still run, and the script exits 1."""
    env = dict(os.environ, MODEL="tiny-llama", PROMPTS="2", NS="2", NEW_TOKENS="8", PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    run = lambda out, **kw: subprocess.run(["bash", "gpu.sh", str(tmp_path / out)], cwd=ROOT, env=dict(env, **kw),  # noqa: E731
                                           capture_output=True, text=True, timeout=600)
    p = run("ok", PARTS="tests sampler")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert json.loads((tmp_path / "ok" / "sampler" / "bench.json").read_text())["sampler"][0]["rows"] == 4
    assert {"tests.log", "sampler.log", "versions.txt"} <= {f.name for f in (tmp_path / "ok").iterdir()}
    p = run("bad", PARTS="sampler tests", MODEL=str(tmp_path / "no-such-model"))
    assert p.returncode == 1 and "failed: sampler (1)" in p.stderr and "== tests: exit 0" in p.stdout, p.stderr[-2000:]
