"""estep.py: the E-step of RA3. A latent policy q learns, by RL, where a comment line before the expert's
next line of code makes that line more likely, and what to write in it. Then q annotates the corpus.

Paper map (RA3, arXiv 2509.25810, as ../shared/DESIGN.md implements it):
  temporal ELBO  log pi(a_1..T) >= E_q sum_t [log pi(a_t | s_t, z_t) - KL(q(z_t | .) || p(z_t | s_t, z_t-1))]
  latent z_t       <act> (no text) or <think> (a comment line written before a_t)   -> rollout
  prior p          alpha * delta(z_t-1) + (1 - alpha) * fresh: a fixed cost c per <think>
  step reward      r_t = log pi(a_t | s_t, z_t) - c [z_t = think], conditional on z_t on both branches:
                   <act> scores a_t given that no comment starts here               -> rewards
  return           R_t = sum_{k<H} gamma^k r_t+k, cut at the end of the trace       -> truncated_returns
  advantage        A_i,t = R_i,t - mean_j R_j,t over the G rollouts of a trace      -> grpo_advantages
  policy loss      -A * ratio (PPO-clipped) on q's latent events, token-mean        -> policy_loss
  exploration      decisions drawn from b = e * (q | think) + (1 - e) * q, each
                   weighted by q / b, so the decision's gradient is still q's       -> _sample, policy_loss
  bootstrap        q writes latents into the mid-training traces for mstep.py       -> annotate
  what q learned   held-out ELBO, think rates, code likelihood with q's comments /
                   none / the true plan (minicode's plan, or on stripped:SPEC real
                   code the expert's own comments), where q comments against where
                   the true plan does, comments that name the right step           -> instruments

q's choices, exactly. Each line of the trace is fed as one *unit* of tokens, tokenized on its own, so that
line starts are token boundaries; whether the newline ends a unit or starts the next is chosen per
tokenizer (`Units`) so that units reproduce the tokenizer's own tokenization of the text (GPT-2 merges a
newline with the next line's indentation, Llama-3 and Qwen2 with the punctuation before it). Before
action a_t, the tokens its code line shares with a comment line at the same indentation (usually the
indentation) are forced; then q's next token decides: a token that begins a comment ("#" after the rest
of the indentation) is <think> and is the comment's first token, any other token is <act> and is not
used (the expert's line is forced instead). So P(think) = sum of q over one token set and P(act) = 1 -
P(think), from one softmax. A comment then runs until q emits any newline-bearing token (that event has
the probability of the whole newline set; its token is not used) or L tokens. Every probability the
policy gradient uses is recomputed on the same tokens in `policy_loss`, and the tests check the two agree.
Rollouts do not feed the expert's tokens one at a time: a row feeds its next lines at once as if q chose
<act> at each, samples those decisions in order, and keeps the lines up to its first <think> (speculative
teacher forcing, `_rollout_chunk`): every decision is still drawn from q's exact conditional. The reward
and training passes compute each trace's prompt once for its G rollouts (`prompt_layout`).

    python estep.py                                  # minicode-base on minicode mid-training traces
    python estep.py --model smollm2 --data stripped:stdlib --cpu-bf16 --explore 0.2   # real code, its comments as truth
    python estep.py --q runs/estep/q --steps 0 --annotate gain   # annotate again with a trained q
    torchrun --nproc_per_node=8 estep.py --model runs/ntp/model --data stdlib --batch-traces 64 --group 8

Under torchrun each rank rolls out and scores its share of the batch; q is DDP, or with --fsdp sharded by
FSDP2 for the update (model.wrap_for_ranks), and rollouts read a whole copy of q (model.sampling_copy),
refilled after each update. pi is frozen and whole on every rank.
"""
import argparse

import flags

