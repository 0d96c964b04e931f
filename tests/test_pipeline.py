"""run.sh: the whole pipeline on tiny budgets, end to end (the wiring, not an experiment); report.py; the
stages' checks of their flags."""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import data as D
import model as M
from helpers import real_code

ROOT = Path(__file__).resolve().parent.parent


def test_run_sh_tiny_end_to_end(tmp_path):
    out = tmp_path / "pipe"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    run = lambda *flags: subprocess.run(["bash", str(ROOT / "run.sh"), "--tiny", "--out", str(out), *flags], cwd=ROOT,
                                        env=env, capture_output=True, text=True, timeout=900)
    p = run()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    seed = out / "seed0"
    for stage in ("ntp/model", "oracle/model", "ra3/e1/traces.jsonl", "ra3/e2/traces.jsonl", "ra3/m2/model",
                  "eval-base/summary.json", "eval-oracle/summary.json", "eval-ra3/summary.json", "ce-ra3/summary.json",
                  "elbo-base/summary.json", "elbo-ra3/summary.json",
                  "rl-ntp/model", "rl-oracle/model", "rl-ra3/metrics.jsonl"):
        assert (seed / stage).exists(), stage
    # the second EM iteration starts from the first one's M-step
    assert json.loads((seed / "ra3/e2/summary.json").read_text())["stage"] == "estep"
    assert M.read_meta(seed / "ra3/e2/q")["args"]["model"] == str(seed / "ra3/m1/model")
    # the oracle trained on the true plan comments
    assert M.read_meta(seed / "oracle/model")["args"]["data"] == "minicode-chain-midtrain-oracle"  # the default world
    # and its own settings, chosen on dev, reach the E-step and RLVR
    estep_cmd = (seed / "ra3/e1/stage.cmd").read_text()
    assert "--lr 3e-5" in estep_cmd and "--annotate one --annotate-temperature 0.5" in estep_cmd
    assert "--lr 5e-6" in (seed / "rl-ra3/stage.cmd").read_text()
    # the held-out cross-entropy is each model's own: NTP's and RA3's differ from the base's
    ce = {n: json.loads((seed / f"ce-{n}/summary.json").read_text())["eval_loss"] for n in ("base", "ntp", "ra3")}
    assert ce["base"] != ce["ntp"] and ce["base"] != ce["ra3"] and all(0 < v < 10 for v in ce.values())
    table = (out / "results.md").read_text()
    assert all(f"| seed0 | {name} |" in table for name in ("base", "ntp", "oracle", "ra3"))
    assert table.startswith("Settings: run.sh tiny") and "E-steps" in table
    # a rerun finds every stage done and only redoes the one whose output went missing
    (seed / "eval-ra3/summary.json").unlink()
    p = run()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("done already") == 20 and (seed / "eval-ra3/summary.json").exists()
    # a rerun with other settings does not present the old results as its own: it stops at the first stage
    # that would differ, and names it
    p = run("--penalty", "0.2")
    assert p.returncode == 2 and f"{seed / 'ra3/e1'} holds a finished run of something else" in p.stderr
    assert "--penalty 0.05" in p.stderr and "--penalty 0.2" in p.stderr
    assert p.stdout.count("done already") == 2  # NTP and the oracle do not depend on c


