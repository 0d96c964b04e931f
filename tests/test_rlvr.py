"""rlvr.py: advantages, the loss under any split of the batch (micro-batches, ranks), rewards, resume."""
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import data as D
import eval_code as E
import minicode
import model as M
import rlvr
from helpers import tiny, torchrun

ROOT = Path(rlvr.__file__).resolve().parent
SMALL = ["--batch-prompts", "2", "--group", "4", "--eval-limit", "3", "--max-new-tokens", "192", "--micro-rows", "4",
         "--workers", "2"]


def test_group_advantages_match_loop():
    rng = np.random.default_rng(0)
    group = 4
    r = rng.integers(0, 2, size=6 * group).astype(float)
    r[:group] = 1.0  # one group with no spread
    for std_scale in (False, True):
        adv, zero = rlvr.group_advantages(r, group, std_scale)
        for g in range(6):
            rows = r[g * group:(g + 1) * group]
            mean = sum(rows) / group
            std = (sum((x - mean) ** 2 for x in rows) / group) ** 0.5
            for i in range(group):
                want = (rows[i] - mean) / (std + 1e-6 if std_scale else 1.0)
                assert abs(adv[g * group + i] - want) < 1e-9
        assert zero == sum(len(set(r[g * group:(g + 1) * group])) == 1 for g in range(6)) / 6


def fake_samples(n, seed=0, vocab=200, group=4):
    """n samples, prompt-major: each group of `group` shares its problem's prompt, as rlvr.py samples them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % group == 0:
            prompt = rng.integers(3, vocab, size=rng.integers(4, 12)).tolist()
        ids = rng.integers(3, vocab, size=rng.integers(1, 20)).tolist()
        out.append(rlvr.Sample(i // group, prompt, ids, [0.0] * len(ids), "", False))
    return out


def one_update(samples, adv, micro_rows, epochs=1, kl=0.0, seed=0):
    """Parameters after one update of a tiny model by SGD on these samples and advantages."""
    mdl, _ = tiny("tiny-llama", seed=seed)
    mdl.train()
    net = M.ContinuationLogProbs(mdl, temperature=0.9)
    ref = M.ContinuationLogProbs(tiny("tiny-llama", seed=seed + 1)[0], temperature=0.9) if kl else None
    args = rlvr.parser.parse_args(["--epochs", str(epochs), "--kl", str(kl)])
    batches = rlvr.micro_batches(samples, micro_rows, torch.device("cpu"))
    rlvr.score_old(net, ref, batches, torch.device("cpu"))
    rlvr.set_advantages(batches, adv)
    opt = torch.optim.SGD(mdl.parameters(), lr=0.5)
    stats = rlvr.update(net, opt, batches, args, 1, torch.device("cpu"))
    return torch.cat([p.detach().flatten() for p in mdl.parameters()]), stats


@pytest.mark.parametrize("epochs,kl", [(1, 0.0), (2, 0.1)])
def test_update_is_the_same_for_any_micro_batch_split(epochs, kl):
    samples = fake_samples(16)
    adv = np.random.default_rng(1).normal(size=16)
    base, _ = one_update(samples, adv, 16, epochs, kl)
    start, _ = tiny("tiny-llama")
    start = torch.cat([p.detach().flatten() for p in start.parameters()])
    assert (base - start).abs().max() > 1e-4  # one step changes the parameters
    for micro in (8, 4, 3):  # 3: a problem's samples split over two passes, its prompt in both
        other, _ = one_update(samples, adv, micro, epochs, kl)
        assert torch.allclose(base, other, atol=2e-6), (micro, (base - other).abs().max())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_first_epoch_ratio_is_one_and_loss_is_the_policy_gradient(device):
    """With pi_old scored by the same forward, the first epoch's loss gradient is -sum A grad log pi / N.
    On CUDA (fp32) the shared-prompt pass runs GPU attention kernels and must agree just as well."""
    samples = fake_samples(8)
    adv = np.random.default_rng(2).normal(size=8)
    mdl, _ = tiny("tiny-llama")
    mdl.to(device)
    net = M.ContinuationLogProbs(mdl, temperature=1.0)
    (b,) = rlvr.micro_batches(samples, 8, torch.device(device))
    assert len(b.layout.plen) == 2  # two problems: each prompt once
    rlvr.score_old(net, None, [b], torch.device(device))
    if device == "cuda":  # pi_old was scored under bf16 autocast, as training runs there; the test is in fp32
        with torch.no_grad():
            fp32 = net(b.layout)
        assert (b.old - fp32).abs().max() < 0.05
        b.old = fp32
    rlvr.set_advantages([b], adv)
    new = net(b.layout)
    loss, _, clipped = rlvr.policy_loss(new, b, 0.2, 0.28, 0.0, len(new))
    assert int(clipped) == 0
    # brute force: every sample alone through the model, log-probs of its completion tokens
    surrogate, k = 0.0, 0
    for d, s in enumerate(samples):
        ids = torch.tensor([s.prompt + s.ids], device=device)
        lp = torch.log_softmax(mdl(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        mine = lp[len(s.prompt) - 1:]
        assert torch.allclose(new[k:k + len(s.ids)], mine, atol=1e-5)
        assert torch.equal(b.sample[k:k + len(s.ids)].cpu(), torch.full((len(s.ids),), d))  # each token's advantage is its sample's
        surrogate, k = surrogate - (mine * float(adv[d])).sum(), k + len(s.ids)
    assert k == len(new)
    surrogate = surrogate / k
    g1 = torch.autograd.grad(loss, list(mdl.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(surrogate, list(mdl.parameters()))
    for x, y in zip(g1, g2):
        assert torch.allclose(x, y, atol=1e-6)


RANKS_SCRIPT = """
import sys, numpy as np, torch, torch.distributed as dist
sys.path[:0] = [{root!r}, {tests!r}]
import model as M, rlvr
from test_rlvr import fake_samples
from helpers import tiny

