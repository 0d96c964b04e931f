"""estep.py: returns and advantages against loops, units against the tokenizer, every log-probability the
policy gradient uses against a teacher-forced recomputation, forced lines byte for byte, the penalty,
and a small model learning to write the comment that helps."""
import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import data as D
import minicode
import estep as E
import model as M
import mstep
from helpers import real_code, tiny, torchrun

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


def test_step_stats_count_what_comments_bought():
    from types import SimpleNamespace as NS
    rolls = [NS(latents=[None, "# a"], roles=[E.CODE, E.COMMENT, E.COMMENT, E.CODE], lines=[0, 1, 1, 1], cut=[False, True]),
             NS(latents=["# b", None], roles=[E.COMMENT, E.CODE, E.CODE], lines=[0, 0, 1], cut=[False, False])]
    r = [np.array([-1.0, -2.0]), np.array([-3.0, -4.0])]
    adv = [np.array([0.5, 1.5]), np.array([-0.25, 2.0])]
    s = E.step_stats(rolls, r, adv, flat=1, n_groups=4)
    assert s["think_advantage"] == (1.5 - 0.25) / 2 and s["think_rate"] == 0.5 and s["latent_len"] == 1.5
    assert s["cut_share"] == 0.5 and s["elbo"] == -5.0 and s["zero_spread"] == 0.25 and s["think_pays"] == 0.5


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny model pretrained on two kinds of functions. f: the first line is one of 8 at random, except
    after the comment '# double it', which is always followed by 'y = x * 2' (a comment that helps).
    g: the first line is one of 8 at random, and half the time a '# note' comment precedes it that says
    nothing about it (a comment that cannot help). Expert traces of both."""
    d = tmp_path_factory.mktemp("toy")
    rng = random.Random(0)
    pre, lat = [], []
    for i in range(3000):
        commented = rng.random() < 0.3
        pre.append(D.Trace(f"p{i}", "def f(x):\n", [f"    y = {'x * 2' if commented else rng.choice(OPS)}\n", "    return y\n"]))
        lat.append(["# double it" if commented else None, None])
    for i in range(1500):
        pre.append(D.Trace(f"g{i}", "def g(x):\n", [f"    y = {rng.choice(OPS)}\n", "    return y\n"]))
        lat.append(["# note" if rng.random() < 0.5 else None, None])
    order = rng.sample(range(len(pre)), len(pre))
    D.write_traces(d / "pretrain.jsonl", [pre[i] for i in order], [lat[i] for i in order])
    D.write_traces(d / "expert.jsonl", [D.Trace(f"e{i}", "def f(x):\n", ["    y = x * 2\n", "    return y\n"]) for i in range(64)])
    D.write_traces(d / "noise.jsonl", [D.Trace(f"n{i}", "def g(x):\n", [f"    y = {OPS[i % 8]}\n", "    return y\n"])
                                       for i in range(64)])
    for family, out in (("llama", "base"), ("gpt2", "base-gpt2")):  # newline-last and newline-first units
        mstep.main(mstep.parser.parse_args([
            "--init", "scratch", "--family", family, "--data", str(d / "pretrain.jsonl"), "--hidden", "64",
            "--layers", "2", "--heads", "4", "--kv-heads", "2" if family != "gpt2" else "4", "--vocab-size", "300",
            "--seq-len", "128", "--batch-tokens", "4096", "--micro-rows", "32", "--steps", "200", "--lr", "3e-3",
            "--warmup", "10", "--eval-every", "200", "--save-every", "1000", "--out", str(d / out)]))
    return d


# ---- units and exact log-probabilities ----------------------------------------------------------------------

@pytest.mark.parametrize("preset,newline_first", [("tiny-llama", False), ("tiny-qwen2", False), ("tiny-gpt2", True)])
def test_units_reproduce_the_tokenizer(preset, newline_first):
    _, tok = tiny(preset)
    units = E.Units(tok)
    assert units.newline_first == newline_first
    sets = E.ThinkSets(tok, len(tok), "cpu", units.newline_first)
    traces = [t.trace for t in minicode.tasks(200, seed=3)]
    same = 0
    for t in traces:
        plan = E.plan_trace(units, sets, t)
        ids = plan.prompt + [i for a in plan.actions for i in a.lead + a.prefix + a.rest] + plan.suffix
        assert tok.decode(ids, skip_special_tokens=True) == D.render(t)  # always the exact text
        same += ids == tok.encode(D.render(t))
    assert same >= 0.9 * len(traces), same  # and nearly always the tokenizer's own tokens


def rollouts_of(mdl, tok, traces, group, temperature=1.0, seed=0, max_latent=12):
    units = E.Units(tok)
    sets = E.ThinkSets(tok, mdl.get_output_embeddings().weight.shape[0], mdl.device, units.newline_first)
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
    traces = [t.trace for t in minicode.tasks(4, seed=8)]
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
    tensors, old, _, weight = E.event_batch(rolls, None, "cpu")
    assert bool((weight == 1).all())  # on-policy: every event weighs 1
    with torch.no_grad():
        new = net(*tensors)
    assert torch.allclose(new, old, atol=2e-4), (new - old).abs().max()


@pytest.mark.parametrize("preset", ["tiny-qwen2", "minicode-base", "toy-gpt2"])
def test_the_decision_is_a_distribution_over_act_and_think(preset, toy):
    mdl, tok = load(preset, toy)
    trace = (D.read_traces(toy / "expert.jsonl")[0][0] if preset.startswith("toy")
             else minicode.tasks(1, seed=2)[0].trace)
    trace = D.Trace("one", trace.prompt, trace.actions[:1])
    rolls, sets, _ = rollouts_of(mdl, tok, [trace], group=600, temperature=1.0, seed=5)
    # P(think) + P(act) = 1 at the boundary, recomputed both ways from one teacher-forced pass
    first = rolls[0]
    decision = next(e for e in first.events if e[3] == 0 and e[0] in (E.TOKEN, E.NOT_IN_SET))
    ids = torch.tensor([first.plan.prompt + first.ids])
    mask = sets.masks[first.plan.actions[0].think_mask]
    with torch.no_grad():
        h = mdl.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, decision[1]]
        p = torch.softmax(M.final_logits(mdl, h), -1)
    p_think, p_act = float(p[mask].sum()), float(p[~mask].sum())
    assert abs(p_think + p_act - 1) < 1e-5
    # and rollouts think as often as it says (within 4 standard deviations)
    thinks = np.mean([r.latents[0] is not None for r in rolls])
    sd = (p_think * (1 - p_think) / len(rolls)) ** 0.5
    assert abs(thinks - p_think) < 4 * sd + 1e-3, (thinks, p_think)


def think_probability(mdl, sets, rollout, grad=False):
    """q(think) at the first line of a rollout's trace, from a plain forward pass over its own tokens, and
    the position of that decision."""
    decision = next(e for e in rollout.events if e[3] == 0 and e[0] in (E.TOKEN, E.NOT_IN_SET))
    ids = torch.tensor([rollout.plan.prompt + rollout.ids])
    with torch.set_grad_enabled(grad):
        h = mdl.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, decision[1]]
        p = torch.softmax(M.final_logits(mdl, h).float(), -1)
    return p[sets.masks[rollout.plan.actions[0].think_mask]].sum(), decision


def test_exploring_draws_the_decision_from_the_behaviour_policy(toy):
    mdl, tok = load("toy-llama", toy)
    trace = D.read_traces(toy / "expert.jsonl")[0][0]
    explore = 0.5
    rolls, sets, units = rollouts_of(mdl, tok, [D.Trace("one", trace.prompt, trace.actions[:1])], group=1500,
                                     seed=3, max_latent=1)
    q_think = float(think_probability(mdl, sets, rolls[0])[0])
    plans = [rolls[0].plan]
    rolls = E.rollout(mdl, units, sets, plans, 1500, 1, 1.0, seed=4, explore=explore)
    b_think = explore + (1 - explore) * q_think
    assert 0.1 < q_think < 0.6  # the toy model comments here sometimes: both branches are exercised
    thinks = np.mean([r.latents[0] is not None for r in rolls])
    assert abs(thinks - b_think) < 4 * (b_think * (1 - b_think) / len(rolls)) ** 0.5, (thinks, b_think)
    for r in rolls[:50]:
        kind, _, _, _, logq, logb = next(e for e in r.events if e[3] == 0)
        if kind == E.NOT_IN_SET:
            assert abs(logq - math.log(1 - q_think)) < 1e-4 and abs(logb - math.log(1 - b_think)) < 1e-4
        else:  # b(x) = q(x) b(think) / q(think)
            assert abs(logb - logq - math.log(b_think / q_think)) < 1e-4
    # the events' log q are q's own, whichever policy drew them
    tensors, old, _, weight = E.event_batch(rolls[:200], None, "cpu")
    with torch.no_grad():
        new = E.EventLogProbs(mdl, sets, 1.0)(*tensors)
    assert torch.allclose(new, old, atol=2e-4) and bool((weight != 1).any())


def test_decisions_can_be_forced_per_line_and_probes_share_their_lines(toy):
    mdl, tok = load("toy-llama", toy)
    trace = D.read_traces(toy / "expert.jsonl")[0][0]
    _, sets, units = rollouts_of(mdl, tok, [trace], group=1, max_latent=4)
    plan = E.plan_trace(units, sets, trace)
    rolls = E.rollout(mdl, units, sets, [plan, plan], 40, 4, 1.0, seed=1, explore=[[1.0, -1.0], [-1.0, 1.0]])
    assert all(r.latents[0] is not None and r.latents[1] is None for r in rolls[:40])
    assert all(r.latents[0] is None and r.latents[1] is not None for r in rolls[40:])
    for r in rolls[40:]:  # made to act: b(act) = 1, while the event keeps q's own log-probability
        kind, _, _, _, logq, logb = next(e for e in r.events if e[3] == 0)
        assert kind == E.NOT_IN_SET and logb == 0.0 and logq < 0
    probes = E.probe_lines([plan] * 4000, 0.25, np.random.default_rng(0))
    flat = np.concatenate(probes)
    assert set(flat.tolist()) == {0.0, 0.5} and abs(np.mean(flat == 0.5) - 0.25) < 0.02
    assert probes == E.probe_lines([plan] * 4000, 0.25, np.random.default_rng(0))  # a resumed run probes the same


def test_the_explored_decision_gradient_is_qs_policy_gradient(toy):
    """Brute force: with advantage A_think after a comment and A_act after none, the expected policy gradient
    of the decision under q is sum_e q(e) A(e) grad log q(e) = (A_think - A_act) grad q(think). Rollouts drawn
    from the behaviour policy (half the lines forced to think) and weighted by q / b must estimate it; the
    same rollouts without the weights estimate another vector."""
    mdl, tok = load("toy-llama", toy)
    mdl = mdl.float()
    trace = D.read_traces(toy / "expert.jsonl")[0][0]
    one = D.Trace("one", trace.prompt, trace.actions[:1])
    _, sets, units = rollouts_of(mdl, tok, [one], group=1, max_latent=1)
    plan = E.plan_trace(units, sets, one)
    a_think, a_act = 1.0, -0.5
    rolls = E.rollout(mdl, units, sets, [plan], 4000, 1, 1.0, seed=6, explore=0.5)
    params = [p for p in mdl.parameters() if p.requires_grad]
    mdl.zero_grad()
    q_think, _ = think_probability(mdl, sets, rolls[0], grad=True)
    q_think.backward()
    truth = torch.cat([p.grad.flatten() for p in params]) * (a_think - a_act)
    unit = truth / truth.norm()
    args = type("A", (), dict(clip=0.2, kl=0.0))
    net = E.EventLogProbs(mdl, sets, 1.0)

    def estimates(weighted):
        out = []
        for k in range(0, len(rolls), 200):
            part = rolls[k:k + 200]
            if not weighted:
                part = [dataclasses.replace(r, events=[e[:5] + (e[4],) for e in r.events]) for r in part]
            adv = [np.array([a_think if r.latents[0] is not None else a_act]) for r in part]
            mdl.zero_grad()
            loss, _ = E.policy_loss(net, None, part, adv, args, "cpu", float(len(part)))
            loss.backward()
            out.append(float(-torch.cat([p.grad.flatten() for p in params]) @ unit))
        return np.mean(out), np.std(out) / len(out) ** 0.5

    mean, se = estimates(weighted=True)
    assert abs(mean - truth.norm()) < 4 * se + 0.02 * truth.norm(), (mean, se, float(truth.norm()))
    mean, se = estimates(weighted=False)
    assert abs(mean - truth.norm()) > 6 * se, (mean, se, float(truth.norm()))  # the test can tell


def brute_force_rewards(mdl, tok, rollout, penalty):
    """The paper's r_t = log pi(a_t | s_t, z_t) - c [think] on one rollout, from a plain forward pass of pi
    over the rollout's own tokens, without packing and without ThinkSets: each action scores its lead and
    the prefix its code shares with a comment line; then <think> the code line after the comment, <act>
    the rest of the line minus log pi(act), with P(think) summed over the vocabulary from token texts.
    The trace's suffix counts with the last action, so that the rewards sum to the whole document's score."""
    ids = rollout.plan.prompt + rollout.ids
    with torch.no_grad():
        logp = torch.log_softmax(mdl(torch.tensor([ids], device=mdl.device)).logits[0].double(), -1).cpu()
    texts = [tok.decode([v]) for v in range(logp.shape[1])]
    pos, out = len(rollout.plan.prompt), []
    for t, (a, z) in enumerate(zip(rollout.plan.actions, rollout.latents)):
        def take(tokens):
            nonlocal pos
            assert ids[pos:pos + len(tokens)] == tokens
            pos += len(tokens)
            return sum(float(logp[pos - len(tokens) + k - 1, v]) for k, v in enumerate(tokens))
        r = take(a.lead) + take(a.prefix)
        if z is None:
            line = tok.decode(ids[:pos], skip_special_tokens=True).rsplit("\n", 1)[-1]
            start = line + D.indentation(rollout.plan.trace.actions[t]).removeprefix(line) + "#"
            think = [v for v, x in enumerate(texts) if "\n" not in x and "\r" not in x and (line + x).startswith(start)
                     and line == start[:len(line)] and v != tok.eos_token_id]
            p_think = float(logp[pos - 1, think].exp().sum()) if think else 0.0
            r += take(a.rest) - math.log1p(-p_think)
        else:
            pos += sum(1 for role, line in zip(rollout.roles, rollout.lines)
                       if line == t and role in (E.COMMENT, E.NEWLINE))  # the comment: q's, whatever it wrote
            r += take(a.full) - penalty
        out.append(r)
    out[-1] += take(rollout.plan.suffix)  # the text after the last action (a last newline) goes with it
    assert pos == len(ids)
    return out


@pytest.mark.parametrize("preset", ["minicode-base", "toy-gpt2"])
def test_rewards_are_the_papers_formula(preset, toy):
    mdl, tok = load(preset, toy)
    traces = ([t.trace for t in minicode.tasks(3, seed=8)] if preset == "minicode-base"
              else D.read_traces(toy / "expert.jsonl")[0][:3])
    rolls, sets, _ = rollouts_of(mdl, tok, traces, group=6, seed=2)
    assert any(z for r in rolls for z in r.latents) and any(z is None for r in rolls for z in r.latents)
    got = E.rewards(mdl, sets, rolls, 0.05, micro_rows=5)
    for r, g in zip(rolls, got):
        want = brute_force_rewards(mdl, tok, r, 0.05)
        assert np.allclose(g, want, atol=1e-3), (g, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_rollouts_and_rewards_are_exact():
    """On CUDA, rollouts replay CUDA graphs between ragged feeds, and the reward and training passes run
    SharedPrompts' grouped attention on GPU kernels. In fp32 they keep the CPU tests' exactness: expert
    lines forced byte for byte, sampled log-probs = the training pass's, rewards = the paper's formula."""
    mdl, tok = M.load_model("minicode-base", device="cuda", dtype=torch.float32)
    traces = [t.trace for t in minicode.tasks(4, seed=8)]
    rolls, sets, _ = rollouts_of(mdl, tok, traces, group=8, temperature=0.9, seed=1)
    assert any(z for r in rolls for z in r.latents) and any(z is None for r in rolls for z in r.latents)
    for r in rolls:
        assert tok.decode(r.plan.prompt + r.ids, skip_special_tokens=True) == D.render(r.plan.trace, r.latents)
    tensors, old, *_ = E.event_batch(rolls, None, mdl.device)
    with torch.no_grad():
        new = E.EventLogProbs(mdl, sets, 0.9)(*tensors)
    assert torch.allclose(new, old, atol=2e-4), (new - old).abs().max()
    got = E.rewards(mdl, sets, rolls, 0.05, micro_rows=5)
    for r, g in zip(rolls[::4], got[::4]):
        want = brute_force_rewards(mdl, tok, r, 0.05)
        assert np.allclose(g, want, atol=1e-3), (g, want)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "minicode-base"])
def test_forced_rollouts_write_the_given_latents(preset, toy):
    mdl, tok = load(preset, toy)
    units = E.Units(tok)
    sets = E.ThinkSets(tok, mdl.get_output_embeddings().weight.shape[0], "cpu", units.newline_first)
    for task in minicode.midtrain_tasks(20, seed=3):
        plan = E.plan_trace(units, sets, task.trace)
        for latents in (task.true_plan(), [None] * len(task.step_of), ["# a note"] * len(task.step_of)):
            r = E.forced_rollout(units, sets, plan, latents)
            assert r.latents == latents
            assert tok.decode(plan.prompt + r.ids, skip_special_tokens=True) == D.render(task.trace, latents)
            assert sum(e[0] == E.NOT_IN_SET for e in r.events) == sum(z is None for z in latents)


@pytest.mark.parametrize("world", ["plain", "skills"])
def test_comment_naming_reads_the_world(world):
    tasks = minicode.midtrain_tasks(30, seed=4, world=world)  # skills: one comment per skill, naming it
    right = E.comment_naming([t.true_plan() for t in tasks], tasks)
    n_steps = sum(len(t.kinds) for t in tasks)
    assert right == dict(comments=n_steps, named_step=n_steps, named_param=n_steps, wrong_step=0, unnamed=0)
    shifted = []  # each step's plan comment moved to the next step's first line: it names a step already done
    for t in tasks:
        plan = [z for z in t.true_plan() if z]
        starts = [i for i, s in enumerate(t.step_starts()) if s]
        z = [None] * len(t.step_of)
        for i, comment in zip(starts[1:] + [len(z) - 1], plan):
            z[i] = comment
        shifted.append(z)
    wrong = E.comment_naming(shifted, tasks)
    repeats = sum(t.kinds[i] == t.kinds[i + 1] for t in tasks for i in range(len(t.kinds) - 1))  # never: no kind twice
    assert wrong["comments"] == n_steps and wrong["wrong_step"] == n_steps - repeats and wrong["named_step"] == repeats
    other = E.comment_naming([["# walk the list"] + [None] * (len(t.step_of) - 1) for t in tasks], tasks)
    assert other["unnamed"] == len(tasks) and other["wrong_step"] == 0


def test_chain_counts_read_where_a_chain_starts_and_its_value():
    """In the chain world: a comment counts at the line where the step with the chain starts, and is right
    only if it names that step with the chain's value; comments elsewhere and missing ones are not."""
    tasks = minicode.midtrain_tasks(30, seed=4, world="chain")
    assert E.chain_counts([t.true_plan() for t in tasks], tasks) == dict(
        chain_starts=30, thinks_at_chain=30, chain_right=30)  # one chain per task
    assert E.chain_counts([[None] * len(t.step_of) for t in tasks], tasks) == dict(
        chain_starts=30, thinks_at_chain=0, chain_right=0)
    off = []  # the right comment at the chain's line, its value off by one; the true plan everywhere else
    for t in tasks:
        z = t.true_plan()
        at = t.chain_starts().index(True)
        i = t.step_of[at]
        value = t.params[i][next(iter(t.exprs[i]))]
        z[at] = z[at].replace(f"= {value}:", f"= {value + 1}:").replace(f" {value}", f" {value + 1}")
        off.append(z)
    assert E.chain_counts(off, tasks) == dict(chain_starts=30, thinks_at_chain=30, chain_right=0)
    assert E.chain_counts([t.true_plan() for t in minicode.midtrain_tasks(5, world="anon")],
                          minicode.midtrain_tasks(5, world="anon"))["chain_starts"] == 0


