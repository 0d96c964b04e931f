"""mstep.py: the loss, 1 rank = 2 ranks, kill-and-resume = uninterrupted, masks, bad input."""
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data as D
import minicode
import model as M
import mstep
from helpers import CPU_RANKS_ENV, tiny, torchrun_cmd

ROOT = Path(mstep.__file__).resolve().parent
TINY = ["--init", "scratch", "--data", "minicode-pretrain", "--n-tasks", "300", "--hidden", "64", "--layers", "2",
        "--heads", "4", "--kv-heads", "2", "--vocab-size", "512", "--seq-len", "256", "--batch-tokens", "4096",
        "--micro-rows", "2", "--lr", "3e-3", "--warmup", "2", "--eval-every", "4"]


def run(args, torchrun=0, wait=True):
    cmd = torchrun_cmd(torchrun) if torchrun else [sys.executable]
    env = dict(os.environ, **CPU_RANKS_ENV)
    p = subprocess.Popen(cmd + [str(ROOT / "mstep.py")] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if not wait:
        return p
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    return out


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", [[], ["--cpu-bf16"]])
def test_loss_decreases_and_outputs_are_written(tmp_path, precision, monkeypatch):
    monkeypatch.setattr(M, "CPU_BF16", False)  # restored after the test: main sets it from the flag
    summary = mstep.main(mstep.parser.parse_args(TINY + ["--steps", "12", "--out", str(tmp_path)] + precision))
    curve = losses(tmp_path)
    assert len(curve) == 12 and curve[-1] < curve[0] - 0.5
    assert summary["eval_loss"] is not None and (tmp_path / "summary.json").is_file()
    mdl, tok = M.load_model(str(tmp_path / "model"), device="cpu")  # the output is a loadable model
    assert M.read_meta(tmp_path / "model")["stage"] == "mstep"
    assert M.generate(mdl, tok, ["def f(nums):\n"], max_new_tokens=4, temperature=0).lengths[0] > 0


def test_epochs_train_one_pass_over_the_rows(tmp_path):
    args = mstep.parser.parse_args(TINY + ["--epochs", "1", "--eval-share", "0", "--out", str(tmp_path)])
    summary = mstep.main(args)
    traces, latents = minicode.load_traces("minicode-pretrain", n_tasks=300)
    tok = M.load_model(str(tmp_path / "model"), device="cpu")[1]
    rows = D.pack([ids for ids, _, _ in D.encode_traces(tok, traces, latents)], 256)
    assert summary["steps"] == round(len(rows.input_ids) / (4096 // 256))  # --steps' default (100) is not used
    assert abs(summary["tokens"] - int((rows.doc_ids >= 0).sum())) < 4096  # each row about once
    args = mstep.parser.parse_args(TINY + ["--epochs", "1", "--eval-share", "0", "--out", str(tmp_path), "--resume"])
    assert mstep.main(args) == json.loads((tmp_path / "summary.json").read_text())  # finished: nothing to redo


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_one_rank_equals_two_ranks(tmp_path, sharding):
    one, two = tmp_path / "one", tmp_path / "two"
    run(TINY + ["--steps", "4", "--out", str(one)])
    run(TINY + ["--steps", "4", "--out", str(two)] + sharding, torchrun=2)
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    ea = [json.loads(x).get("eval_loss") for x in (one / "metrics.jsonl").read_text().splitlines()]
    eb = [json.loads(x).get("eval_loss") for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert abs(ea[-1] - eb[-1]) < 1e-5
    a_model, _ = M.load_model(str(one / "model"), device="cpu")  # the 2-rank model saved whole, and equal
    b_model, _ = M.load_model(str(two / "model"), device="cpu")
    for (n, p), (_, q) in zip(a_model.named_parameters(), b_model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    args = TINY + ["--steps", "8", "--save-every", "3"]
    run(args + ["--out", str(tmp_path / "full")])
    p = run(args + ["--out", str(tmp_path / "cut")], wait=False)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            os.killpg(p.pid, signal.SIGKILL)  # dies mid-run, after the step-3 checkpoint
            break
        time.sleep(0.02)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    out = run(args + ["--out", str(tmp_path / "cut"), "--resume"])
    assert "resumed from" in out
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(cut) == 8 and max(abs(x - y) for x, y in zip(full, cut)) < 1e-6, (full, cut)
    summary = lambda d: json.loads((tmp_path / d / "summary.json").read_text())  # noqa: E731
    assert summary("cut")["tokens"] == summary("full")["tokens"] > 0  # the summary covers the whole run
    # resuming a finished run keeps it; a new run over it is refused unless told to overwrite
    before = (tmp_path / "cut" / "metrics.jsonl").read_text()
    out = run(args + ["--out", str(tmp_path / "cut"), "--resume"])
    assert "nothing to do" in out and (tmp_path / "cut" / "metrics.jsonl").read_text() == before
    with pytest.raises(ValueError, match="holds a finished mstep run of 8 steps"):
        mstep.main(mstep.parser.parse_args(args + ["--out", str(tmp_path / "cut")]))
    with pytest.raises(ValueError, match="cannot resume: .* --batch-tokens 4096, this run has 8192"):
        mstep.main(mstep.parser.parse_args([a if a != "4096" else "8192" for a in args] +
                                           ["--steps", "9", "--out", str(tmp_path / "cut"), "--resume"]))


def test_ctrl_c_checkpoints_and_resume_finishes(tmp_path):
    args = TINY + ["--steps", "40", "--save-every", "100", "--out", str(tmp_path / "run")]
    p = run(args, wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            p.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 130, out[-2000:]
    assert "interrupted at step" in out and "Traceback" not in out
    step = M.read_meta(tmp_path / "run" / "checkpoint")["metrics"]["step"]
    assert 2 <= step < 40 and len(metrics.read_text().splitlines()) == step
    assert "resumed from" in run(args + ["--resume"]) and len(losses(tmp_path / "run")) == 40


def test_ctrl_c_under_torchrun_checkpoints_every_rank(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: torchrun and both ranks. torchrun then sends each
    rank a SIGINT of its own; that one must not count as a second Ctrl-C. The ranks stop at the same step,
    write one checkpoint and exit (torchrun itself reports the signal and exits non-zero)."""
    args = TINY + ["--steps", "40", "--save-every", "100", "--out", str(tmp_path / "run")]
    p = run(args, torchrun=2, wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            os.killpg(p.pid, signal.SIGINT)
            break
        time.sleep(0.02)
    out, _ = p.communicate(timeout=300)
    assert "interrupted at step" in out and "KeyboardInterrupt" not in out, out[-3000:]
    step = M.read_meta(tmp_path / "run" / "checkpoint")["metrics"]["step"]
    assert 2 <= step < 40 and len(metrics.read_text().splitlines()) == step
    assert "resumed from" in run(args + ["--resume"], torchrun=2) and len(losses(tmp_path / "run")) == 40


def test_a_second_ctrl_c_stops_at_once_but_not_a_forwarded_copy(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(M.time, "monotonic", lambda: clock[0])
    stop = M.StopOnInterrupt()
    try:
        stop._handle(signal.SIGINT, None)
        clock[0] += 0.1
        stop._handle(signal.SIGINT, None)  # torchrun's copy of the same Ctrl-C
        assert stop.flag
        clock[0] += M.StopOnInterrupt.DEBOUNCE_S
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    finally:
        stop.restore()


def packed_batch(tok, traces, latents, args):
    packed, _ = mstep.build_rows(tok, traces, latents, args)
    mask = mstep.targets(packed)
    return (packed.input_ids, packed.position_ids, packed.doc_ids, mask), packed


def test_packed_loss_equals_unpacked():
    mdl, tok = tiny("tiny-llama")
    tasks = minicode.tasks(6, seed=2, comment_rate=0.5)
    traces, latents = [t.trace for t in tasks], [t.plan_comments for t in tasks]
    args = mstep.parser.parse_args(["--seq-len", "512", "--eval-share", "0"])
    batch, packed = packed_batch(tok, traces, latents, args)
    assert len(packed.input_ids) < len(traces)  # several traces share a row
    net = M.PackedLogProbs(mdl)
    with torch.no_grad():
        n_targets = batch[3].sum()
        packed_loss = mstep.batch_loss(net, batch, n_targets)
        total, count = 0.0, 0
        for ids, _, _ in D.encode_traces(tok, traces, latents):
            lp = M.packed_logprobs(mdl, torch.tensor([ids]), torch.arange(len(ids))[None], torch.zeros(1, len(ids), dtype=torch.long))
            total += -lp[0, 1:].sum().item()
            count += len(ids) - 1
    assert int(n_targets) == count and abs(packed_loss.item() - total / count) < 1e-5


def test_steps_0_scores_expert_code_like_an_unpacked_loop(tmp_path):
    """--steps 0 --eval-share 1 --mask-prompt: the cross-entropy of a model on the code of a corpus."""
    traces = [t.trace for t in minicode.split_tasks(minicode.DEFAULT_WORLD, "heldout")[:7]]
    D.write_traces(tmp_path / "t.jsonl", traces)
    summary = mstep.main(mstep.parser.parse_args(["--model", "minicode-base", "--data", str(tmp_path / "t.jsonl"),
                                                  "--steps", "0", "--eval-share", "1", "--mask-prompt",
                                                  "--micro-rows", "3", "--out", str(tmp_path / "ce")]))
    assert not (tmp_path / "ce" / "model").exists()  # scoring writes no model
    mdl, tok = M.load_model("minicode-base", device="cpu")
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, prompt, _ in D.encode_traces(tok, traces):
            lp = M.packed_logprobs(mdl, torch.tensor([ids]), torch.arange(len(ids))[None], torch.zeros(1, len(ids), dtype=torch.long))
            code = ~torch.tensor(prompt[1:])
            total += -lp[0, 1:][code].sum().item()
            count += int(code.sum())
    assert summary["eval_tokens"] == count and abs(summary["eval_loss"] - total / count) < 1e-5
    assert json.loads((tmp_path / "ce" / "summary.json").read_text())["eval_loss"] == summary["eval_loss"]


def test_masked_latent_tokens_get_no_gradient():
    mdl, tok = tiny("tiny-qwen2")
    tasks = minicode.tasks(4, seed=3, comment_rate=1.0)
    traces, latents = [t.trace for t in tasks], [t.plan_comments for t in tasks]
    masked = mstep.parser.parse_args(["--seq-len", "512", "--eval-share", "0", "--mask-latents"])
    full = mstep.parser.parse_args(["--seq-len", "512", "--eval-share", "0"])
    batch, _ = packed_batch(tok, traces, latents, masked)
    batch_all, _ = packed_batch(tok, traces, latents, full)
    assert batch[3].sum() < batch_all[3].sum()
    net = M.PackedLogProbs(mdl)
    mstep.batch_loss(net, batch, 1.0).backward()
    grad = {n: p.grad.clone() for n, p in mdl.named_parameters()}
    mdl.zero_grad()
    # reference: per-token log-probs of every token, summed only where the token is not in a latent line
    ids, pos, doc, _ = batch_all
    lp = M.packed_logprobs(mdl, ids, pos, doc)
    latent_tokens = batch_all[3] & ~batch[3]
    assert latent_tokens.sum() > 20
    (-(lp * (batch_all[3] & ~latent_tokens)).sum()).backward()
    for n, p in mdl.named_parameters():
        assert torch.allclose(grad[n], p.grad, atol=1e-6), n


def test_bad_input_messages(tmp_path):
    mstep.main(mstep.parser.parse_args(TINY + ["--steps", "2", "--out", str(tmp_path / "a")]))
    other = [a if a != "64" else "96" for a in TINY]  # another model: hidden 96
    with pytest.raises(ValueError, match="cannot resume: .* written with --hidden 64, this run has 96"):
        mstep.main(mstep.parser.parse_args(other + ["--steps", "2", "--out", str(tmp_path / "a"), "--resume"]))
    with pytest.raises(ValueError, match="--seq-len 4096 is longer than the model takes"):
        mstep.main(mstep.parser.parse_args(["--model", str(tmp_path / "a" / "model"), "--data", "minicode-midtrain",
                                            "--n-tasks", "50", "--seq-len", "4096", "--out", str(tmp_path / "b")]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(D.DataError, match="empty.jsonl: no traces"):
        mstep.main(mstep.parser.parse_args(TINY[:2] + ["--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "c")]))
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "prompt": "def f():\\n"}\n')
    with pytest.raises(D.DataError, match="bad.jsonl, line 1: missing field 'actions'"):
        mstep.main(mstep.parser.parse_args(TINY[:2] + ["--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "c")]))


def test_compile_changes_nothing_and_keeps_checkpoint_keys(tmp_path, monkeypatch):
    """--compile (compile_scorer, before wrapping) trains the same and saves the same keys, no `_orig_mod.`
    (load_trainer loads non-strictly: a renamed key would be skipped in silence on --resume).
    aot_eager: traced as the real compile does, no kernels built."""
    from safetensors.torch import load_file
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    for flag in ("--compile", "--no-compile"):
        mstep.main(mstep.parser.parse_args(TINY + ["--steps", "2", "--batch-tokens", "1024", "--eval-share", "0", flag,
                                                   "--out", str(tmp_path / flag)]))
    torch._dynamo.reset()
    a, b = losses(tmp_path / "--compile"), losses(tmp_path / "--no-compile")
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    for name in ("model", "checkpoint"):
        wa = load_file(tmp_path / "--compile" / name / "model.safetensors")
        wb = load_file(tmp_path / "--no-compile" / name / "model.safetensors")
        assert sorted(wa) == sorted(wb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_training_on_gpu(tmp_path):
    """On GPU mstep compiles by default (FlexAttention, compiled layers and head): the losses of
    --no-compile (dense-mask SDPA) to bf16 rounding, and checkpoints that load as plain models."""
    for flag in ("--compile", "--no-compile"):
        mstep.main(mstep.parser.parse_args(TINY + ["--steps", "6", flag, "--out", str(tmp_path / flag)]))
    a, b = losses(tmp_path / "--compile"), losses(tmp_path / "--no-compile")
    assert a[-1] < a[0] - 0.3 and max(abs(x - y) for x, y in zip(a, b)) < 0.05, (a, b)
    mdl, _ = M.load_model(str(tmp_path / "--compile" / "model"), device="cpu")
    assert not any("_orig_mod" in k for k in mdl.state_dict())


@pytest.mark.parametrize("script", ["estep.py", "mstep.py", "rlvr.py"])
def test_trainer_help_lists_the_shared_flags_without_torch(script):
    """Every trainer takes flags.py's shared flags, and its --help answers before torch is imported."""
    import re
    p = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert all(f in p.stdout for f in ("--resume", "--overwrite", "--fsdp", "--seed", "--cpu-bf16", "--wandb"))
    assert not re.search(r"\|\s+torch(\.|$)", p.stderr, re.M), "--help imported torch"