def test_run_sh_real_code_end_to_end(tmp_path):
    """run.sh on a directory of real code: one E-step on the code without its comments, NTP / oracle / RA3
    M-steps from the base on the same traces, each model's CE and ELBO on the held-out files, the real-code
    table; no eval without --bench, no RLVR; a rerun skips every stage."""
    data = real_code(tmp_path / "code", 40)  # 40 files: the held-out 5% holds some
    traces = D.load_traces(str(data))[0]
    assert any(D.held_out(t.id, D.HELD_OUT_SHARE) for t in traces)  # the CE stage has files to score
    out = tmp_path / "real"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    run = lambda: subprocess.run(["bash", str(ROOT / "run.sh"), "--tiny", "--model", "tiny-llama", "--data", str(data),
                                  "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    p = run()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    seed = out / "seed0"
    # the three M-steps read one epoch of the same traces, the E-step's, none from a held-out file
    ids = {name: [json.loads(x)["id"] for x in (seed / f"ra3/e1/{name}.jsonl").read_text().splitlines()]
           for name in ("traces", "stripped", "oracle")}
    assert ids["traces"] == ids["stripped"] == ids["oracle"] and len(ids["traces"]) == 16
    assert not any(D.held_out(i, D.HELD_OUT_SHARE) for i in ids["traces"])
    for name, corpus in (("ntp", "stripped"), ("oracle", "oracle"), ("ra3/m1", "traces")):
        trained = M.read_meta(seed / name / "model")["args"]
        assert trained["data"] == str(seed / f"ra3/e1/{corpus}.jsonl") and trained["model"] == "tiny-llama"
        assert trained["epochs"] == 1 and trained["eval_share"] == 0
    assert "--data stripped:" in (seed / "ra3/e1/stage.cmd").read_text()
    assert not list(seed.glob("eval-*")) and not list(seed.glob("rl-*"))
    ce = {n: json.loads((seed / f"ce-{n}/summary.json").read_text())["eval_loss"] for n in ("base", "ntp")}
    assert ce["base"] != ce["ntp"]  # each model's own
    text = (out / "results.md").read_text()
    assert text.startswith("Settings: run.sh tiny, real code") and "pass@1" not in text
    rows = {x.split(" | ")[1]: x.strip("| ").split(" | ")[2:] for x in text.splitlines() if x.startswith("| seed0 | ")}
    for name in ("base", "ntp", "oracle", "ra3"):
        assert len(rows[name]) == 6 and all(float(v) == float(v) for v in rows[name]), rows[name]  # numbers, no "-"
    assert "code LL, q's words at the expert's places" in text and (out / "estep.png").exists()
    # a rerun finds every stage done
    p = run()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("done already") == 12  # the E-step, 3 M-steps, 4 models x (CE, ELBO)


def fake_run(out):
    """A run.sh output of 2 seeds with made-up numbers, as the stages write them."""
    write = lambda path, obj: (path.parent.mkdir(parents=True, exist_ok=True), path.write_text(json.dumps(obj)))
    runs = [(dict(ntp=0.8, oracle=0.9, ra3=0.6), dict(ntp=[0.80, 0.86], ra3=[0.60, 0.90])),
            (dict(ntp=0.9, oracle=1.0, ra3=0.7), dict(ntp=[0.70, 0.75], ra3=[0.60, 0.70]))]
    for s, (p1, curves) in enumerate(runs):
        d = out / f"seed{s}"
        for k in (1, 2):
            held = [{"step": 0, "heldout_elbo": -2.0 * k, "heldout_think_rate": 0.5},
                    {"step": 2, "heldout_elbo": -1.0 * k - s, "heldout_think_rate": 0.1}]
            write(d / f"ra3/e{k}/summary.json", {"heldout_curve": held, "annotated_think_rate": 0.1 * k})
            # as estep.py logs them: the instruments at step 0 and every --eval-every updates, plain updates between
            (d / f"ra3/e{k}/metrics.jsonl").write_text("\n".join(json.dumps(m) for m in [
                held[0], {"step": 1, "reward": -1.0, "think_rate": 0.3},
                {"reward": -0.5, "think_rate": 0.1, **held[1]}]) + "\n")
        for name, p in dict(base=0.5, **p1).items():
            write(d / f"eval-{name}/summary.json", {"pass@1": p, "think_rate": 0.0})
            write(d / f"ce-{name}/summary.json", {"eval_loss": 1.0 + s})
            named = None if name == "ntp" else 0.5  # NTP writes no comment: nothing to name
            write(d / f"elbo-{name}/summary.json", {"heldout_curve": [{"heldout_elbo": -9.0 - s, "heldout_named_step": named}]})
        for name, c in curves.items():
            (d / f"rl-{name}").mkdir()
            (d / f"rl-{name}/metrics.jsonl").write_text("\n".join(json.dumps(m) for m in [
                {"step": 0, "eval_pass1": c[0]},
                {"step": 2, "reward": 0.5, "think_rate": 0.0, "eval_pass1": c[1]}]) + "\n")
    (out / "settings.txt").write_text("run.sh test settings")


def test_report_averages_seeds(tmp_path):
    """report.py on outputs written here: per seed, mean ± sd over seeds, and the comparison with NTP."""
    out = tmp_path / "exp"
    fake_run(out)
    p = subprocess.run([sys.executable, str(ROOT / "report.py"), str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = (out / "results.md").read_text()
    assert text.startswith("Settings: run.sh test settings")
    rows = {" | ".join(x.split(" | ")[:2]): x for x in text.splitlines() if x.startswith("| ")}
    assert "| 0.850 ± 0.071 | - | 0.000 ± 0.000 | 1.500 ± 0.707 | -9.500 ± 0.707 | - |" in rows["| mean ± sd (2) | ntp"]
    assert "| -9.500 ± 0.707 | 0.500 ± 0.000 |" in rows["| mean ± sd (2) | ra3"]
    # steps until the NTP start's final pass@1 of the same seed: seed0 0.86 (RA3 passes it at 2), seed1 0.75
    assert rows["| seed0 | ra3"].endswith("| 2 |") and rows["| seed1 | ra3"].endswith("| >2 |")
    assert "| reached in 2/2 |" in rows["| mean ± sd (2) | ntp"] and "| reached in 1/2 |" in rows["| mean ± sd (2) | ra3"]
    assert "- RA3 - NTP, pass@1: -0.200 ± 0.000 (2 seeds: -0.200, -0.200)" in text
    assert "- oracle - NTP, pass@1: +0.100 ± 0.000" in text
    assert "- share of the oracle's gain RA3 recovers: -2.00" in text
    assert "| seed1 | 2 | -4.000 -> -3.000 |" in text  # the E-step's held-out ELBO, first -> last


def test_report_draws_its_figures(tmp_path):
    """report.py writes its figures (PNG, not blank), and each panel holds what the stages logged: pass@1 per
    model with the spread over seeds, each E-step's held-out ELBO over its updates, the RLVR curves."""
    out = tmp_path / "exp"
    fake_run(out)
    p = subprocess.run([sys.executable, str(ROOT / "report.py"), str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for name in ("pipeline", "pass1", "estep", "curves"):
        path = out / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        image = plt.imread(path)
        assert image.shape[0] > 200 and image[..., :3].std() > 0.05, name  # drawn on, not an empty canvas
    report = importlib.import_module("report")
    seeds = [out / "seed0", out / "seed1"]
    fig, axes = plt.subplots(1, 3)
    report.draw_pass1(axes[0], seeds)
    bars = [b.get_height() for b in axes[0].patches]
    assert bars == pytest.approx([0.5, 0.85, 0.95, 0.65])  # base, NTP, oracle, RA3: means over the two seeds
    caps = [line.get_segments()[0] for line in axes[0].collections]  # the error bars: ± sd over seeds
    assert caps[1][:, 1] == pytest.approx([0.85 - 0.0707, 0.85 + 0.0707], abs=1e-3)
    report.draw_estep(axes[1], seeds, "heldout_elbo", "ELBO")
    lines = {(tuple(x.get_xdata()), tuple(x.get_ydata())) for x in axes[1].get_lines()}
    assert lines == {((0, 2), (-2.0, -1.0)), ((0, 2), (-4.0, -2.0)), ((0, 2), (-2.0, -2.0)), ((0, 2), (-4.0, -3.0))}
    report.draw_rlvr(axes[2], seeds, "eval_pass1", "pass@1")
    assert sorted(tuple(x.get_ydata()) for x in axes[2].get_lines()) == [(0.6, 0.7), (0.6, 0.9), (0.7, 0.75), (0.8, 0.86)]
    plt.close(fig)


def test_worlds_report_splits_the_oracle_by_its_plan(tmp_path):
    """report.py --worlds on worlds.sh outputs written here: the pass@1 table, and the oracle's samples split by
    whether their comments are the true plan, and its working's arithmetic checked."""
    import data as D
    import minicode
    tasks = minicode.split_tasks("arith", "dev")[:3]
    true, bare = [D.render(t.trace, t.true_plan()) for t in tasks], [D.render(t.trace) for t in tasks]
    wrong_sum = "    # 2 + 2 = 5: plus 5\n" + bare[0]
    oracle = [[(true[0], True), (true[1], False), (bare[2], False)],   # seed 0: plan right, right, none
              [(wrong_sum, False), (true[1], True), (true[2], True)]]  # seed 1: a wrong working, right, right
    for seed, samples in enumerate(oracle):
        for name, p1, rows in (("ntp", 0.5 + 0.2 * seed, [(bare[0], seed == 1)]), ("oracle", 0.4 + 0.2 * seed, samples)):
            d = tmp_path / "arith" / f"dev-{name}{seed}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({"pass@1": p1}))
            (d / "samples.jsonl").write_text("".join(json.dumps(dict(task_id=t.problem.task_id, completion=c, passed=ok)) + "\n"
                                                     for t, (c, ok) in zip(tasks, rows)))
    p = subprocess.run([sys.executable, str(ROOT / "report.py"), str(tmp_path), "--worlds", "arith"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = (tmp_path / "worlds.md").read_text()
    assert "| arith | dev | 0.600 ± 0.141 | 0.500 ± 0.141 | -0.100 ± 0.000 |" in text
    assert "| arith | dev | 0.667 | 0.750 | 0.000 | 0.500 |" in text  # 4 of 6 plans right, 3 of them pass; NTP 1 of 2
    right, total = map(int, re.search(r"arith, dev: (\d+) of the (\d+) operations", text).groups())
    assert total > 1 and right == total - 1  # the true plan's working is right, 2 + 2 = 5 is not


def test_worlds_report_splits_a_chain_world_by_its_operations(tmp_path):
    """In a chain world the report gives pass@1 by the number of operations in the task's chain, every seed's
    samples pooled, and checks the working's arithmetic with * too."""
    import data as D
    import minicode
    dev = minicode.split_tasks("chain", "dev")
    tasks = [t for t in dev if t.n_ops() == 3][:2] + [next(t for t in dev if t.n_ops() == 5)]
    true, bare = [D.render(t.trace, t.true_plan()) for t in tasks], [D.render(t.trace) for t in tasks]
    passed = {"ntp": [(True, False, False), (False, False, True)], "oracle": [(True, True, True), (True, False, True)]}
    for name, runs in passed.items():
        for seed, flags in enumerate(runs):
            d = tmp_path / "chain" / f"dev-{name}{seed}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({"pass@1": sum(flags) / 3}))
            rows = zip(tasks, true if name == "oracle" else bare, flags)
            (d / "samples.jsonl").write_text("".join(json.dumps(dict(task_id=t.problem.task_id, completion=c, passed=ok))
                                                     + "\n" for t, c, ok in rows))
    p = subprocess.run([sys.executable, str(ROOT / "report.py"), str(tmp_path), "--worlds", "chain"],
                       capture_output=True, text=True, timeout=300)
    text = (tmp_path / "worlds.md").read_text() if p.returncode == 0 else p.stderr[-3000:]
    assert "| chain | dev | 3 | 2 | 0.250 | 0.750 |" in text and "| chain | dev | 5 | 1 | 0.500 | 1.000 |" in text, text
    right, total = map(int, re.search(r"chain, dev: (\d+) of the (\d+) operations", text).groups())
    assert right == total == 2 * (3 + 3 + 5)  # both oracle seeds wrote the true plans: every equation right


def test_run_sh_checks_its_numbers():
    for flags, message in ((["--k", "0"], "--k must be an integer >= 1"), (["--seeds", "0"], "--seeds must be"),
                           (["--penalty", "-1"], "--penalty must be a number"), (["--eval-n", "x"], "--eval-n must be"),
                           (["--data", "stdlib", "--k", "2"], "real code runs one EM iteration (--k 1), not --k 2"),
                           (["--data", "stdlib", "--explore", "x"], "--explore must be a number"),
                           (["--world", "nope"], "--world is plain, chain, echo"),
                           (["--world", "arith"], "no base model ships for the arith world: pass --model")):
        p = subprocess.run(["bash", str(ROOT / "run.sh"), "--tiny", *flags], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2 and message in p.stderr, (flags, p.stderr)


@pytest.mark.parametrize("script,flags,message", [
    ("mstep", ["--steps", "-3"], "--steps must be at least 0, not -3"),
    ("mstep", ["--eval-share", "1"], "--eval-share must be in [0, 1)"),
    ("estep", ["--group", "0"], "--group must be at least 1"),
    ("estep", ["--temperature", "0"], "--temperature must be more than 0"),
    ("rlvr", ["--eval-every", "0"], "--eval-every must be at least 1"),
    ("rlvr", ["--batch-prompts", "0"], "--batch-prompts must be at least 1"),
    ("eval_code", ["--limit", "0"], "--limit must be at least 1"),
    ("eval_code", ["--k", "1,5", "--n", "1"], "each k must be between 1 and --n"),
    ("eval_code", ["--temperature", "-1"], "--temperature must be at least 0"),
])
def test_stages_check_their_numbers_first(script, flags, message, capsys):
    """A flag out of range stops the stage before any work, in one line naming the flag (exit 2)."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:
        module.main(module.parser.parse_args(flags))
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_users_mistake_is_one_line(tmp_path):
    """A bad model spec or a corrupt weights file: `script.py: error: ...` naming it, exit 2, no traceback."""
    mdl, tok = M.load_model("minicode-base", device="cpu")
    M.save_checkpoint(mdl, tok, tmp_path / "broken", stage="test")
    weights = tmp_path / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("RA3_DEBUG", None)
    for model, says in (("tiny-foo", "the presets are minicode-base, minicode-chain-base, smollm2, qwen-coder, tiny-llama"),
                        (str(tmp_path / "broken"), f"could not load the weights in {tmp_path / 'broken'}")):
        p = subprocess.run([sys.executable, str(ROOT / "mstep.py"), "--model", model, "--steps", "1", "--out",
                            str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert p.stderr.strip().splitlines()[-1].startswith("mstep.py: error: ") and says in p.stderr