parser = argparse.ArgumentParser(description="RA3 E-step: learn where and what to think, then annotate traces.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="minicode-base", help="pi: the model whose likelihood is the reward")
parser.add_argument("--q", default=None,
                    help="start q from this checkpoint instead of a copy of pi (with --steps 0: annotate only)")
parser.add_argument("--data", default="minicode-midtrain",
                    help="traces: a .jsonl, minicode-midtrain, stdlib, DIR, hf:NAME; real code as stripped:SPEC keeps the "
                         "expert's comments as the true plan for the instruments")
parser.add_argument("--n-tasks", type=int, default=2000, help="minicode corpora: number of tasks")
parser.add_argument("--field", default="content", help="hf: text field")
parser.add_argument("--out", default="runs/estep", help="output directory")
parser.add_argument("--steps", type=int, default=40,
                    help="RL updates of q (minicode-base: the held-out ELBO flattens after 25-30 at B=16, G=8)")
parser.add_argument("--batch-traces", type=int, default=16, help="traces per update (B, all ranks together)")
parser.add_argument("--group", type=int, default=8, help="rollouts per trace (G)")
parser.add_argument("--horizon", type=int, default=4, help="lines in the truncated return (H)")
parser.add_argument("--gamma", type=float, default=1.0, help="discount of the truncated return")
parser.add_argument("--penalty", type=float, default=0.05, help="cost c of a <think> (the consistency prior)")
parser.add_argument("--max-latent", type=int, default=32, help="longest comment, in tokens (L)")
parser.add_argument("--max-lines", type=int, default=64, help="skip traces with more line actions than this")
parser.add_argument("--temperature", type=float, default=1.0, help="q's sampling temperature")
parser.add_argument("--explore", type=float, default=0.0,
                    help="probe this share of the lines (the same in a trace's G rollouts): there half the rollouts "
                         "are made to comment, so q's comments meet each other and no comment (importance-weighted: "
                         "the decision's gradient stays q's); for a q that rarely comments, as on real code")
parser.add_argument("--lr", type=float, default=1e-4, help="q's learning rate")
parser.add_argument("--epochs", type=int, default=1, help="passes over each batch (PPO clipping matters when > 1)")
parser.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip (acts only with --epochs > 1: "
                    "on the first pass over a batch the ratio is 1)")
parser.add_argument("--kl", type=float, default=0.0, help="weight of k3 KL(q || pi) on comment tokens (0: off)")
parser.add_argument("--std-scale", action="store_true", help="divide advantages by the group's std")
parser.add_argument("--micro-rows", type=int, default=64, help="rollouts per forward pass when scoring/training")
parser.add_argument("--annotate", choices=["one", "best", "gain"], default="gain",
                    help="bootstrap: one rollout per trace, the best of G by return, or one rollout keeping only "
                         "the comments whose gain in pi's log-likelihood of the code exceeds c (the fewest "
                         "wrong comments: LOG.md, 2026-11-30)")
parser.add_argument("--annotate-temperature", type=float, default=1.0, help="q's temperature when annotating")
parser.add_argument("--annotate-limit", type=int, default=None, help="annotate only the first N traces")
parser.add_argument("--eval-traces", type=int, default=64,
                    help="held-out traces for the instruments (never trained on); 0: none")
parser.add_argument("--eval-every", type=int, default=5, help="measure the instruments every N updates")
parser.add_argument("--eval-data", default=None,
                    help="held-out traces from this corpus instead of --data's own (e.g. stripped:DIR of code the "
                         "model cannot have seen: the memorization control)")
parser.add_argument("--save-every", type=int, default=25, help="checkpoint q and its optimizer every N updates")
# --resume --overwrite --fsdp --seed --cpu-bf16 --wandb, alike in every trainer (flags.py)
flags.add_trainer_flags(parser)
if __name__ == "__main__":
    args = parser.parse_args()

import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data as D  # noqa: E402
import minicode  # noqa: E402
import model as M  # noqa: E402

RESUME_KEYS = ("model", "q", "data", "n_tasks", "batch_traces", "group", "horizon", "gamma", "penalty", "max_latent",
               "temperature", "explore", "lr", "epochs", "seed")
# roles of the tokens of a rollout
PROMPT, LEAD, PREFIX, COMMENT, NEWLINE, CODE = range(6)
# q's events: a token, a token from a set, a token outside a set
TOKEN, IN_SET, NOT_IN_SET = range(3)


# =====================================================================================================
# 1. Traces as units of tokens
# =====================================================================================================

class Units:
    """Cuts text into per-line units and tokenizes each on its own. newline_first: a unit is "\\n" +
    line (GPT-2 style, where a newline merges with the next indentation); else line + "\\n" (Llama-3 and
    Qwen2 style, where it merges with what precedes it). Chosen by which reproduces the tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        probe = 'def f(x):\n    """Doc."""\n    y = [x, 1]\n    if y:\n        return y\n    return None\n'
        whole = tok.encode(probe)
        scores = {}
        for newline_first in (True, False):
            self.newline_first = newline_first
            ids = [i for u in self.units(probe, first=True) for i in self.encode(u[0], u[1])]
            scores[newline_first] = sum(a == b for a, b in zip(ids, whole)) - abs(len(ids) - len(whole))
        self.newline_first = scores[True] > scores[False]
        self.newline = tok.encode("\n", add_special_tokens=False)

    def units(self, text, first=False):
        """[(unit text, is first unit of a document)]: the text, cut at line starts."""
        lines = text.splitlines(keepends=True)
        if not self.newline_first:
            return [(line, first and i == 0) for i, line in enumerate(lines)]
        out = []
        for i, line in enumerate(lines):
            body = line[:-1] if line.endswith("\n") else line
            out.append(((body if first and i == 0 else "\n" + body), first and i == 0))
        return out

    def encode(self, text, bos=False):
        return self.tok.encode(text, add_special_tokens=bos) if text else []

    def text_ids(self, text, first=False):
        return [i for u, b in self.units(text, first) for i in self.encode(u, b)]


@dataclasses.dataclass
class LineAction:
    lead: list      # forced: blank and comment lines the action carries
    prefix: list    # forced: tokens the code line shares with a comment line at its indentation
    rest: list      # <act>: the code line's tokens after the prefix
    full: list      # <think>: the code line's tokens on their own (after the comment line)
    think_mask: int  # which token set begins a comment here (see ThinkSets)


@dataclasses.dataclass
class TracePlan:
    trace: D.Trace
    prompt: list
    actions: list
    suffix: list

    def max_len(self, max_latent, newline):
        body = sum(len(a.lead) + len(a.prefix) + max(len(a.rest), max_latent + len(newline) + len(a.full))
                   for a in self.actions)
        return len(self.prompt) + body + len(self.suffix)


class ThinkSets:
    """Token sets over the vocabulary. For each leftover indentation r, the tokens that begin a comment
    there (text starts with r + "#", no line break). Tokens that end a comment: those with a line break
    (or eos); `keep_end` are the ones kept as the comment's last token (newline-last units: the text ends
    with its only newline), `drop_end` the rest (their token is not used)."""

    def __init__(self, tok, vocab, device, newline_first):
        self.texts = M.token_texts(tok, vocab)
        self.device = device
        self.index, self.rows = {}, []
        ends = np.array([("\n" in t or "\r" in t) for t in self.texts])
        ends[tok.eos_token_id] = True
        keep = np.array([not newline_first and t.endswith("\n") and t.count("\n") == 1 and "\r" not in t
                         for t in self.texts]) & ends
        keep[tok.eos_token_id] = False
        self.ends, self.keep_end = ends, keep
        self.drop_end = torch.from_numpy(ends & ~keep).to(device)

    def mask_id(self, r):
        if r not in self.index:
            self.index[r] = len(self.rows)
            self.rows.append(np.array([t.startswith(r + "#") for t in self.texts]) & ~self.ends)
            self.masks = torch.from_numpy(np.stack(self.rows)).to(self.device)
        return self.index[r]


def plan_trace(units, sets, trace):
    """Token units of a trace, and for each action the forced prefix it shares with a comment line."""
    prompt_text = trace.prompt
    if units.newline_first and prompt_text.endswith("\n"):
        prompt_text = prompt_text[:-1]  # the newline starts the first action's unit
    prompt = units.text_ids(prompt_text, first=True)
    actions = []
    for a in trace.actions:
        lead, code = D.action_parts(a)
        ind = D.indentation(a)
        code_units = units.units(code)
        first_code = code_units[0][0]
        full = units.encode(first_code)
        probe = units.encode(units.units(ind + "# x\n")[0][0])  # a comment line at the same indentation
        shared = 0
        while shared < min(len(full), len(probe)) - 1 and full[shared] == probe[shared]:
            shared += 1
        unit_start = first_code[:len(first_code) - len(first_code.lstrip("\n"))] if units.newline_first else ""
        covered = units.tok.decode(full[:shared])
        r = (unit_start + ind)[len(covered):] if covered and (unit_start + ind).startswith(covered) else unit_start + ind
        later = [i for u, _ in code_units[1:] for i in units.encode(u)]  # a statement's continuation lines
        if len(full) < 2:
            raise D.DataError(f"{trace.id}: a code line that tokenizes to a single token: {code!r}")
        actions.append(LineAction(units.text_ids(lead), full[:shared], full[shared:] + later, full + later,
                                  sets.mask_id(r)))
    suffix = units.text_ids(trace.suffix)
    if units.newline_first and D.render(trace).endswith("\n"):
        suffix = suffix + units.newline  # the document's last newline: its own unit
    return TracePlan(trace, prompt, actions, suffix)


# =====================================================================================================
# 2. Rollouts: q walks each trace line by line, G times, on one KV cache
# =====================================================================================================

@dataclasses.dataclass
class Rollout:
    plan: TracePlan
    ids: list = dataclasses.field(default_factory=list)     # every token fed after the prompt
    roles: list = dataclasses.field(default_factory=list)   # role of each (PROMPT..CODE)
    lines: list = dataclasses.field(default_factory=list)   # action index of each
    events: list = dataclasses.field(default_factory=list)  # (kind, position, target, action, log q, log b)
    latents: list = None                                    # per action: comment text or None
    cut: list = None                                        # per action: comment stopped at L tokens
    force: list = None                                      # per action: how its decision is drawn (_sample)


LOOKAHEAD = 4  # lines a row speculates past its next decision (see _rollout_chunk; LOG.md 2026-12-01)


def rollout(q, units, sets, plans, group, max_latent, temperature, seed, max_rows=512, explore=0.0):
    """G rollouts of every plan; returns rollouts in plan-major order (row i * G + j). explore: how each
    decision is drawn (_sample): a number for every decision, or one list per plan of one number per action,
    for all G of its rollouts (probe_lines)."""
    if not isinstance(explore, (list, tuple)):
        explore = [[explore] * len(p.actions) for p in plans]
    out = []
    longest = max(p.max_len(max_latent, units.newline) for p in plans)
    per_chunk = max(1, min(max_rows, M.kv_rows_that_fit(q, -(-longest // M.Decoder.T_BUCKET) * M.Decoder.T_BUCKET))
                    // group)
    gen = torch.Generator(device=next(q.parameters()).device).manual_seed(seed)
    for start in range(0, len(plans), per_chunk):
        out += _rollout_chunk(q, units, sets, plans[start:start + per_chunk], group, max_latent, temperature, gen,
                              explore[start:start + per_chunk])
    return out


def _rollout_chunk(q, units, sets, plans, group, max_latent, temperature, gen, explore):
    """Speculative teacher forcing. The expert lines are known, so a row at line t feeds, in one forward,
    its next LOOKAHEAD lines as if q chose <act> at each (Decoder.feed: every row's span in one ragged
    forward), and reads q's decision at each of their line starts from it. The decisions are then sampled
    in order up to the first <think>: each one before it was sampled from its exact conditional (its
    history is the all-act prefix that was fed), so those lines are accepted at once, and the row's KV
    cache is cut back to that <think>. Its comment is sampled token by token (one token a forward), then
    the row speculates again. A row takes about 1 + sum over its comments of (length + 1) forwards (plus
    one per LOOKAHEAD lines without a comment), not one a token. LOOKAHEAD bounds the tokens fed in vain
    after a <think>: on CPU, where a forward costs its tokens, 3-4 lines beat the whole trace (LOG.md)."""
    rows = [Rollout(p, latents=[None] * len(p.actions), cut=[False] * len(p.actions), force=list(f))
            for p, f in zip(plans, explore) for _ in range(group)]
    max_len = max(p.max_len(max_latent, units.newline) for p in plans)
    dec = M.Decoder(q, len(rows), -(-max_len // M.Decoder.T_BUCKET) * M.Decoder.T_BUCKET)
    walkers = [_walk(r, units, sets, max_latent) for r in rows]
    carry = dec.prefill([p.prompt for p in plans], fanout=group).clone()  # each row's logits after its last token
    requests = [next(w) for w in walkers]  # ("feed", tokens, decisions), ("sample", None) or ("done", None)
    with torch.inference_mode():
        while True:
            # comment tokens: sampled from each row's last logits
            need = [i for i, r in enumerate(requests) if r[0] == "sample"]
            if need:
                answers = _sample(carry[need], None, sets, temperature, gen)
                for i, ans in zip(need, answers):
                    requests[i] = _next(walkers[i], dec, i, ans)
            fed = [i for i, r in enumerate(requests) if r[0] == "feed"]
            if not fed:
                break
            spans = [requests[i][1] for i in fed]
            ends = np.cumsum([len(x) for x in spans])
            # logits wanted: before each decision (j >= 1: after span token j - 1; j = 0: the carry), and the last
            at, where, masks, forces, owner = [], [], [], [], []
            for k, i in enumerate(fed):
                for j, mask, force in requests[i][2]:
                    where.append(len(fed) + len(at) if j else k)  # into cat(carry of fed rows, logits at `at`)
                    if j:
                        at.append(ends[k] - len(spans[k]) + j - 1)
                    masks.append(mask)
                    forces.append(force)
                    owner.append(k)
            old = carry[fed]
            logits = dec.feed(fed, spans, list(ends - 1) + at)
            carry[fed] = logits[:len(fed)]
            picks = [[] for _ in fed]
            if where:
                pool = torch.cat([old, logits[len(fed):]])
                for k, ans in zip(owner, _sample(pool[where], masks, sets, temperature, gen, forces)):
                    picks[k].append(ans)
            for k, i in enumerate(fed):
                requests[i] = _next(walkers[i], dec, i, picks[k])
    return rows


def _sample(logits, masks, sets, temperature, gen, explore=None):
    """Per row of logits: (sampled token, its log q, log q(think set `masks[k]`), log q(drop_end set),
    log b(think set)). A decision (masks given) is drawn from the behaviour policy b set by its explore
    value e: e in [0, 1] is b = e * (q given <think>) + (1 - e) * q, a forced thought with probability e,
    else q's own choice, so b(think) = e + (1 - e) q(think) and a think token x has b(x) = q(x) b(think) /
    q(think) (e = 0: b = q); e = -1 forces <act> (b(think) = 0: an instrument's rollout, never trained on)."""
    mask_ids = torch.tensor(masks if masks is not None else [0] * len(logits), device=logits.device)
    think_set = sets.masks[mask_ids]
    scaled = logits / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    in_think = torch.logsumexp(scaled.masked_fill(~think_set, float("-inf")), dim=-1) - lse
    in_newline = torch.logsumexp(scaled.masked_fill(~sets.drop_end, float("-inf")), dim=-1) - lse
    b_think = in_think
    if masks is not None and any(e != 0 for e in explore):
        e = torch.tensor(explore, dtype=torch.float32, device=logits.device)
        draw = torch.rand(len(logits), generator=gen, device=logits.device)
        think, act = (e > 0) & (draw < e), e < 0
        logits = torch.where(think[:, None], logits.masked_fill(~think_set, float("-inf")),
                             torch.where(act[:, None], logits.masked_fill(think_set, float("-inf")), logits))
        b_think = torch.where(act, float("-inf"), torch.log(e.clamp(min=0) + (1 - e.clamp(min=0)) * in_think.exp()))
    tokens, _ = M.pick_tokens(logits, temperature, 1.0, gen)
    logq = scaled.gather(1, tokens[:, None])[:, 0] - lse  # under q, whichever policy drew it
    cols = (x.cpu().numpy() for x in (tokens, logq, in_think, in_newline, b_think))
    return [(int(a), float(b), float(c), float(d), float(e)) for a, b, c, d, e in zip(*cols)]


def _next(walker, dec, i, answer):
    """Send a row's walker its answer; carry out its rewinds; return its next request."""
    req = walker.send(answer)
    while req[0] == "rewind":
        dec.rewind(i, req[1])
        req = next(walker)
    return req


def _walk(row, units, sets, max_latent):
    """One rollout as a coroutine. Yields ("feed", tokens, decisions) to feed a span, where decisions are
    (j, think mask, explore value: _sample) for the line starts in it, decided by the logits after span token
    j - 1 (j = 0: after the row's last token); receives one (sampled token, log q, log q(think set), log q(drop_end set),
    log b(think set)) per decision. Yields ("rewind", n) to drop the last n tokens fed, ("sample", None) for a
    comment token. Each event records its log q and its log b: the behaviour policy's probability of it,
    which differs from q's only at a decision drawn with --explore (comment tokens are q's own draws)."""
    plan = row.plan

    def fed(token, role, line):
        row.ids.append(token)
        row.roles.append(role)
        row.lines.append(line)

    def position():  # index in the whole document (prompt + fed) of the last token fed
        return len(plan.prompt) + len(row.ids) - 1

    lookahead = LOOKAHEAD
    t, pending = 0, []  # next line to decide; tokens fed before its decision (the end of the last comment)
    while True:
        span, decisions = list(pending), []  # the next `lookahead` lines with <act> at every line
        end = min(t + lookahead, len(plan.actions))
        for u in range(t, end):
            a = plan.actions[u]
            span += [(x, LEAD, u) for x in a.lead] + [(x, PREFIX, u) for x in a.prefix]
            decisions.append((len(span), u))
            span += [(x, CODE, u) for x in a.rest]
        if end == len(plan.actions):
            span += [(x, CODE, len(plan.actions) - 1) for x in plan.suffix]
        answers = yield ("feed", [x[0] for x in span], [(j, plan.actions[u].think_mask, row.force[u])
                                                         for j, u in decisions])
        kept, think = 0, None
        for (j, u), (token, logq, log_think, _, log_b_think) in zip(decisions, answers):
            for x in span[kept:j]:
                fed(*x)
            kept = j
            if sets.rows[plan.actions[u].think_mask][token]:
                think = (u, token, logq, logq + log_b_think - log_think)
                break
            row.events.append((NOT_IN_SET, position(), plan.actions[u].think_mask, u,
                               math.log(max(-math.expm1(log_think), 1e-30)),
                               math.log(max(-math.expm1(log_b_think), 1e-30))))
        if think is None:  # <act> at every line of it: the whole span stands
            for x in span[kept:]:
                fed(*x)
            if end == len(plan.actions):
                break
            t, pending = end, []
            continue
        yield ("rewind", len(span) - kept)
        u, token, logq, logb = think
        a = plan.actions[u]
        comment, pending = [], []  # <think>: the token is the comment's first
        while True:
            row.events.append((TOKEN, position(), token, u, logq, logb))
            yield ("feed", [token], [])
            fed(token, COMMENT, u)
            comment.append(token)
            if len(comment) >= max_latent:
                row.cut[u] = True
                break
            token, logq, _, log_drop, _ = yield ("sample", None)
            logb = logq
            if sets.keep_end[token]:  # the comment's last token, newline included (fed with the next span)
                row.events.append((TOKEN, position(), token, u, logq, logq))
                pending.append((token, COMMENT, u))
                comment.append(token)
                break
            if sets.ends[token]:  # ends it too, but its token is not used (the next unit brings the newline)
                row.events.append((IN_SET, position(), -1, u, log_drop, log_drop))
                comment.append(None)
                break
        ended_with_newline = comment[-1] is not None and sets.keep_end[comment[-1]]
        comment = [c for c in comment if c is not None]
        row.latents[u] = units.tok.decode(a.prefix + comment).lstrip().rstrip("\n")  # as fed: D.latent_line
        pending += [(x, NEWLINE, u) for x in (units.newline if not units.newline_first and not ended_with_newline else [])]
        pending += [(x, CODE, u) for x in a.full]
        t = u + 1
    yield ("done", None)


def forced_rollout(units, sets, plan, latents):
    """A rollout whose latents are given (comment text or None per action) instead of sampled. The same
    walk as q's rollouts makes it, so it has the same tokens, roles and decision events, and `rewards`
    scores it the same way: the code under no comments, or under the true plan."""
    answers = []  # what "q" samples at each choice
    for action, a, z in zip(plan.trace.actions, plan.actions, latents):
        if z is None:
            answers.append(a.rest[0])  # a token that does not begin a comment: <act>
            continue
        tokens = units.encode(units.units(D.latent_line(action, z))[0][0])
        comment = tokens[len(a.prefix):]
        if tokens[:len(a.prefix)] != a.prefix or not comment or not sets.rows[a.think_mask][comment[0]]:
            raise D.DataError(f"{plan.trace.id}: the comment {z!r} does not begin where a comment can")
        answers += comment if sets.keep_end[comment[-1]] else comment + units.newline[-1:]
    row = Rollout(plan, latents=[None] * len(plan.actions), cut=[False] * len(plan.actions),
                  force=[0.0] * len(plan.actions))
    walk, script = _walk(row, units, sets, max_latent=10 ** 9), iter(answers)
    request = next(walk)
    while request[0] != "done":
        if request[0] == "sample":
            request = walk.send((next(script), 0.0, 0.0, 0.0, 0.0))
        elif request[0] == "feed":
            said = []  # the script's decisions up to its first <think>; the walk reads no further
            for _, mask, _ in request[2]:
                said.append((next(script), 0.0, 0.0, 0.0, 0.0))
                if sets.rows[mask][said[-1][0]]:
                    break
            request = walk.send(said)
        else:
            request = next(walk)
    return row


# =====================================================================================================
# 3. Rewards, truncated returns, group advantages
# =====================================================================================================

def prompt_layout(rollouts, device):
    """The rollouts as one model.SharedPrompts pass: consecutive rollouts of a plan (the G of a trace) share
    its prompt, which is computed once for them."""
    prompts, prompt_of = [], []
    for i, r in enumerate(rollouts):
        if i == 0 or r.plan is not rollouts[i - 1].plan:
            prompts.append(r.plan.prompt)
        prompt_of.append(len(prompts) - 1)
    return M.SharedPrompts(prompts, [r.ids for r in rollouts], prompt_of, device)


def rewards(pi, sets, rollouts, penalty, micro_rows):
    """r_t = log pi(a_t | s_t, z_t) - c [z_t = think] for every action of every rollout, from one pass of
    pi per micro-batch (each trace's prompt once for its rollouts: `prompt_layout`). Both branches
    score what comes before the decision (the action's lead and the prefix its code shares with a comment
    line: the same tokens in the same context either way). Then
    <think> scores the code line after the comment; <act> scores the rest of the code line given that no
    comment starts here: its tokens minus log pi(act | s_t), i.e. the first one's probability renormalised
    over the tokens that do not begin a comment. Without that term every <act> would be docked by pi's own
    habit of commenting, and q would be paid to copy it. The trace's suffix (a last newline) counts with
    the last action, so the rewards add up to the whole code's log-likelihood."""
    device = next(pi.parameters()).device
    out = []
    for chunk in range(0, len(rollouts), micro_rows):
        part = rollouts[chunk:chunk + micro_rows]
        layout = prompt_layout(part, device)
        before = [layout.at(i, len(r.plan.prompt) + k - 1) for i, r in enumerate(part) for k in range(len(r.ids))]
        targets = torch.tensor([x for r in part for x in r.ids], device=device)
        acts = [(i, line, layout.at(i, p), mask) for i, r in enumerate(part)
                for kind, p, mask, line, *_ in r.events if kind == NOT_IN_SET]
        with torch.no_grad():
            hidden = M.shared_prompt_hidden(pi, layout)
            lp = M.chunked_logprobs(pi, hidden[torch.tensor(before, device=device)], targets)
            act_lp = torch.zeros(0)
            if acts:
                at = torch.tensor([(h, mask) for _, _, h, mask in acts], device=device)
                act_lp = event_logprobs(pi, sets, hidden[at[:, 0]], torch.full((len(acts),), NOT_IN_SET, device=device),
                                        at[:, 1], 1.0)
        lp, act_lp = lp.float().cpu().numpy(), act_lp.float().cpu().numpy()
        first = 0
        for i, r in enumerate(part):
            token_lp = lp[first:first + len(r.ids)]
            first += len(r.ids)
            roles, lines = np.array(r.roles), np.array(r.lines)
            expert = (roles == LEAD) | (roles == PREFIX) | (roles == CODE)
            reward = np.bincount(lines[expert], weights=token_lp[expert], minlength=len(r.latents))
            out.append(reward - penalty * np.array([z is not None for z in r.latents]))
        for (i, line, *_), a in zip(acts, act_lp):
            out[chunk + i][line] -= a
    return out


def truncated_returns(r, horizon, gamma):
    """R_t = sum_{k=0}^{H-1} gamma^k r_{t+k}, cut at the end of the trace; r: [..., T]."""
    r = np.asarray(r, dtype=np.float64)
    out = np.zeros_like(r)
    for k in range(min(horizon, r.shape[-1])):
        out[..., :r.shape[-1] - k] += gamma ** k * r[..., k:]
    return out


def grpo_advantages(returns, std_scale=False, eps=1e-6):
    """A_{i,t} = R_{i,t} - mean_j R_{j,t} over the G rollouts of one trace ([G, T]); / std if asked.
    Also says which steps had no spread (every rollout the same return: no gradient there)."""
    mean = returns.mean(axis=0, keepdims=True)
    adv = returns - mean
    std = returns.std(axis=0, keepdims=True)
    if std_scale:
        adv = adv / (std + eps)
    return adv, (std[0] < 1e-9)


# =====================================================================================================
# 4. The policy loss on q's events
# =====================================================================================================

def event_logprobs(model, sets, hidden, kinds, targets, temperature):
    """log p of events from the hidden states where they are decided ([N, H]): a token (target: its id),
    a token of the comment-ending set (IN_SET), or a token outside the think set at this indentation
    (NOT_IN_SET, target: the set's index): <act>, no comment starts here."""
    scaled = M.final_logits(model, hidden).float() / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    token_lp = scaled.gather(1, targets.clamp(min=0)[:, None])[:, 0] - lse
    think_sets = sets.masks[torch.where(kinds == NOT_IN_SET, targets, 0)]
    masks = torch.where((kinds == IN_SET)[:, None], sets.drop_end[None], think_sets)
    set_lp = torch.logsumexp(scaled.masked_fill(~masks, float("-inf")), dim=-1) - lse
    not_set_lp = torch.log(-torch.expm1(set_lp.clamp(max=-1e-7)))
    return torch.where(kinds == TOKEN, token_lp, torch.where(kinds == IN_SET, set_lp, not_set_lp))


class EventLogProbs(torch.nn.Module):
    """log q of every event, recomputed by a teacher-forced pass over the rollouts' own tokens. A module,
    so that DDP sees the forward pass that makes the gradient."""

    def __init__(self, model, sets, temperature):
        super().__init__()
        self.model, self.sets, self.temperature = model, sets, temperature

    def forward(self, layout, at, kinds, targets):
        hidden = M.shared_prompt_hidden(self.model, layout)
        return event_logprobs(self.model, self.sets, hidden[at], kinds, targets, self.temperature)


def event_batch(rollouts, advantages, device):
    """The rollouts' tokens as one pass with shared prompts (prompt_layout) and, per event, the token where
    it is decided, its kind, target, sampled log q, advantage and importance weight q / b (1 but at an
    explored decision)."""
    layout = prompt_layout(rollouts, device)
    at, kinds, targets, old, adv, weight = [], [], [], [], [], []
    for i, r in enumerate(rollouts):
        for kind, pos, target, line, logq, logb in r.events:
            at.append(layout.at(i, pos))
            kinds.append(kind)
            targets.append(target)
            old.append(logq)
            adv.append(advantages[i][line] if advantages is not None else 0.0)
            weight.append(math.exp(logq - logb))
    t = lambda x, dtype=torch.long: torch.tensor(x, dtype=dtype, device=device)  # noqa: E731
    return (layout, t(at), t(kinds), t(targets)), t(old, torch.float32), t(adv, torch.float32), t(weight, torch.float32)


def policy_loss(net, pi_events, rollouts, advantages, args, device, denominator):
    """-A * clipped ratio over q's events of these rollouts, divided by `denominator` (the events of the
    global batch), plus --kl times the k3 KL(q || pi) on comment tokens. Returns (loss, stats).
    With --explore each event's term is weighted by q / b, the probability of the event under q over that
    under the behaviour policy that drew it (decoupled from the PPO ratio, which stays q / q_old): at a
    decision, E_b[(q / b) A grad log q] = E_q[A grad log q], the ELBO's own gradient. A comment's later
    tokens are q's own draws and weigh 1, so a thought that exploring forced is learned from in full: at each
    state its gradient is the ELBO's times b(think) / q(think) >= 1, which leaves the best comment there the
    same (as RLP trains a thought wherever it forces one, arXiv 2510.01265)."""
    tensors, old, adv, weight = event_batch(rollouts, advantages, device)
    if len(old) == 0:
        return None, {}
    new = net(*tensors)
    ratio = torch.exp(new - old)
    loss = -(weight * torch.minimum(ratio * adv, torch.clamp(ratio, 1 - args.clip, 1 + args.clip) * adv)).sum()
    kl = torch.zeros((), device=device)
    if args.kl > 0:
        with torch.no_grad():
            ref = pi_events(*tensors)
        _, _, kinds, _ = tensors
        log_ratio = (ref - new)[kinds == TOKEN]
        kl = (torch.exp(log_ratio) - log_ratio - 1).sum()
        loss = loss + args.kl * kl
    return loss / denominator, dict(max_abs_logratio=float((new - old).detach().abs().max()), kl=float(kl))


# =====================================================================================================
# 5. The loop: rollouts, rewards, advantages, update; then annotate
# =====================================================================================================

def update(net, pi_events, optimizer, rolls, adv, args, world, device):
    """--epochs passes of policy_loss over this rank's rollouts, --micro-rows at a time, each event weighted
    1 / (events of the global batch, all ranks), gradients summed over micro-batches and ranks. Every rank
    runs the same number of micro-batches (the same rollouts per rank). Returns (global events, stats)."""
    n_events = M.all_reduce_sum(float(sum(len(x.events) for x in rolls)))
    extra = {}
    for _ in range(args.epochs):
        micro = list(range(0, len(rolls), args.micro_rows))
        for k, m in enumerate(micro):
            sync = k == len(micro) - 1 or not hasattr(net, "no_sync")
            with (net.no_sync() if not sync else contextlib.nullcontext()), M.autocast(device):
                loss, extra = policy_loss(net, pi_events, rolls[m:m + args.micro_rows], adv[m:m + args.micro_rows],
                                          args, device, max(n_events, 1.0))
                if loss is not None:
                    (loss * world).backward()  # DDP/FSDP average gradients over ranks; the loss wants their sum
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return n_events, extra


def probe_lines(plans, share, rng):
    """--explore: each line of a trace is probed with probability `share`, the same lines in all G of its
    rollouts; at a probed line each rollout is made to comment with probability 1/2 (_sample's explore
    value). So a probed line's group holds about G/2 of q's comments and G/2 of q's own choices: the comments
    are compared with each other and with no comment at the same state, as RLP compares thoughts forced at
    sampled positions against a no-think baseline (arXiv 2510.01265)."""
    return [[0.5 if x else 0.0 for x in rng.random(len(p.actions)) < share] for p in plans]


def group_advantages(rollouts, r, group, args):
    """Per rollout, the advantage of each of its steps; and how many (trace, step) groups had no spread."""
    adv, flat = [], 0
    for g in range(0, len(rollouts), group):
        R = truncated_returns(np.stack(r[g:g + group]), args.horizon, args.gamma)
        a, flat_steps = grpo_advantages(R, args.std_scale)
        adv += list(a)
        flat += int(flat_steps.sum())
    return adv, flat


def step_stats(rollouts, r, adv, flat, n_groups):
    """The batch's numbers. think_advantage: the mean advantage of a line after a comment, its return against
    the group's at that line (mostly no comment): what a comment bought over H lines, less c, on average;
    think_pays: the share of comments whose advantage is positive."""
    thinks = [z is not None for ro in rollouts for z in ro.latents]
    gains = [a[t] for ro, a in zip(rollouts, adv) for t, z in enumerate(ro.latents) if z is not None]
    lengths = [sum(1 for role, line in zip(ro.roles, ro.lines) if role == COMMENT and line == t)
               for ro in rollouts for t, z in enumerate(ro.latents) if z is not None]
    cuts = [c for ro in rollouts for c, z in zip(ro.cut, ro.latents) if z is not None]
    return dict(reward=float(np.mean(np.concatenate(r))), elbo=float(np.mean([x.sum() for x in r])),
                think_rate=float(np.mean(thinks)), latent_len=float(np.mean(lengths)) if lengths else 0.0,
                cut_share=float(np.mean(cuts)) if cuts else 0.0, zero_spread=flat / max(n_groups, 1),
                think_advantage=float(np.mean(gains)) if gains else 0.0,
                think_pays=float(np.mean(np.array(gains) > 0)) if gains else 0.0)


def annotate(q, pi, units, sets, plans, args):
    """Bootstrap: the latents q writes into each trace (a list per plan).
      one    one rollout of q at --annotate-temperature
      best   the best of G such rollouts by return (sum_t r_t)
      gain   one rollout, keeping a comment only where it raises pi's log-likelihood of the code it
             precedes (its line and the lines up to the next comment) by more than c"""
    group = args.group if args.annotate == "best" else 1
    out = []
    for start in range(0, len(plans), args.micro_rows):
        part = plans[start:start + args.micro_rows]
        rolls = rollout(q, units, sets, part, group, args.max_latent, args.annotate_temperature,
                        args.seed + 7919 + start)
        if args.annotate == "best":
            r = rewards(pi, sets, rolls, args.penalty, args.micro_rows)
            rolls = [rolls[max(range(g, g + group), key=lambda i: r[i].sum())] for g in range(0, len(rolls), group)]
        latents = [list(ro.latents) for ro in rolls]
        if args.annotate == "gain":
            with_z = rewards(pi, sets, rolls, 0.0, args.micro_rows)
            none = rewards(pi, sets, [forced_rollout(units, sets, p, [None] * len(p.actions)) for p in part], 0.0,
                           args.micro_rows)
            for z, a, b in zip(latents, with_z, none):
                at = [t for t, x in enumerate(z) if x is not None]
                for t, end in zip(at, at[1:] + [len(z)]):
                    if (a[t:end] - b[t:end]).sum() <= args.penalty:
                        z[t] = None
        out += latents
    return out


# =====================================================================================================
# 6. Instruments: what q has learned, on held-out traces
# =====================================================================================================

def minicode_world(data):
    """The world of a minicode mid-training corpus (it knows the step of every line), else None."""
    world, what = minicode.parse(data) or (None, None)
    return world if what == "midtrain" else None


def load_corpus(spec, args):
    """(traces, true plan per trace id or None). A stripped:SPEC corpus is read through its oracle view, whose
    latents are the expert's own comments; on minicode-midtrain the world knows the plan instead."""
    if spec.startswith("stripped:"):
        traces, plans = D.load_traces("oracle:" + spec[len("stripped:"):], field=args.field)
        return traces, {t.id: z for t, z in zip(traces, plans)}
    return minicode.load_traces(spec, n_tasks=args.n_tasks, field=args.field)[0], None


def held_out_split(traces, truth, args):
    """(training traces, held-out traces, their true plans or None, their minicode tasks or None).
    minicode-midtrain: more of the same stream (another seed, none that the corpus holds), whose tasks know
    the step of every line. --eval-data: --eval-traces traces spread through that corpus. Otherwise whole
    files of the corpus (D.held_out_files: those mstep.py --eval-share 0.05 holds out), so that no held-out
    function shares a file with a trained one, and --eval-traces traces spread through them."""
    if args.eval_traces == 0:
        return traces, [], None, None
    world = minicode_world(args.data)
    if world is not None:
        seen = {D.render(t) for t in traces}
        tasks = [t for t in minicode.midtrain_tasks(2 * args.eval_traces, seed=1, world=world)
                 if D.render(t.trace) not in seen]
        tasks = tasks[:args.eval_traces]
        return traces, [t.trace for t in tasks], [t.true_plan() for t in tasks], tasks
    if args.eval_data:
        held, truth = load_corpus(args.eval_data, args)
    else:
        traces, held = D.held_out_files(traces, args.eval_traces)
    held = D.spread(held, args.eval_traces)  # from as many files as the held-out share has
    return traces, held, None if truth is None else [truth[t.id] for t in held], None


def comment_naming(latents, tasks):
    """Counts over q's comments (latents per trace), read by the world: how many name the step that
    follows (kind), name it with its parameter too, name another step, or name none (no plan phrasing)."""
    counts = dict(comments=0, named_step=0, named_param=0, wrong_step=0, unnamed=0)
    for zs, task in zip(latents, tasks):
        for z, step in zip(zs, task.step_of):
            if z is None:
                continue
            names = minicode.names_of(z)
            kinds = {kind for kind, _ in names}
            truth = None if step is None else (task.kinds[step], tuple(sorted(task.params[step].items())))
            counts["comments"] += 1
            counts["unnamed"] += not names
            counts["named_step"] += truth is not None and truth[0] in kinds
            counts["named_param"] += truth in names
            counts["wrong_step"] += bool(names) and (truth is None or truth[0] not in kinds)
    return counts


def chain_counts(latents, tasks):
    """Over the lines where a step with a chain parameter starts (minicode.Task.chain_starts): how many there
    are, how many q comments before, and how many of its comments there name the step with the chain's value."""
    counts = dict(chain_starts=0, thinks_at_chain=0, chain_right=0)
    for zs, task in zip(latents, tasks):
        for z, at, i in zip(zs, task.chain_starts(), task.step_of):
            if at:
                counts["chain_starts"] += 1
                counts["thinks_at_chain"] += z is not None
                counts["chain_right"] += z is not None and (
                    task.kinds[i], tuple(sorted(task.params[i].items()))) in minicode.names_of(z)
    return counts


def annotation_stats(plans, latents, args):
    """The annotated corpus, summed over ranks: its think rate and, on minicode-midtrain, what its comments
    name (the share of wrong-step comments is what the M-step would learn as noise)."""
    world = minicode_world(args.data)
    if world is not None:
        by_id = {t.trace.id: t for t in minicode.midtrain_tasks(args.n_tasks, world=world)}
        sums = comment_naming(latents, [by_id[p.trace.id] for p in plans])
    else:
        sums = dict(comments=sum(x is not None for z in latents for x in z))
    sums["lines"] = sum(len(z) for z in latents)
    sums = {k: M.all_reduce_sum(float(v)) for k, v in sums.items()}
    out = dict(annotated_think_rate=sums["comments"] / max(sums["lines"], 1.0))
    for k in ("named_step", "wrong_step", "unnamed"):
        if k in sums:  # None where there is no comment to read
            out[f"annotated_{k}"] = sums[k] / sums["comments"] if sums["comments"] else None
    return out


def _my_share(items):
    """The items this rank measures: every world-th one."""
    rank, world = M.rank_and_world()
    return None if items is None else items[rank::world]


def reference_scores(pi, units, sets, plans, truth, args):
    """pi's log-likelihood of this rank's held-out code with no comments and, where it is known, with the true
    plan (minicode's plan comments, real code's own comments): fixed for the run (pi is frozen), so measured
    once, not at every instruments call."""
    plans, truth = _my_share(plans), _my_share(truth)

    def score(latents):
        rolls = [forced_rollout(units, sets, p, z) for p, z in zip(plans, latents)]
        return sum(x.sum() for x in rewards(pi, sets, rolls, 0.0, args.micro_rows))

    out = dict(code_ll_none=score([[None] * len(p.actions) for p in plans]))
    if truth is not None:
        out["code_ll_plan"] = score(truth)
    return out


def instruments(q, pi, units, sets, plans, truth, tasks, reference, args):
    """One rollout of q per held-out trace (the same random numbers at every call), scored by pi:
      elbo                  E_q sum_t r_t per trace: the objective, penalty included
      think_rate            share of lines q comments
      code_ll_q, _none, _plan   the code's log-likelihood per trace (no penalty) with q's comments, with
                            none, and with the true plan (the last two from `reference`)
      think_at_starts, think_elsewhere   q's think rate where the true plan comments (minicode: where a step
                            starts) and elsewhere
      at_plan               the share of q's comments placed where the true plan comments too
      code_ll_q_at_plan     the code's log-likelihood when q writes a comment exactly where the true plan
                            does and nowhere else: what q's words are worth, apart from where it puts them
      plan_rate, plan_per_trace   the true plan's comments per line and per trace (what _plan - _none buys)
      named_step, named_param, wrong_step, unnamed   shares of q's comments that name the step that
                            follows, name its parameter too, name another step, name none (minicode)
      think_at_chain, chain_right   in a chain world, at the lines where a step with a chain starts: q's
                            think rate, and the share where q writes a comment with the chain's right value
    The true plan is minicode's plan comments or, on stripped real code, the expert's own comments. Sums are
    reduced over ranks (each rank takes every world-th trace). Also returns the comments of this rank's share,
    one record per line where q or the true plan comments (`comment_records`)."""
    plans, truth, tasks = _my_share(plans), _my_share(truth), _my_share(tasks)
    # --micro-rows rollouts at a time: a chunk's cost grows faster than its rows (its rows wait for its longest
    # comment, and every step attends over the chunk's whole cache)
    rolls = rollout(q, units, sets, plans, 1, args.max_latent, args.temperature, seed=4242, max_rows=args.micro_rows)
    r = rewards(pi, sets, rolls, args.penalty, args.micro_rows)
    think = [np.array([z is not None for z in ro.latents]) for ro in rolls]
    sums = dict(traces=len(plans), lines=sum(len(x) for x in think), thinks=sum(x.sum() for x in think),
                elbo=sum(x.sum() for x in r), code_ll_q=sum((x + args.penalty * z).sum() for x, z in zip(r, think)),
                **reference)
    at_plan = [[None] * len(p.actions) for p in plans]
    if truth is not None:
        starts = [np.array([z is not None for z in zs], dtype=bool) for zs in truth]
        sums["starts"] = sum(x.sum() for x in starts)
        sums["thinks_at_starts"] = sum((x & y).sum() for x, y in zip(think, starts))
        sums["thinks_elsewhere"] = sum((x & ~y).sum() for x, y in zip(think, starts))
        forced = rollout(q, units, sets, plans, 1, args.max_latent, args.temperature, seed=4243,
                         max_rows=args.micro_rows, explore=[[1.0 if x else -1.0 for x in y] for y in starts])
        sums["code_ll_q_at_plan"] = sum(x.sum() for x in rewards(pi, sets, forced, 0.0, args.micro_rows))
        at_plan = [ro.latents for ro in forced]
    if tasks is not None:
        sums.update(comment_naming([ro.latents for ro in rolls], tasks))
        sums.update(chain_counts([ro.latents for ro in rolls], tasks))
    sums = {k: M.all_reduce_sum(float(v)) for k, v in sums.items()}
    out = dict(elbo=sums["elbo"] / sums["traces"], think_rate=sums["thinks"] / sums["lines"],
               code_ll_q=sums["code_ll_q"] / sums["traces"], code_ll_none=sums["code_ll_none"] / sums["traces"])
    if truth is not None:  # a share is None where it has nothing to count
        out.update(code_ll_plan=sums["code_ll_plan"] / sums["traces"],
                   code_ll_q_at_plan=sums["code_ll_q_at_plan"] / sums["traces"],
                   think_at_starts=sums["thinks_at_starts"] / sums["starts"] if sums["starts"] else None,
                   think_elsewhere=sums["thinks_elsewhere"] / (sums["lines"] - sums["starts"]),
                   at_plan=sums["thinks_at_starts"] / sums["thinks"] if sums["thinks"] else None,
                   plan_rate=sums["starts"] / sums["lines"], plan_per_trace=sums["starts"] / sums["traces"])
    if tasks is not None:
        comments = sums["comments"]
        out.update({k: sums[k] / comments if comments else None
                    for k in ("named_step", "named_param", "wrong_step", "unnamed")})
        if sums["chain_starts"]:  # a chain world: where comments pay, and how often q's get the value right there
            out.update(think_at_chain=sums["thinks_at_chain"] / sums["chain_starts"],
                       chain_right=sums["chain_right"] / sums["chain_starts"])
    records = comment_records(plans, [ro.latents for ro in rolls], at_plan, truth)
    return {f"heldout_{k}": v for k, v in out.items()}, records


def comment_records(plans, latents, at_plan, truth):
    """One record per held-out line where q comments, or the true plan does: the line, q's comment (None: q
    did not comment), q's comment when made to comment there (None: not a true-plan line) and the true one."""
    out = []
    for p, zs, forced, true in zip(plans, latents, at_plan, truth or [None] * len(plans)):
        for t, a in enumerate(p.trace.actions):
            expert = true[t] if true is not None else None
            if zs[t] is not None or expert is not None:
                out.append(dict(trace=p.trace.id, line=t, code=D.action_parts(a)[1].rstrip("\n"), q=zs[t],
                                q_at_plan=forced[t], expert=expert))
    return out


def make_plans(units, sets, traces, max_lines):
    plans, skipped = [], 0
    for t in traces:
        try:
            if not t.actions:  # no decision, no event: a micro-batch of these would skip the collective forward
                raise D.DataError(f"{t.id}: no line actions")
            if len(t.actions) > max_lines:
                raise D.DataError(f"{t.id}: more than {max_lines} lines")
            plans.append(plan_trace(units, sets, t))
        except D.DataError:
            skipped += 1
    return plans, skipped


def main(args):
    M.check_flags(parser, args, at_least=dict(n_tasks=1, steps=0, batch_traces=1, group=1, horizon=1, gamma=0,
                                              max_latent=1, max_lines=1, epochs=1, clip=0, kl=0, micro_rows=1,
                                              annotate_limit=1, eval_traces=0, eval_every=1, save_every=1, explore=0),
                  above=dict(temperature=0, annotate_temperature=0, lr=0))
    if args.explore > 1:
        parser.error(f"--explore must be at most 1 (a share of the lines), not {args.explore}")
    M.check_wandb(parser, args)
    dist = M.init_dist()
    M.CPU_BF16 = args.cpu_bf16
    done = M.finished_run(args.out, args, "estep", RESUME_KEYS)
    if done is not None:
        return done
    device = dist.device
    out_dir = Path(args.out)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    pi, tok = M.load_model(args.model, device=device)
    pi.requires_grad_(False)
    q = M.load_model(args.q, device=device)[0] if args.q else copy.deepcopy(pi)
    q = q.float().requires_grad_(True).train()  # fp32 master weights; autocast to bf16 on GPU
    # on GPU rollouts read a bf16 copy of q; under FSDP a whole copy (q's weights become shards)
    sampler = M.sampling_copy(q, sharded=M.shards(dist, args.fsdp))
    units = Units(tok)
    sets = ThinkSets(tok, q.get_output_embeddings().weight.shape[0], device, units.newline_first)
    traces, truth = load_corpus(args.data, args)
    traces, held_traces, held_truth, held_tasks = held_out_split(traces, truth, args)
    plans, skipped = make_plans(units, sets, traces, args.max_lines)
    held, _ = make_plans(units, sets, held_traces, args.max_lines)
    kept = {p.trace.id for p in held}  # keep the labels of the traces that made it
    if held_truth is not None:
        held_truth = [z for t, z in zip(held_traces, held_truth) if t.id in kept]
    if held_tasks is not None:
        held_tasks = [t for t in held_tasks if t.trace.id in kept]
    if not plans:
        raise D.DataError(f"{args.data}: no usable traces ({skipped} skipped)")
    if 0 < len(held) < dist.world:
        raise ValueError(f"{len(held)} held-out traces cannot be shared by {dist.world} ranks: raise --eval-traces")
    if args.batch_traces % dist.world:
        raise ValueError(f"--batch-traces {args.batch_traces} must divide among {dist.world} ranks")
    per_rank = args.batch_traces // dist.world
    net = M.wrap_for_ranks(EventLogProbs(q, sets, args.temperature), dist, args.fsdp)
    pi_events = EventLogProbs(pi, sets, args.temperature)
    optimizer = torch.optim.AdamW(q.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")
    start = 0
    if args.resume and (out_dir / "checkpoint").exists():
        M.check_resumable(out_dir / "checkpoint", "estep", args, RESUME_KEYS)
        start = M.load_training(out_dir / "checkpoint", net, optimizer)
        M.sync_sampling_copy(sampler, q)
        M.print0(f"resumed from {out_dir / 'checkpoint'} at step {start}")
    log = M.MetricsLog(out_dir / "metrics.jsonl", start, args)
    M.print0(f"estep: {len(plans)} traces ({skipped} skipped), {len(held)} held out, B={args.batch_traces} "
             f"G={args.group} H={args.horizon} c={args.penalty} L={args.max_latent}, "
             f"units {'newline-first' if units.newline_first else 'newline-last'}")

    reference = reference_scores(pi, units, sets, held, held_truth, args) if held else {}

    def measure(step):
        q.eval()
        m, records = instruments(sampler, pi, units, sets, held, held_truth, held_tasks, reference, args)
        q.train()
        if M.is_main():  # what q wrote: rank 0's share of the held-out traces
            with open(out_dir / "comments.jsonl", "a") as f:
                f.writelines(json.dumps(dict(step=step, **x)) + "\n" for x in records)
        return m

    if start == 0 and held:
        if M.is_main():
            (out_dir / "comments.jsonl").unlink(missing_ok=True)
        log(dict(step=0, **measure(0)))
    order = np.random.default_rng(args.seed).permutation(len(plans))
    from tqdm.auto import tqdm
    last, interrupt = {}, M.StopOnInterrupt()
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not M.is_main(), desc="estep"):
        picks = [order[(step * args.batch_traces + k) % len(plans)] for k in range(args.batch_traces)]
        ours = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
        batch = [plans[i] for i in picks[ours]]
        probes = probe_lines([plans[i] for i in picks], args.explore, np.random.default_rng([args.seed, step]))[ours]
        t0 = time.perf_counter()
        q.eval()
        rolls = rollout(sampler, units, sets, batch, args.group, args.max_latent, args.temperature, args.seed * 100003 + step,
                        explore=probes)
        q.train()
        t1 = time.perf_counter()
        r = rewards(pi, sets, rolls, args.penalty, args.micro_rows)
        adv, flat = group_advantages(rolls, r, args.group, args)
        t2 = time.perf_counter()
        n_events, extra = update(net, pi_events, optimizer, rolls, adv, args, dist.world, device)
        M.sync_sampling_copy(sampler, q)
        t3 = time.perf_counter()
        n_groups = sum(len(p.actions) for p in batch)
        stats = step_stats(rolls, r, adv, flat, n_groups)
        stats = {k: M.all_reduce_mean(v) for k, v in stats.items()}
        tokens = M.all_reduce_sum(float(sum(len(x.plan.prompt) + len(x.ids) for x in rolls)))
        last = dict(step=step + 1, **stats, kl=extra.get("kl", 0.0), events=n_events,
                    rollout_s=t1 - t0, reward_s=t2 - t1, train_s=t3 - t2,
                    lines_per_s=M.all_reduce_sum(float(n_groups * args.group)) / (t2 - t0),
                    tokens_per_s=tokens / (t2 - t0))
        if held and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            last.update(measure(step + 1))
        _warn(last)
        log(last)
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            M.save_training(out_dir / "checkpoint", net, q, tok, optimizer, "estep", step + 1, args, last)
        if step + 1 < args.steps and interrupt.asked():
            M.stop_interrupted(out_dir / "checkpoint", net, q, tok, optimizer, "estep", step + 1, args, last)
    interrupt.restore()
    q.eval()
    lim = args.annotate_limit or len(plans)  # held-out files stay out of the M-step's traces too
    mine = plans[:lim][dist.rank::dist.world]
    t0 = time.perf_counter()
    latents = annotate(sampler, pi, units, sets, mine, args)
    annotate_s = M.all_reduce_sum(time.perf_counter() - t0) / dist.world
    D.write_traces(out_dir / f"traces.rank{dist.rank}.jsonl", [p.trace for p in mine], latents)
    if truth is not None:  # real code: the same traces with none of the expert's comments and with all of them,
        parts = ("traces", "stripped", "oracle")  # so that NTP, the oracle and RA3 train on the same code
        D.write_traces(out_dir / f"stripped.rank{dist.rank}.jsonl", [p.trace for p in mine])
        D.write_traces(out_dir / f"oracle.rank{dist.rank}.jsonl", [p.trace for p in mine],
                       [truth[p.trace.id] for p in mine])
    else:
        parts = ("traces",)
    ann = annotation_stats(mine, latents, args)
    M.barrier()
    curve = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()] if M.is_main() else []
    summary = dict(stage="estep", steps=args.steps, **{k: v for k, v in last.items() if k != "step"},
                   heldout_curve=[{k: v for k, v in m.items() if k == "step" or k.startswith("heldout_")}
                                  for m in curve if "heldout_elbo" in m],
                   annotated=lim, **ann, annotate_s=round(annotate_s, 2), traces=str(out_dir / "traces.jsonl"),
                   q=str(out_dir / "q"))
    M.save_training(out_dir / "checkpoint", net, q, tok, optimizer, "estep", args.steps, args, summary)
    M.save_training(out_dir / "q", net, q, tok, optimizer, "estep", args.steps, args, summary, with_trainer=False)
    if M.is_main():
        for name in parts:
            _merge_parts(out_dir, name, dist.world)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    M.print0(json.dumps(summary))
    log.close()
    return summary


def _merge_parts(out_dir, name, world):
    with open(out_dir / f"{name}.jsonl.tmp", "w") as f:
        for rank in range(world):
            part = out_dir / f"{name}.rank{rank}.jsonl"
            f.write(part.read_text())
            part.unlink()
    (out_dir / f"{name}.jsonl.tmp").replace(out_dir / f"{name}.jsonl")


def _warn(s):
    if s["step"] >= 3 and (s["think_rate"] < 0.01 or s["think_rate"] > 0.99):
        M.print0(f"warning: think rate {s['think_rate']:.3f} at step {s['step']}: q has stopped choosing")
    if s["cut_share"] > 0.5:
        M.print0(f"warning: {s['cut_share']:.0%} of comments hit --max-latent; raise it or expect truncated latents")
    if s["zero_spread"] > 0.9:
        M.print0(f"warning: {s['zero_spread']:.0%} of (trace, line) groups have no spread: little gradient")


if __name__ == "__main__":
    M.run_main(main, args)
