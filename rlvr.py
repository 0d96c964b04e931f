"""rlvr.py: RL with verifiable rewards. GRPO on coding problems whose unit tests decide the reward; the
learning curve (held-out pass@1 against steps) is what tells whether an RA3 start learns faster than an
NTP start.

Paper map (RA3, arXiv 2509.25810, post-training as ../shared/DESIGN.md implements it):
  reward       r_i = 1 if every unit test passes, else 0 (--partial-credit: share of tests passed)  -> collect_rewards
  advantage    A_i = r_i - mean_j r_j over the G samples of one prompt (/ std with --std-scale)  -> group_advantages
  objective    sum_{i,t} min(rho_it A_i, clip(rho_it, 1 - eps_lo, 1 + eps_hi) A_i) / (tokens of the
               global batch, all ranks),  rho_it = pi(y_it | x, y_i<t) / pi_old(y_it | x, y_i<t)  -> policy_loss
               eps_lo = 0.2, eps_hi = 0.28 (a higher upper clip keeps rare good tokens growing)
  KL (off)     + beta * k3(pi || pi_ref) per token, k3 = exp(ref - new) - (ref - new) - 1         -> policy_loss

One step (`rl_step`): sample G completions for each of P prompts with model.py's sampler, a chunk of prompts
at a time, sending each chunk's programs to eval_code.py's sandbox pool as soon as it is sampled; while
the programs run, the GPU scores pi_old (and pi_ref) by the same forward the update will use, so the
first epoch's ratios are exactly 1 (each prompt computed once for its G completions: model.SharedPrompts);
then rewards, advantages, and --epochs passes of clipped updates.
Rewards come from programs that may loop or crash: each runs in its own sandbox with a time limit, and the
worst case of a step is bounded well under the distributed timeout (`check_reward_bound`).

    python rlvr.py                                              # minicode-base on minicode-train
    torchrun --nproc_per_node=8 rlvr.py --model runs/ra3/model --problems mbpp-train --eval-bench mbpp+

Under torchrun the policy is DDP, or with --fsdp sharded by FSDP2 for the update (model.wrap_for_ranks); either
way every rank samples its prompts from a whole copy of the weights (model.sampling_copy), refilled after
each update.
"""
import argparse

import flags