def run(info):  # in a function, so that the DDP/FSDP wrappers are gone before close_dist, as in the scripts
    samples, adv = fake_samples(16), np.random.default_rng(1).normal(size=16)
    n = len(samples) // info.world
    mine = slice(info.rank * n, (info.rank + 1) * n)
    mdl, _ = tiny("tiny-llama")
    mdl.train()
    args = rlvr.parser.parse_args(["--epochs", "2", "--kl", "0.1"] + {flags!r})
    net = M.wrap_for_ranks(M.ContinuationLogProbs(mdl, temperature=0.9), info, args.fsdp)
    ref = M.wrap_for_ranks(M.ContinuationLogProbs(tiny("tiny-llama", seed=1)[0].requires_grad_(False), temperature=0.9),
                           info, args.fsdp)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)  # before any forward, as wrap_for_ranks says
    batches = rlvr.micro_batches(samples[mine], 4, info.device)
    rlvr.score_old(net, ref, batches, info.device)
    rlvr.set_advantages(batches, adv[mine])
    rlvr.update(net, optimizer, batches, args, info.world, info.device)
    weights = M.full_model_state(net)  # FSDP: gathered from the shards
    if M.is_main():
        torch.save(torch.cat([w.flatten() for w in weights.values()]), {out!r})

run(M.init_dist())
M.close_dist()
"""


def test_one_rank_equals_two_ranks(tmp_path):
    """One update (2 epochs, KL to a reference) on 1 rank, 2 DDP ranks and 2 FSDP ranks (policy and
    reference sharded): the same weights (2e-6, tighter than mstep's 1e-5; they differ by ~1e-8)."""
    results = {}
    for name, ranks, flags in (("one", 1, []), ("ddp", 2, []), ("fsdp", 2, ["--fsdp"])):
        out, script = tmp_path / f"{name}.pt", tmp_path / f"{name}.py"
        script.write_text(RANKS_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), flags=flags, out=str(out)))
        torchrun(script, ranks=ranks, cwd=tmp_path)
        results[name] = torch.load(out)
    start, _ = tiny("tiny-llama")
    assert (results["one"] - torch.cat([p.detach().flatten() for p in start.parameters()])).abs().max() > 1e-4
    for name in ("ddp", "fsdp"):
        diff = (results["one"] - results[name]).abs().max()
        assert torch.allclose(results["one"], results[name], atol=2e-6), (name, diff)