# ---- learning ---------------------------------------------------------------------------------------------

def updates(out):
    """The metrics of the updates (metrics.jsonl also holds the held-out instruments at step 0)."""
    return [m for m in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if m["step"] > 0]


def per_line_think(path):
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    return [np.mean([r["latents"][t] is not None for r in rows]) for t in range(2)]


@pytest.mark.parametrize("precision", [[], ["--cpu-bf16"]])
def test_learns_to_write_the_comment_where_it_helps(toy, tmp_path, precision, monkeypatch):
    monkeypatch.setattr(M, "CPU_BF16", False)  # restored after the test: main sets it from the flag
    s = E.main(E.parser.parse_args(["--model", str(toy / "base" / "model"), "--data", str(toy / "expert.jsonl"),
                                    "--steps", "25", "--batch-traces", "8", "--group", "8", "--lr", "1e-3",
                                    "--out", str(tmp_path)] + precision))
    curve = updates(tmp_path)
    assert curve[-1]["reward"] > curve[0]["reward"] + 0.3
    assert curve[-1]["think_rate"] > curve[0]["think_rate"] + 0.15
    first, second = per_line_think(tmp_path / "traces.jsonl")
    assert first > 0.8 and second < 0.1  # where it helps, and not elsewhere
    latents = [json.loads(x)["latents"][0] for x in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert sum(z == "# double it" for z in latents) > 0.7 * len(latents)
    assert s["annotated"] == 48 and (tmp_path / "q" / "model.safetensors").is_file()  # 16 held out, never annotated


@pytest.mark.parametrize("penalty", ["0.05", "0.5"])
def test_a_comment_that_says_nothing_is_dropped_for_any_penalty(toy, tmp_path, penalty):
    """pi comments before g's first line half the time, but '# note' says nothing about that line: with the
    reward conditional on the latent, thinking only costs c, so q stops. (With pi's P(think) left in the
    <act> reward, acting was docked ~0.7 nats here and q learned to think.)"""
    E.main(E.parser.parse_args(["--model", str(toy / "base" / "model"), "--data", str(toy / "noise.jsonl"),
                                "--steps", "20", "--batch-traces", "8", "--group", "8", "--lr", "1e-3",
                                "--penalty", penalty, "--out", str(tmp_path)]))
    curve = updates(tmp_path)
    assert curve[0]["think_rate"] > 0.1 and max(c["think_rate"] for c in curve[-5:]) < 0.03
    assert per_line_think(tmp_path / "traces.jsonl")[0] < 0.05


def test_gain_annotation_keeps_only_comments_that_pay(toy, tmp_path):
    """q = pi, no updates: one rollout keeps pi's habit of writing '# note' before g's first line; the gain
    filter drops them (they do not raise the code's likelihood by c), and keeps '# double it' before f's."""
    def annotate(data, mode):
        out = tmp_path / f"{data}-{mode}"
        s = E.main(E.parser.parse_args(["--model", str(toy / "base" / "model"), "--data", str(toy / f"{data}.jsonl"),
                                        "--steps", "0", "--annotate", mode, "--penalty", "0.5", "--out", str(out)]))
        return s["annotated_think_rate"], per_line_think(out / "traces.jsonl")[0]
    assert annotate("noise", "one")[1] > 0.25 and annotate("noise", "gain")[1] < 0.05
    one, gain = annotate("expert", "one")[1], annotate("expert", "gain")[1]
    assert gain > 0.15 and gain >= one - 0.05


def test_resume_continues_exactly(toy, tmp_path):
    common = ["--model", str(toy / "base" / "model"), "--data", str(toy / "expert.jsonl"), "--batch-traces", "8",
              "--group", "4", "--lr", "1e-3", "--eval-every", "2", "--annotate-limit", "8"]
    E.main(E.parser.parse_args(common + ["--steps", "4", "--out", str(tmp_path / "a")]))
    E.main(E.parser.parse_args(common + ["--steps", "2", "--save-every", "2", "--out", str(tmp_path / "b")]))
    with pytest.raises(ValueError, match="--penalty"):  # a checkpoint of other settings is refused
        E.main(E.parser.parse_args(common + ["--steps", "4", "--resume", "--penalty", "0.3",
                                             "--out", str(tmp_path / "b")]))
    E.main(E.parser.parse_args(common + ["--steps", "4", "--resume", "--out", str(tmp_path / "b")]))
    a, b = (Path(tmp_path / x / "metrics.jsonl").read_text().splitlines() for x in "ab")
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if not k.endswith("_s") and k != "tokens_per_s"
                            and k != "lines_per_s"} for x in lines]  # noqa: E731
    assert strip(a) == strip(b) and len(a) == 5  # step 0 and four updates
    wa, wb = (M.load_model(str(tmp_path / x / "q"), device="cpu")[0].state_dict() for x in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_large_penalty_drives_thinking_to_zero(toy, tmp_path):
    E.main(E.parser.parse_args(["--model", str(toy / "base" / "model"), "--data", str(toy / "expert.jsonl"),
                                "--steps", "15", "--batch-traces", "8", "--group", "8", "--lr", "1e-3",
                                "--penalty", "20", "--out", str(tmp_path)]))
    curve = updates(tmp_path)
    assert curve[0]["think_rate"] > 0.03 and curve[-1]["think_rate"] < 0.01


def test_two_ranks_shard_the_traces(toy, tmp_path):
    torchrun(ROOT / "estep.py", ["--model", toy / "base" / "model", "--data", toy / "expert.jsonl", "--steps", "3", "--batch-traces", "8",
              "--group", "4", "--annotate-limit", "10", "--out", tmp_path])
    rows = [json.loads(x) for x in (tmp_path / "traces.jsonl").read_text().splitlines()]
    kept = D.held_out_files(D.read_traces(toy / "expert.jsonl")[0], 64)[0]  # held-out traces get no latents
    assert sorted(r["id"] for r in rows) == sorted(t.id for t in kept[:10])
    assert len(updates(tmp_path)) == 3


RANKS_SCRIPT = """
import copy, sys, torch
sys.path[:0] = [{root!r}]
import data as D, estep as E, model as M

def run(info):  # in a function, so that the DDP/FSDP wrappers are gone before close_dist, as in the scripts
    args = E.parser.parse_args(["--epochs", "2", "--kl", "0.1", "--micro-rows", "4"] + {flags!r})
    pi, tok = M.load_model({model!r}, device="cpu")
    q = copy.deepcopy(pi).requires_grad_(True).train()
    units = E.Units(tok)
    sets = E.ThinkSets(tok, q.get_output_embeddings().weight.shape[0], info.device, units.newline_first)
    plans, _ = E.make_plans(units, sets, D.load_traces({data!r})[0][:8], args.max_lines)
    # every rank samples and scores the whole batch alike (CPU), then trains on its share of the traces
    rolls = E.rollout(q, units, sets, plans, 4, args.max_latent, 1.0, seed=3)
    adv, _ = E.group_advantages(rolls, E.rewards(pi, sets, rolls, args.penalty, 64), 4, args)
    n = len(rolls) // info.world
    mine = slice(info.rank * n, (info.rank + 1) * n)
    net = M.wrap_for_ranks(E.EventLogProbs(q, sets, 1.0), info, args.fsdp)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    E.update(net, E.EventLogProbs(pi, sets, 1.0), optimizer, rolls[mine], adv[mine], args, info.world, info.device)
    weights = M.full_model_state(net)  # FSDP: gathered from the shards
    if M.is_main():
        torch.save(torch.cat([w.flatten() for w in weights.values()]), {out!r})

run(M.init_dist())
M.close_dist()
"""


def test_one_update_one_rank_equals_two_ranks(toy, tmp_path):
    """One update (2 epochs, KL to pi) of q on the same 8 x 4 rollouts on 1 rank, 2 DDP ranks and 2 FSDP
    ranks: the same weights, to mstep's tolerance."""
    results = {}
    for name, ranks, flags in (("one", 1, []), ("ddp", 2, []), ("fsdp", 2, ["--fsdp"])):
        script = tmp_path / f"{name}.py"
        script.write_text(RANKS_SCRIPT.format(root=str(ROOT), model=str(toy / "base" / "model"), flags=flags,
                                              data=str(toy / "expert.jsonl"), out=str(tmp_path / f"{name}.pt")))
        torchrun(script, ranks=ranks)
        results[name] = torch.load(tmp_path / f"{name}.pt")
    start = torch.cat([w.flatten() for w in M.load_model(str(toy / "base" / "model"), device="cpu")[0]
                       .state_dict().values()])
    assert (results["one"] - start).abs().max() > 1e-4  # the update moved q
    for name in ("ddp", "fsdp"):
        diff = (results["one"] - results[name]).abs().max()
        assert torch.allclose(results["one"], results[name], atol=1e-5), (name, diff)


def test_fsdp_run_and_resume_equal_ddp(toy, tmp_path):
    """estep.py on 2 ranks with --fsdp, 2 updates then --resume to 3, against 2 DDP ranks for 3 updates: the
    same metrics (rollouts come from the sampling copy, refilled from the shards after each update and
    from the FSDP checkpoint on resuming), the same annotated traces, and the same q, saved whole."""
    common = ["--model", toy / "base" / "model", "--data", toy / "expert.jsonl", "--batch-traces", "8", "--group", "4",
              "--lr", "1e-3", "--eval-every", "1", "--eval-traces", "8", "--annotate-limit", "8"]
    torchrun(ROOT / "estep.py", common + ["--steps", "3", "--out", tmp_path / "ddp"])
    torchrun(ROOT / "estep.py", common + ["--steps", "2", "--fsdp", "--out", tmp_path / "fsdp"])
    torchrun(ROOT / "estep.py", common + ["--steps", "3", "--fsdp", "--resume", "--out", tmp_path / "fsdp"])
    a, b = (metrics(tmp_path / x) for x in ("ddp", "fsdp"))
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3]
    for x, y in zip(a, b):
        for k, v in x.items():
            if not k.endswith("_s") and k not in ("tokens_per_s", "lines_per_s"):
                assert v == pytest.approx(y[k], rel=1e-5, abs=1e-5), (x["step"], k)
    assert (tmp_path / "ddp" / "traces.jsonl").read_text() == (tmp_path / "fsdp" / "traces.jsonl").read_text()
    wa, wb = (M.load_model(str(tmp_path / x / "q"), device="cpu")[0].state_dict() for x in ("ddp", "fsdp"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_real_code_holds_out_whole_files_and_measures_the_experts_comments(tmp_path):
    data = real_code(tmp_path / "code", 16, seed=0)
    out = tmp_path / "run"
    s = E.main(E.parser.parse_args(["--model", "tiny-llama", "--data", f"stripped:{data}", "--steps", "1",
                                    "--batch-traces", "2", "--group", "2", "--eval-traces", "6", "--micro-rows", "8",
                                    "--out", str(out)]))
    m = s["heldout_curve"][0]
    traces, plans = D.load_traces(f"oracle:{data}")
    kept, held = D.held_out_files(traces, 6)
    assert m["heldout_plan_rate"] == 2 / 4 and m["heldout_plan_per_trace"] == 2  # every function: 2 of its 4 lines
    assert m["heldout_code_ll_plan"] != m["heldout_code_ll_none"]
    annotated = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    assert len(annotated) == len(kept) and not {D.trace_file(r["id"]) for r in annotated} & {D.trace_file(t.id) for t in held}
    assert all("#" not in "".join(r["actions"]) for r in annotated)  # q and the M-step see the code stripped
    # the M-step's three corpora: the same traces with q's comments, with none, with the expert's
    stripped, oracle = (D.read_traces(out / f"{name}.jsonl") for name in ("stripped", "oracle"))
    truth = dict(zip((t.id for t in traces), plans))
    assert [t.id for t in stripped[0]] == [t.id for t in oracle[0]] == [r["id"] for r in annotated]
    assert all(z is None for z in stripped[1]) and oracle[1] == [truth[t.id] for t in oracle[0]]
    # q made to comment where the expert did: its comments, logged, score as the instrument says
    records = [json.loads(x) for x in (out / "comments.jsonl").read_text().splitlines()]
    first = [r for r in records if r["step"] == 0]
    assert {r["step"] for r in records} == {0, 1} and {r["trace"] for r in first} == {t.id for t in held}
    assert all((r["q_at_plan"] is None) == (r["expert"] is None) for r in first)
    assert sum(r["expert"] is not None for r in first) == 2 * len(held)
    pi, tok = M.load_model("tiny-llama", device="cpu")
    units = E.Units(tok)
    sets = E.ThinkSets(tok, pi.get_output_embeddings().weight.shape[0], "cpu", units.newline_first)
    by_id = {t.id: t for t in held}
    ll = 0.0
    for tid in by_id:
        plan = E.plan_trace(units, sets, by_id[tid])
        latents = [None] * len(plan.actions)
        for r in first:
            if r["trace"] == tid and r["q_at_plan"] is not None:
                latents[r["line"]] = r["q_at_plan"]
        ll += E.rewards(pi, sets, [E.forced_rollout(units, sets, plan, latents)], 0.0, 8)[0].sum()
    assert abs(ll / len(held) - m["heldout_code_ll_q_at_plan"]) < 1e-3 * abs(ll / len(held))
    # --eval-data: the instruments read another corpus, the training traces are --data's own, all of them
    other = real_code(tmp_path / "unseen", 3, seed=1)
    s = E.main(E.parser.parse_args(["--model", "tiny-llama", "--data", f"stripped:{data}", "--steps", "0",
                                    "--eval-data", f"stripped:{other}", "--eval-traces", "6", "--micro-rows", "8",
                                    "--out", str(tmp_path / "run2")]))
    assert s["annotated"] == len(traces) and s["heldout_curve"][0]["heldout_plan_per_trace"] == 2


def test_bad_input(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(D.DataError, match="no traces"):
        E.main(E.parser.parse_args(["--model", "tiny-llama", "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path)]))
    with pytest.raises(D.DataError, match="no usable traces"):
        E.main(E.parser.parse_args(["--model", "tiny-llama", "--data", "minicode-midtrain", "--n-tasks", "5",
                                    "--max-lines", "1", "--out", str(tmp_path)]))