parser = argparse.ArgumentParser(description="GRPO with unit-test rewards; logs the held-out learning curve.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="minicode-base", help="policy to start from (model.py spec)")
parser.add_argument("--problems", default="minicode-train",
                    help="training problems: minicode-train, mbpp-train, or a problems .jsonl (function or io tests)")
parser.add_argument("--problems-limit", type=int, default=None, help="train on the first N problems only")
parser.add_argument("--eval-bench", default="minicode-heldout", help="held-out benchmark for pass@1 (eval_code.py names)")
parser.add_argument("--eval-limit", type=int, default=100, help="held-out problems evaluated (greedy pass@1)")
parser.add_argument("--eval-every", type=int, default=10, help="held-out pass@1 every N steps (and at 0 and the end)")
parser.add_argument("--data", default=None, help="folder with benchmark files (default: $RA3_DATA, else the hub)")
parser.add_argument("--out", default="runs/rlvr", help="output directory")
parser.add_argument("--steps", type=int, default=30, help="RL steps")
parser.add_argument("--batch-prompts", type=int, default=16, help="prompts per step (P, all ranks together)")
parser.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
parser.add_argument("--max-new-tokens", type=int, default=256, help="longest completion")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the policy's, in the loss too)")
parser.add_argument("--lr", type=float, default=2e-5, help="learning rate (constant, after --warmup)")
parser.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
parser.add_argument("--epochs", type=int, default=1, help="passes over each step's samples (clipping acts when > 1)")
parser.add_argument("--clip-low", type=float, default=0.2, help="ratio clip below 1")
parser.add_argument("--clip-high", type=float, default=0.28, help="ratio clip above 1")
parser.add_argument("--kl", type=float, default=0.0, help="weight of k3 KL to the initial model (0: off)")
parser.add_argument("--std-scale", action="store_true", help="divide advantages by the group's reward std")
parser.add_argument("--partial-credit", action="store_true", help="reward = share of tests passed (one program per assert)")
parser.add_argument("--micro-rows", type=int, default=32, help="samples per forward pass when scoring and training")
parser.add_argument("--max-rows", type=int, default=256, help="rows the sampler decodes together")
parser.add_argument("--timeout", type=float, default=None, help="seconds per program (default: eval_code's per benchmark)")
parser.add_argument("--workers", type=int, default=None, help="programs run at once per rank (default: CPU count)")
parser.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps")
# --resume --overwrite --fsdp --seed --cpu-bf16 --wandb, alike in every trainer (flags.py)
flags.add_trainer_flags(parser)
if __name__ == "__main__":
    args = parser.parse_args()

import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data as D  # noqa: E402
import eval_code as E  # noqa: E402
import minicode  # noqa: E402
import model as M  # noqa: E402

RESUME_KEYS = ("model", "problems", "problems_limit", "batch_prompts", "group", "temperature", "lr", "warmup", "epochs",
               "clip_low", "clip_high", "kl", "partial_credit", "std_scale", "max_new_tokens", "seed")
DIST_TIMEOUT_S = 600  # torch.distributed's default for NCCL; a step's reward phase must stay well below it


# =====================================================================================================
# 1. Samples and rewards
# =====================================================================================================

@dataclasses.dataclass
class Sample:
    problem: int          # index into the step's problems
    prompt: list          # prompt token ids
    ids: list             # completion token ids, as sampled (the stop string included)
    sample_lp: list       # their log-probs under the sampler (for the sampler/trainer gap)
    text: str             # the completion cut at the first stop: what the tests run
    truncated: bool       # hit --max-new-tokens without a stop
    futures: list = dataclasses.field(default_factory=list)
    reward: float = 0.0


def sample_and_submit(policy, tok, problems, args, executor, seed):
    """G samples per problem, prompt-major, sampled a chunk of prompts at a time; each chunk's programs go
    to the executor at once, so the sandboxes run while the next chunk samples."""
    per_chunk = max(1, args.max_rows // args.group)
    out = [None] * (len(problems) * args.group)
    for c in range(0, len(problems), per_chunk):
        chunk = list(range(c, min(c + per_chunk, len(problems))))
        for stops in sorted({E.stops_for(problems[i]) for i in chunk}):
            idx = [i for i in chunk if E.stops_for(problems[i]) == stops]
            prompts = [tok.encode(problems[i].prompt) for i in idx]
            s = M.generate(policy, tok, prompts, n=args.group, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, stop=stops, seed=seed + c, max_rows=args.max_rows)
            for k, i in enumerate(idx):
                for j in range(args.group):
                    row = k * args.group + j
                    ids = s.row(row)
                    text = E.cut_at_stops(tok.decode(ids, skip_special_tokens=True), stops)
                    smp = Sample(i, prompts[k], ids, s.logprobs[row, :len(ids)].tolist(), text,
                                 s.finish[row] == "length")
                    smp.futures = [executor.submit(job) for job in E.jobs_for(
                        problems[i], text, args.timeout, per_assert=args.partial_credit)]
                    out[i * args.group + j] = smp
    return out


def collect_rewards(samples, partial_credit):
    """r = 1 if every test passed, else 0; with partial credit, the share of tests passed."""
    for s in samples:
        passed = [f.result().passed for f in s.futures]
        s.reward = float(np.mean(passed)) if partial_credit else float(all(passed))
        s.futures = []
    return np.array([s.reward for s in samples])


def group_advantages(rewards, group, std_scale=False, eps=1e-6):
    """A_i = r_i - mean_j r_j over each prompt's G samples (prompt-major), / std if asked; and the share
    of groups with no spread (every sample the same reward: no gradient from that prompt)."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group)
    adv = r - r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, keepdims=True)
    if std_scale:
        adv = adv / (std + eps)
    return adv.reshape(-1), float((std[:, 0] < 1e-12).mean())


def check_reward_bound(n_jobs, workers, timeout, world):
    """Every program ends within its timeout (the sandbox kills it), so a rank's reward phase ends within
    ceil(jobs / workers) * timeout. Under torchrun that must stay well below the collective timeout, or one
    rank's slow programs would make the others' all-reduce fail."""
    bound = math.ceil(n_jobs / workers) * (timeout + 1.0)
    if world > 1 and bound > DIST_TIMEOUT_S / 2:
        raise ValueError(f"the reward phase of a step may take {bound:.0f} s ({n_jobs} programs, {workers} workers, "
                         f"{timeout:g} s each), too close to the {DIST_TIMEOUT_S} s distributed timeout: lower "
                         f"--timeout or --batch-prompts x --group, or raise --workers")
    return bound


# =====================================================================================================
# 2. The loss
# =====================================================================================================

@dataclasses.dataclass
class MicroBatch:
    layout: M.SharedPrompts  # its samples' prompts (each once) and completions, as one pass
    sample: torch.Tensor     # per completion token (flat, sample-major): its sample's index in the step
    sample_lp: torch.Tensor  # per completion token: its log-prob under the sampler
    adv: torch.Tensor = None  # per completion token: its sample's advantage
    old: torch.Tensor = None
    ref: torch.Tensor = None


def micro_batches(samples, micro_rows, device):
    """The samples micro_rows at a time, each a SharedPrompts pass: the G samples of a problem (consecutive,
    prompt-major) share their prompt, computed once. Every rank makes the same number (same samples per rank)."""
    out = []
    for m in range(0, len(samples), micro_rows):
        part = samples[m:m + micro_rows]
        prompts, prompt_of = [], []
        for i, s in enumerate(part):
            if i == 0 or s.prompt != part[i - 1].prompt:
                prompts.append(s.prompt)
            prompt_of.append(len(prompts) - 1)
        layout = M.SharedPrompts(prompts, [s.ids for s in part], prompt_of, device)
        sample = torch.tensor([m + i for i, s in enumerate(part) for _ in s.ids], device=device)
        lp = torch.tensor([x for s in part for x in s.sample_lp], dtype=torch.float32, device=device)
        out.append(MicroBatch(layout, sample, lp))
    return out


def set_advantages(batches, advantages):
    adv = torch.tensor(np.asarray(advantages, dtype=np.float32), device=batches[0].sample.device)
    for b in batches:
        b.adv = adv[b.sample]


@torch.no_grad()
def score_old(net, ref_net, batches, device):
    """pi_old (and pi_ref) log-probs of every micro-batch, by the same forward the update uses."""
    for b in batches:
        with M.autocast(device):
            b.old = net(b.layout).float()
            if ref_net is not None:
                b.ref = ref_net(b.layout).float()
    if hasattr(ref_net, "reshard"):  # FSDP keeps a root's own weights whole after a forward, for the backward
        ref_net.reshard()            # that follows; the reference has none, so give its memory back


def policy_loss(new, b, clip_low, clip_high, kl, denominator):
    """-sum over completion tokens of min(rho A, clip(rho) A) (+ kl * k3), over the global token count.
    Returns (loss, summed k3, clipped token count)."""
    ratio = torch.exp(new - b.old)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    objective = torch.minimum(ratio * b.adv, clipped * b.adv)
    loss = -objective.sum()
    k3 = torch.zeros((), device=new.device)
    if b.ref is not None:
        log_r = b.ref - new
        k3 = (torch.exp(log_r) - log_r - 1).sum()
        loss = loss + kl * k3
    n_clipped = (ratio * b.adv > clipped * b.adv).sum()
    return loss / denominator, k3.detach(), n_clipped


def update(net, optimizer, batches, args, world, device):
    """--epochs passes of clipped updates over this rank's micro-batches; gradients are summed over
    micro-batches and ranks, each token weighted 1 / (completion tokens of the global batch)."""
    denominator = M.all_reduce_sum(sum(len(b.sample) for b in batches))
    k3_sum = clip_sum = torch.zeros((), device=device)  # summed on the device: no sync per micro-batch
    for _ in range(args.epochs):
        for k, b in enumerate(batches):
            sync = k == len(batches) - 1 or not hasattr(net, "no_sync")
            with (net.no_sync() if not sync else contextlib.nullcontext()), M.autocast(device):
                loss, k3, n_clipped = policy_loss(net(b.layout).float(), b, args.clip_low,
                                                  args.clip_high, args.kl, max(denominator, 1.0))
                (loss * world).backward()  # DDP averages gradients over ranks; the loss wants their sum
            k3_sum, clip_sum = k3_sum + k3, clip_sum + n_clipped
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    n = max(denominator, 1.0) * args.epochs
    return dict(kl=M.all_reduce_sum(float(k3_sum)) / n, clip_share=M.all_reduce_sum(float(clip_sum)) / n,
                grad_norm=float(grad_norm))


# =====================================================================================================
# 3. Evaluation, problems
# =====================================================================================================

def held_out_pass1(policy, tok, problems, executor, args, dist):
    """Greedy pass@1 (and the think rate of its programs) on this rank's share of the held-out problems,
    summed over ranks."""
    mine = problems[dist.rank::dist.world]
    passed = lines = after_comment = 0.0
    for stops in sorted({E.stops_for(p) for p in mine}):
        group = [p for p in mine if E.stops_for(p) == stops]
        s = M.generate(policy, tok, [p.prompt for p in group], n=1, max_new_tokens=args.max_new_tokens,
                       temperature=0.0, stop=stops, max_rows=args.max_rows)
        texts = [E.cut_at_stops(tok.decode(s.row(i), skip_special_tokens=True), stops) for i in range(len(group))]
        futures = [[executor.submit(j) for j in E.jobs_for(p, text, args.timeout)] for p, text in zip(group, texts)]
        for text, fs in zip(texts, futures):
            passed += all(f.result().passed for f in fs)
            n, c = D.commented_lines(text)
            lines, after_comment = lines + n, after_comment + c
    passed, lines, after_comment = (M.all_reduce_sum(float(x)) for x in (passed, lines, after_comment))
    return passed / len(problems), after_comment / max(lines, 1.0)


def load_problem_sets(args):
    """Training problems without any held-out task (by id, MBPP number or prompt), and the held-out ones."""
    train = minicode.load_problems(args.problems, data=args.data)[:args.problems_limit]
    evals = minicode.load_problems(args.eval_bench, data=args.data)
    eval_sets = [evals]
    if any(p.source in ("mbpp", "mbpp+") for p in train):  # MBPP train shares 111 tasks with MBPP+
        for name in ("mbpp", "mbpp+", "humaneval"):
            try:
                eval_sets.append(minicode.load_problems(name, data=args.data))
            except Exception as e:  # offline without the file: say so, the run can still go on
                M.print0(f"warning: could not load {name} to check overlap with it ({e})")
    kept = D.drop_overlap(train, *eval_sets)
    if len(kept) < len(train):
        M.print0(f"rlvr: dropped {len(train) - len(kept)} training problems that are also evaluation tasks")
    if not kept:
        raise D.DataError(f"{args.problems}: no training problems left")
    return kept, evals[:args.eval_limit]


def step_problems(step, n, per_step, seed):
    """Problem indices of step `step`: slices of a fresh permutation per epoch, a pure function of the step
    so that a resumed run sees what the killed one would have."""
    out, start = [], step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out += perm[offset:offset + per_step - len(out)].tolist()
    return out


# =====================================================================================================
# 4. The loop
# =====================================================================================================

def rl_step(policy, sampler, net, ref_net, tok, optimizer, problems, executor, args, dist, step):
    """Sample, reward, update; returns the step's metrics (every rank takes part in every collective)."""
    device = dist.device
    t0 = time.perf_counter()
    policy.eval()
    samples = sample_and_submit(sampler, tok, problems, args, executor, seed=args.seed * 1_000_003 + step * 1009)
    policy.train()
    t1 = time.perf_counter()
    batches = micro_batches(samples, args.micro_rows, device)
    score_old(net, ref_net, batches, device)  # on the GPU while the sandboxes work
    t2 = time.perf_counter()
    rewards = collect_rewards(samples, args.partial_credit)
    t3 = time.perf_counter()
    adv, zero_spread = group_advantages(rewards, args.group, args.std_scale)
    set_advantages(batches, adv)
    stats = update(net, optimizer, batches, args, dist.world, device)
    M.sync_sampling_copy(sampler, policy)
    t4 = time.perf_counter()
    # sampler (KV cache, CUDA graphs) against trainer (shared-prompt forward): they should agree to rounding
    gap = sum(float((b.old - b.sample_lp).abs().sum()) for b in batches) / max(sum(len(b.sample) for b in batches), 1)
    local = dict(reward=float(rewards.mean()), pass_rate=float((rewards == 1).mean()),
                 think_rate=D.think_rate([s.text for s in samples]),
                 sample_len=float(np.mean([len(s.ids) for s in samples])),
                 truncated=float(np.mean([s.truncated for s in samples])), zero_spread=zero_spread,
                 logprob_gap=gap)
    metrics = {k: M.all_reduce_mean(v) for k, v in local.items()}
    tokens = M.all_reduce_sum(float(sum(len(s.prompt) + len(s.ids) for s in samples)))
    return dict(metrics, **stats, sample_s=t1 - t0, score_s=t2 - t1, reward_wait_s=t3 - t2, train_s=t4 - t3,
                tokens_per_s=tokens / (t4 - t0))


def _warn(m):
    if m["truncated"] > 0.5:
        M.print0(f"warning: {m['truncated']:.0%} of samples hit --max-new-tokens: their rewards say little")
    if m["step"] >= 3 and m["zero_spread"] > 0.9:
        M.print0(f"warning: {m['zero_spread']:.0%} of groups have one reward for all samples: little to learn from "
                 f"(problems too easy or too hard for this policy)")


def main(args):
    M.check_flags(parser, args, at_least=dict(problems_limit=1, eval_limit=1, eval_every=1, steps=0, batch_prompts=1,
                                              group=1, max_new_tokens=1, warmup=0, epochs=1, clip_low=0, clip_high=0,
                                              kl=0, micro_rows=1, max_rows=1, workers=1, save_every=1),
                  above=dict(temperature=0, lr=0, timeout=0))
    M.check_wandb(parser, args)
    dist = M.init_dist()
    M.CPU_BF16 = args.cpu_bf16
    done = M.finished_run(args.out, args, "rlvr", RESUME_KEYS)
    if done is not None:
        return done
    device = dist.device
    out = Path(args.out)
    torch.manual_seed(args.seed)
    if args.batch_prompts % dist.world:
        raise ValueError(f"--batch-prompts {args.batch_prompts} must divide among {dist.world} ranks")
    problems, evals = load_problem_sets(args)
    policy, tok = M.load_model(args.model, device=device, dtype=torch.float32)  # fp32 master weights
    ref_net = None
    if args.kl > 0:  # sharded (--fsdp) before the sampling copy is made: three whole models need not fit at once
        ref = copy.deepcopy(policy).requires_grad_(False).eval()
        ref_net = M.wrap_for_ranks(M.ContinuationLogProbs(ref, args.temperature), dist, args.fsdp)
    # on GPU a bf16 copy to sample from; under FSDP a whole copy (the policy's weights become shards)
    sampler = M.sampling_copy(policy, sharded=M.shards(dist, args.fsdp))
    net = M.wrap_for_ranks(M.ContinuationLogProbs(policy, args.temperature), dist, args.fsdp)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")
    per_rank = args.batch_prompts // dist.world
    executor = E.Executor(args.workers)
    timeout = E.limits_for(problems[0], args.timeout)[0]
    jobs = per_rank * args.group * (max(len(E.split_asserts(p.test)) for p in problems) if args.partial_credit else 1)
    check_reward_bound(jobs, executor.workers, timeout, dist.world)
    start, seconds = 0, 0.0
    if args.resume and (out / "checkpoint").exists():
        M.check_resumable(out / "checkpoint", "rlvr", args, RESUME_KEYS)
        start = M.load_training(out / "checkpoint", net, optimizer)
        seconds = M.read_meta(out / "checkpoint")["metrics"].get("seconds", 0.0)  # the summary covers the whole run
        M.sync_sampling_copy(sampler, policy)
        M.print0(f"resumed from {out / 'checkpoint'} at step {start}")
    log = M.MetricsLog(out / "metrics.jsonl", start, args)
    M.print0(f"rlvr: {len(problems)} training problems, {len(evals)} held-out ({args.eval_bench}), "
             f"P={args.batch_prompts} G={args.group} on {dist.world} rank(s), {args.steps} steps")
    curve = []

    if start == 0:
        p1, think = held_out_pass1(sampler, tok, evals, executor, args, dist)
        log(dict(step=0, eval_pass1=p1, eval_think_rate=think))
        curve.append((0, p1))
    from tqdm.auto import tqdm
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not M.is_main(), desc="rlvr")
    m, t_start = {}, time.perf_counter() - seconds
    interrupt = M.StopOnInterrupt()
    for step in bar:
        for g in optimizer.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
        picks = step_problems(step, len(problems), args.batch_prompts, args.seed)
        mine = [problems[i] for i in picks[dist.rank * per_rank:(dist.rank + 1) * per_rank]]
        m = dict(step=step + 1, **rl_step(policy, sampler, net, ref_net, tok, optimizer, mine, executor, args, dist, step))
        m["seconds"] = round(time.perf_counter() - t_start, 2)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            m["eval_pass1"], m["eval_think_rate"] = held_out_pass1(sampler, tok, evals, executor, args, dist)
            curve.append((step + 1, m["eval_pass1"]))
        _warn(m)
        log(m)
        bar.set_postfix(reward=f"{m['reward']:.3f}", **({"pass1": f"{m['eval_pass1']:.3f}"} if "eval_pass1" in m else {}))
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            M.save_training(out / "checkpoint", net, policy, tok, optimizer, "rlvr", step + 1, args, m)
        if step + 1 < args.steps and interrupt.asked():
            executor.close()
            M.stop_interrupted(out / "checkpoint", net, policy, tok, optimizer, "rlvr", step + 1, args, m)
    interrupt.restore()
    bar.close()
    executor.close()
    if M.is_main():  # the whole curve, step 0 included, also after a resume
        curve = [(x["step"], x["eval_pass1"]) for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if "eval_pass1" in x]
    summary = dict(stage="rlvr", steps=args.steps, reward=m.get("reward"), eval_bench=args.eval_bench,
                   eval_pass1=m.get("eval_pass1"), curve=curve, seconds=round(time.perf_counter() - t_start, 2),
                   model=str(out / "model"))
    M.release_decoder(sampler)
    M.finish_training(out, net, policy, tok, optimizer, "rlvr", args.steps, args, summary)
    log.close()
    return summary


if __name__ == "__main__":
    M.run_main(main, args)