def test_fsdp_run_and_resume_equal_ddp(tmp_path):
    """rlvr.py on 2 ranks with --fsdp (policy and KL reference sharded), 1 step then --resume to 2, against 2
    DDP ranks for 2 steps: the same samples (drawn from the sampling copy, refilled from the shards after
    each step and from the FSDP checkpoint on resuming), metrics and model, saved whole."""
    common = SMALL + ["--kl", "0.1", "--lr", "1e-4", "--eval-every", "2"]
    torchrun(ROOT / "rlvr.py", [*common, "--steps", "2", "--out", tmp_path / "ddp"])
    torchrun(ROOT / "rlvr.py", [*common, "--steps", "1", "--fsdp", "--out", tmp_path / "fsdp"])
    torchrun(ROOT / "rlvr.py", [*common, "--steps", "2", "--fsdp", "--resume", "--out", tmp_path / "fsdp"])
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert [x["step"] for x in a] == [x["step"] for x in b] == [0, 1, 2]
    for x, y in zip(a, b):
        for k, v in x.items():
            if not k.endswith("_s") and k != "seconds":
                assert v == pytest.approx(y[k], rel=1e-5, abs=1e-5), (x["step"], k)
    assert a[2]["kl"] > 0  # the reference took part
    wa, wb = (M.load_model(str(tmp_path / x / "model"), device="cpu")[0].state_dict() for x in ("ddp", "fsdp"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_partial_credit_is_the_share_of_asserts_passed():
    problem = D.Problem("t/0", "def f(x):\n", "f", textwrap.dedent("""
        def check(candidate):
            assert candidate(1) == 2
            assert candidate(2) == 4
            assert candidate(3) == 7
        """), source="jsonl")
    assert len(E.split_asserts(problem.test)) == 3
    with E.Executor(2) as ex:
        for partial, want in ((True, 2 / 3), (False, 0.0)):
            s = rlvr.Sample(0, [1], [2], [0.0], "    return 2 * x\n", False)
            s.futures = [ex.submit(j) for j in E.jobs_for(problem, s.text, per_assert=partial)]
            assert rlvr.collect_rewards([s], partial)[0] == pytest.approx(want)


def test_split_asserts_on_benchmark_shapes():
    mbpp = "\n\nimport math\nassert f(1) == 1\nassert f(2) == 2\n\n\ndef check(candidate):\n    pass\n"
    variants = E.split_asserts(mbpp)
    assert len(variants) == 2 and all("import math" in v and v.count("assert") == 1 for v in variants)
    assert E.split_asserts("def check(candidate):\n    assert candidate(1); assert candidate(2)\n") == \
        ["def check(candidate):\n    assert candidate(1); assert candidate(2)\n"]  # one line: not split
    task = minicode.load_problems("minicode-train")[0]
    assert len(E.split_asserts(task.test)) == task.test.count("assert ")


def test_training_problems_never_include_eval_tasks():
    evals = [D.Problem("Mbpp/602", "x", source="mbpp+"), D.Problem("HumanEval/1", "def g():\n    '''Sum.'''\n")]
    train = [D.Problem("mbpp/601", "a", source="mbpp"), D.Problem("mbpp/602", "b", source="mbpp"),
             D.Problem("other/1", "def g():\n  '''sum.'''\n", source="jsonl"), D.Problem("other/2", "new")]
    assert [p.task_id for p in D.drop_overlap(train, evals)] == ["mbpp/601", "other/2"]


def test_reward_phase_is_bounded_under_torchrun():
    assert rlvr.check_reward_bound(64, 8, 3.0, world=2) < rlvr.DIST_TIMEOUT_S / 2
    with pytest.raises(ValueError, match="distributed timeout"):
        rlvr.check_reward_bound(4096, 4, 30.0, world=2)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_a_cpu_bf16_step_samples_and_trains(tmp_path, monkeypatch):
    """--cpu-bf16: the sampler is a bf16 copy and training runs under bf16 autocast; they still agree on
    the sampled tokens' log-probs to bf16's precision, and the step moves the weights."""
    monkeypatch.setattr(M, "CPU_BF16", False)  # restored after the test: main sets it from the flag
    rlvr.main(rlvr.parser.parse_args(SMALL + ["--steps", "1", "--batch-prompts", "8", "--eval-every", "2", "--cpu-bf16",
                                              "--out", str(tmp_path)]))
    m = metrics(tmp_path)[1]
    assert m["zero_spread"] < 1 and 1e-6 < m["logprob_gap"] < 0.1, m
    monkeypatch.setattr(M, "CPU_BF16", False)
    a, _ = M.load_model(str(tmp_path / "model"), device="cpu")
    base, _ = M.load_model("minicode-base", device="cpu")
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), base.parameters()))


def test_run_logs_the_curve_and_resumes_exactly(tmp_path):
    """A 2-step run from the shipped base, against 1 step then --resume to 2: same metrics, same model."""
    summary = rlvr.main(rlvr.parser.parse_args(SMALL + ["--steps", "2", "--eval-every", "2", "--out", str(tmp_path / "a")]))
    m = metrics(tmp_path / "a")
    assert [x["step"] for x in m] == [0, 1, 2] and "eval_pass1" in m[0] and "eval_pass1" in m[2]
    assert summary["curve"][0][0] == 0 and summary["curve"][-1][0] == 2
    for key in ("reward", "think_rate", "sample_len", "truncated", "zero_spread", "sample_s", "reward_wait_s", "train_s"):
        assert key in m[1], key
    assert m[1]["logprob_gap"] < 1e-4  # the sampler and the trainer agree on the sampled tokens' log-probs
    assert m[1]["reward"] > 0 and m[1]["truncated"] < 0.5  # the shipped base writes minicode programs that pass
    rlvr.main(rlvr.parser.parse_args(SMALL + ["--steps", "1", "--eval-every", "2", "--out", str(tmp_path / "b")]))
    resumed = rlvr.main(rlvr.parser.parse_args(SMALL + ["--steps", "2", "--eval-every", "2", "--resume",
                                                        "--out", str(tmp_path / "b")]))
    assert [s for s, _ in resumed["curve"]] == [0, 1, 2]  # the whole curve, step 0 included
    m2 = metrics(tmp_path / "b")
    assert [x["step"] for x in m2] == [0, 1, 2]
    assert m2[2]["reward"] == m[2]["reward"] and abs(m2[2]["kl"] - m[2]["kl"]) < 1e-9
    a, _ = M.load_model(str(tmp_path / "a" / "model"), device="cpu")
    b, _ = M.load_model(str(tmp_path / "b" / "model"), device="cpu")
    base, _ = M.load_model("minicode-base", device="cpu")
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), base.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), base.parameters()))
    with pytest.raises(ValueError, match="--group"):
        rlvr.main(rlvr.parser.parse_args(SMALL[:2] + ["--group", "2"] + SMALL[4:] +
                                         ["--steps", "3", "--resume", "--out", str(tmp_path / "b")]))
