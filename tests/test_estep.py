"""estep.py: returns and advantages against loops, units against the tokenizer, every log-probability the
policy gradient uses against a teacher-forced recomputation, forced lines byte for byte, the penalty,
and a small model learning to write the comment that helps."""
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data as D
import estep as E
import model as M
import mstep
from helpers import tiny

ROOT = Path(E.__file__).resolve().parent
OPS = ["x * 2", "x + 1", "x - 3", "x * 5", "x + 7", "x // 2", "x % 3", "x - 1"]


# ---- returns and advantages -------------------------------------------------------------------------------

@pytest.mark.parametrize("horizon,gamma", [(1, 1.0), (3, 0.9), (4, 1.0), (50, 0.5)])
def test_truncated_returns_equal_a_loop(horizon, gamma):
    r = np.random.default_rng(0).normal(size=(5, 11))
    want = np.zeros_like(r)
    for i in range(5):
        for t in range(11):
            for k in range(horizon):
                if t + k < 11:
                    want[i, t] += gamma ** k * r[i, t + k]
    assert np.allclose(E.truncated_returns(r, horizon, gamma), want)


@pytest.mark.parametrize("std_scale", [False, True])
def test_grpo_advantages_equal_a_loop(std_scale):
    R = np.random.default_rng(1).normal(size=(8, 6))
    R[:, 2] = 0.7  # a step where every rollout got the same return
    adv, flat = E.grpo_advantages(R, std_scale)
    for t in range(6):
        col = R[:, t]
        mean = sum(col) / len(col)
        std = (sum((x - mean) ** 2 for x in col) / len(col)) ** 0.5
        for i in range(8):
            want = (col[i] - mean) / (std + 1e-6) if std_scale else col[i] - mean
            assert abs(adv[i, t] - want) < 1e-9
    assert flat.tolist() == [t == 2 for t in range(6)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny model pretrained on functions whose first line is one of 8 at random, except after the
    comment '# double it', which is always followed by 'y = x * 2'; and expert traces of that line."""
    d = tmp_path_factory.mktemp("toy")
    rng = random.Random(0)
    pre, lat = [], []
    for i in range(3000):
        commented = rng.random() < 0.3
        pre.append(D.Trace(f"p{i}", "def f(x):\n", [f"    y = {'x * 2' if commented else rng.choice(OPS)}\n", "    return y\n"]))
        lat.append(["# double it" if commented else None, None])
    D.write_traces(d / "pretrain.jsonl", pre, lat)
    D.write_traces(d / "expert.jsonl", [D.Trace(f"e{i}", "def f(x):\n", ["    y = x * 2\n", "    return y\n"]) for i in range(64)])
    for family, out in (("llama", "base"), ("gpt2", "base-gpt2")):  # newline-last and newline-first units
        mstep.main(mstep.parser.parse_args([
            "--init", "scratch", "--family", family, "--data", str(d / "pretrain.jsonl"), "--hidden", "64",
            "--layers", "2", "--heads", "4", "--kv-heads", "2" if family != "gpt2" else "4", "--vocab-size", "300",
            "--seq-len", "128", "--batch-tokens", "4096", "--micro-rows", "32", "--steps", "150", "--lr", "3e-3",
            "--warmup", "10", "--eval-every", "150", "--save-every", "1000", "--out", str(d / out)]))
    return d


# ---- units and exact log-probabilities ----------------------------------------------------------------------

@pytest.mark.parametrize("preset,newline_first", [("tiny-llama", False), ("tiny-qwen2", False), ("tiny-gpt2", True)])
def test_units_reproduce_the_tokenizer(preset, newline_first):
    _, tok = tiny(preset)
    units = E.Units(tok)
    assert units.newline_first == newline_first
    sets = E.ThinkSets(tok, len(tok), "cpu", units.newline_first)
    traces = [t.trace for t in D.minicode_tasks(200, seed=3)]
    same = 0
    for t in traces:
        plan = E.plan_trace(units, sets, t)
        ids = plan.prompt + [i for a in plan.actions for i in a.lead + a.prefix + a.rest] + plan.suffix
        assert tok.decode(ids, skip_special_tokens=True) == D.render(t)  # always the exact text
        same += ids == tok.encode(D.render(t))
    assert same >= 0.9 * len(traces), same  # and nearly always the tokenizer's own tokens


def rollouts_of(mdl, tok, traces, group, temperature=1.0, seed=0, max_latent=12):
    units = E.Units(tok)
    sets = E.ThinkSets(tok, mdl.get_output_embeddings().weight.shape[0], "cpu", units.newline_first)
    plans = [E.plan_trace(units, sets, t) for t in traces]
    return E.rollout(mdl, units, sets, plans, group, max_latent, temperature, seed), sets, units


def load(preset, toy):
    """A model and tokenizer: a random preset, the shipped base model, or a toy model trained above."""
    if preset.startswith("toy"):
        return M.load_model(str(toy / ("base" if preset == "toy-llama" else "base-gpt2") / "model"), device="cpu")
    return M.load_model(preset, device="cpu") if preset == "minicode-base" else tiny(preset)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "minicode-base", "toy-llama", "toy-gpt2"])
def test_rollouts_force_the_expert_lines_and_their_log_probs_are_exact(preset, toy):
    mdl, tok = load(preset, toy)
    traces = [t.trace for t in D.minicode_tasks(4, seed=8)]
    if preset.startswith("toy"):
        traces = D.read_traces(toy / "expert.jsonl")[0][:4]
    temperature = 0.9
    rolls, sets, units = rollouts_of(mdl, tok, traces, group=8, temperature=temperature, seed=1)
    assert units.newline_first == preset.endswith("gpt2")
    kinds = {e[0] for r in rolls for e in r.events}
    if not preset.startswith("tiny"):  # trained models think: every kind of event is exercised
        assert {E.TOKEN, E.NOT_IN_SET} <= kinds and any(z for r in rolls for z in r.latents)
    for r in rolls:
        text = tok.decode(r.plan.prompt + r.ids, skip_special_tokens=True)
        assert text == D.render(r.plan.trace, r.latents)  # expert lines forced byte for byte, latents in between
        spans = D.latent_spans(r.plan.trace, r.latents)
        kept, last = [], 0
        for a, b in spans:
            kept.append(text[last:a])
            last = b
        assert "".join(kept) + text[last:] == D.render(r.plan.trace)  # and stripping gives the trace back
    net = E.EventLogProbs(mdl, sets, temperature)
    tensors, old, _ = E.event_batch(rolls, None, "cpu")
    with torch.no_grad():
        new = net(*tensors)
    assert torch.allclose(new, old, atol=2e-4), (new - old).abs().max()


@pytest.mark.parametrize("preset", ["tiny-qwen2", "minicode-base", "toy-gpt2"])
def test_the_decision_is_a_distribution_over_act_and_think(preset, toy):
    mdl, tok = load(preset, toy)
    trace = D.read_traces(toy / "expert.jsonl")[0][0] if preset.startswith("toy") else D.minicode_tasks(1, seed=2)[0].trace
    trace = D.Trace("one", trace.prompt, trace.actions[:1])
    rolls, sets, _ = rollouts_of(mdl, tok, [trace], group=600, temperature=1.0, seed=5)
    # P(think) + P(act) = 1 at the boundary, recomputed both ways from one teacher-forced pass
    first = rolls[0]
    row_col = E.event_batch([first], None, "cpu")[0]
    decision = next(e for e in first.events if e[3] == 0 and e[0] in (E.TOKEN, E.NOT_IN_SET))
    ids, pos, doc = row_col[:3]
    mask = sets.masks[first.plan.actions[0].think_mask]
    with torch.no_grad():
        h = mdl.base_model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0, decision[1]]
        p = torch.softmax(M.final_logits(mdl, h), -1)
    p_think, p_act = float(p[mask].sum()), float(p[~mask].sum())
    assert abs(p_think + p_act - 1) < 1e-5
    # and rollouts think as often as it says (within 4 standard deviations)
    thinks = np.mean([r.latents[0] is not None for r in rolls])
    sd = (p_think * (1 - p_think) / len(rolls)) ** 0.5
    assert abs(thinks - p_think) < 4 * sd + 1e-3, (thinks, p_think)


# ---- learning ---------------------------------------------------------------------------------------------

def per_line_think(path):
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    return [np.mean([r["latents"][t] is not None for r in rows]) for t in range(2)]


def test_learns_to_write_the_comment_where_it_helps(toy, tmp_path):
    s = E.main(E.parser.parse_args(["--model", str(toy / "base" / "model"), "--data", str(toy / "expert.jsonl"),
                                    "--steps", "25", "--batch-traces", "8", "--group", "8", "--lr", "1e-3",
                                    "--out", str(tmp_path)]))
    curve = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert curve[-1]["reward"] > curve[0]["reward"] + 0.3
    assert curve[-1]["think_rate"] > curve[0]["think_rate"] + 0.15
    first, second = per_line_think(tmp_path / "traces.jsonl")
    assert first > 0.8 and second < 0.1  # where it helps, and not elsewhere
    latents = [json.loads(x)["latents"][0] for x in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert sum(z == "# double it" for z in latents) > 0.7 * len(latents)
    assert s["annotated"] == 64 and (tmp_path / "q" / "model.safetensors").is_file()


def test_a_large_penalty_drives_thinking_to_zero(toy, tmp_path):
    E.main(E.parser.parse_args(["--model", str(toy / "base" / "model"), "--data", str(toy / "expert.jsonl"),
                                "--steps", "15", "--batch-traces", "8", "--group", "8", "--lr", "1e-3",
                                "--penalty", "20", "--out", str(tmp_path)]))
    curve = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert curve[0]["think_rate"] > 0.03 and curve[-1]["think_rate"] < 0.01


def test_two_ranks_shard_the_traces(toy, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          str(ROOT / "estep.py"), "--model", str(toy / "base" / "model"), "--data",
                          str(toy / "expert.jsonl"), "--steps", "3", "--batch-traces", "8", "--group", "4",
                          "--annotate-limit", "10", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f"e{i}" for i in range(10))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_bad_input(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(D.DataError, match="no traces"):
        E.main(E.parser.parse_args(["--model", "tiny-llama", "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path)]))
    with pytest.raises(D.DataError, match="no usable traces"):
        E.main(E.parser.parse_args(["--model", "tiny-llama", "--data", "minicode-midtrain", "--n-tasks", "5",
                                    "--max-lines", "1", "--out", str(tmp_path)]))
