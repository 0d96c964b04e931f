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
    run = lambda: subprocess.run(["bash", str(ROOT / "run.sh"), "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=900)
    p = run()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    seed = out / "seed0"
    for stage in ("ntp/model", "ra3/e1/traces.jsonl", "ra3/e2/traces.jsonl", "ra3/m2/model", "eval-base/summary.json",
                  "eval-ra3/summary.json", "ce-ra3/summary.json", "rl-ntp/model", "rl-ra3/metrics.jsonl"):
        assert (seed / stage).exists(), stage
    assert (out / "results.md").exists()
    # the second EM iteration starts from the first one's M-step
    assert json.loads((seed / "ra3/e2/summary.json").read_text())["stage"] == "estep"
    assert M.read_meta(seed / "ra3/e2/q")["args"]["model"] == str(seed / "ra3/m1/model")
    # the held-out cross-entropy is each model's own: NTP's and RA3's differ from the base's
    ce = {n: json.loads((seed / f"ce-{n}/summary.json").read_text())["eval_loss"] for n in ("base", "ntp", "ra3")}
    assert ce["base"] != ce["ntp"] and ce["base"] != ce["ra3"] and all(0 < v < 10 for v in ce.values())
    table = (out / "results.md").read_text()
    assert all(f"| seed0 | {name} |" in table for name in ("base", "ntp", "ra3"))
    # a rerun finds every stage done and only writes the report again
    (seed / "eval-ra3/summary.json").unlink()
    p = run()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("done already") == 12 and (seed / "eval-ra3/summary.json").exists()


def test_report_averages_seeds(tmp_path):
    """With every stage's summary.json in place run.sh only reports: per seed, and mean ± sd over seeds."""
    out = tmp_path / "exp"
    write = lambda path, obj: (path.parent.mkdir(parents=True, exist_ok=True), path.write_text(json.dumps(obj)))
    for s, (p_ntp, p_ra3, curve) in enumerate([(0.8, 0.6, [0.80, 0.86]), (0.9, 0.7, [0.70, 0.75])]):
        d = out / f"seed{s}"
        for stage in ("ntp", "ra3/m1", "ra3/m2", "rl-ntp", "rl-ra3"):
            write(d / stage / "summary.json", {})
        for k in (1, 2):
            write(d / f"ra3/e{k}/summary.json", {"think_rate": 0.1 * k})
        for name, p in (("base", 0.5), ("ntp", p_ntp), ("ra3", p_ra3)):
            write(d / f"eval-{name}/summary.json", {"pass@1": p, "think_rate": 0.0})
            write(d / f"ce-{name}/summary.json", {"eval_loss": 1.0 + s})
        for name in ("ntp", "ra3"):
            (d / f"rl-{name}/metrics.jsonl").write_text("\n".join(json.dumps(m) for m in [
                {"step": 0, "eval_pass1": curve[0]},
                {"step": 2, "reward": 0.5, "think_rate": 0.0, "eval_pass1": curve[1]}]) + "\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", str(ROOT / "run.sh"), "--tiny", "--seeds", "2", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("done already") == 2 * 13
    lines = [x for x in (out / "results.md").read_text().splitlines() if x.startswith("| ")]
    rows = {" | ".join(x.split(" | ")[:2]): x for x in lines}
    assert "| 0.850 ± 0.071 | - | 0.000 ± 0.000 | 1.500 ± 0.707 |" in rows["| mean ± sd (2) | ntp"]
    assert "| reached in 1/2 |" in rows["| mean ± sd (2) | ntp"] and rows["| seed0 | ntp"].endswith("| 2 |")
    assert rows["| seed1 | ra3"].endswith("| >2 |") and "0.650 ± 0.071" in rows["| mean ± sd (2) | ra3"]
