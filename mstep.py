"""mstep.py: next-token prediction on expert traces. One trainer, three uses, and with --steps 0 --eval-share 1
a scorer (a model's cross-entropy on a corpus, nothing trained):

    RA3 M-step     python mstep.py --model PI --data runs/estep/traces.jsonl    (latent-infused traces)
    NTP baseline   python mstep.py --model BASE --data minicode-midtrain        (the same traces, raw)
    pretraining    python mstep.py --init scratch --data minicode-pretrain      (a small base model)

Paper map (RA3, arXiv 2509.25810). The M-step raises the temporal ELBO in pi with the latents fixed:
    max_pi  E_{z ~ q} sum_t [ log pi(z_t | s_t) + log pi(a_t | s_t, z_t) ]
With the E-step's latents written into the code as comment lines, that is next-token prediction on the
latent-infused traces (`batch_loss`): every token is a target by default, so the model learns to write
the abstractions; --mask-latents keeps only the log pi(a_t | ...) terms. Without latents it is the NTP
baseline. The global batch is fixed in tokens and the loss is a token-mean over it, whatever the number
of ranks (`train_step`); warmup then cosine or linear decay (`lr_at`).

torchrun --nproc_per_node=N mstep.py ... runs DDP (gloo on CPU, NCCL on GPU); --fsdp shards the model
(FSDP2) for models that do not fit one GPU with DDP. Outputs: OUT/model (the trained model), OUT/checkpoint
(latest, with optimizer state: --resume continues from it), OUT/metrics.jsonl, OUT/summary.json.
"""
import argparse

import flags

parser = argparse.ArgumentParser(description="Next-token prediction on traces: M-step, NTP baseline, pretraining.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="minicode-base", help="model to start from (model.py spec)")
parser.add_argument("--init", choices=["model", "scratch"], default="model",
                    help="start from --model, or from random weights with a tokenizer trained on --data")
parser.add_argument("--data", default="minicode-midtrain",
                    help="traces .jsonl (latents included), minicode-pretrain, minicode-midtrain, a minicode "
                         "problem split such as minicode-heldout (its expert solutions), stdlib, DIR, hf:NAME; real "
                         "code as stripped:SPEC (comments out) or oracle:SPEC (the expert's comments as latents)")
parser.add_argument("--n-tasks", type=int, default=10000, help="minicode corpora: number of tasks")
parser.add_argument("--field", default="content", help="hf: text field")
parser.add_argument("--out", default="runs/mstep", help="output directory")
parser.add_argument("--steps", type=int, default=100,
                    help="optimizer steps (0: only score the held-out share; with --eval-share 1, a corpus)")
parser.add_argument("--epochs", type=float, default=None,
                    help="train this many passes over the training rows instead of --steps (on the traces estep.py "
                         "writes, NTP, the oracle and RA3 then see the same code)")
parser.add_argument("--seq-len", type=int, default=512, help="packed row length in tokens")
parser.add_argument("--batch-tokens", type=int, default=16384, help="global batch in tokens (all ranks together)")
parser.add_argument("--micro-rows", type=int, default=8, help="rows per rank per micro-step")
parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
parser.add_argument("--warmup", type=int, default=10, help="warmup steps")
parser.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="decay after warmup")
parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a share of --lr")
parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
parser.add_argument("--mask-latents", action="store_true", help="no loss on latent comment tokens")
parser.add_argument("--mask-prompt", action="store_true", help="no loss on prompt tokens")
parser.add_argument("--eval-share", type=float, default=0.02,
                    help="share held out for the eval loss, by file (a minicode trace is its own file); on real code "
                         "0.05 holds out the files estep.py measures on")
parser.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps")
parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
# --resume --overwrite --fsdp --seed --cpu-bf16 --wandb, alike in every trainer (flags.py)
flags.add_trainer_flags(parser, seed_help="data order and initialisation seed")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the decoder layers and the log-softmax (default: on GPU)")
parser.add_argument("--family", default="llama", choices=["llama", "qwen2", "gpt2"], help="--init scratch: family")
parser.add_argument("--hidden", type=int, default=192, help="--init scratch: hidden size")
parser.add_argument("--layers", type=int, default=6, help="--init scratch: layers")
parser.add_argument("--heads", type=int, default=6, help="--init scratch: attention heads")
parser.add_argument("--kv-heads", type=int, default=2, help="--init scratch: key/value heads")
parser.add_argument("--vocab-size", type=int, default=1024, help="--init scratch: tokenizer vocabulary")
if __name__ == "__main__":
    args = parser.parse_args()

import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data as D  # noqa: E402
import minicode  # noqa: E402
import model as M  # noqa: E402

PEAK_FLOPS = 989e12  # H100 dense bf16, the figure MFU is reported against
RESUME_KEYS = ("model", "init", "data", "n_tasks", "seq_len", "batch_tokens", "lr", "warmup", "schedule", "min_lr_ratio",
               "weight_decay", "mask_latents", "mask_prompt", "eval_share", "seed", "family", "hidden", "layers",
               "heads", "kv_heads", "vocab_size")


# ---- the objective ----------------------------------------------------------------------------------------

def batch_loss(logprobs_fn, batch, denominator):
    """Summed NLL of the batch's target tokens over `denominator` (the global batch's target count)."""
    ids, pos, doc, mask = batch
    lp = logprobs_fn(ids, pos, doc)
    return -(lp * mask).sum() / denominator


def targets(p):
    """A token is a target if its loss mask is on and it has context: not the first token of its document."""
    has_context = torch.zeros_like(p.loss_mask)
    has_context[:, 1:] = (p.doc_ids[:, 1:] == p.doc_ids[:, :-1]) & (p.doc_ids[:, 1:] >= 0)
    return p.loss_mask & has_context


def lr_at(step, args):
    """Linear warmup to --lr, then cosine or linear decay to --min-lr-ratio * --lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1 - progress
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * decay)


# ---- data -------------------------------------------------------------------------------------------------

def build_rows(tok, traces, latents, args):
    """Pack the training and held-out traces into rows; masks follow --mask-latents / --mask-prompt."""
    encoded = D.encode_traces(tok, traces, latents)
    train, evals = ([], []), ([], [])
    for t, (ids, prompt, latent) in zip(traces, encoded):
        mask = np.ones(len(ids), bool)
        if args.mask_latents:
            mask &= ~latent
        if args.mask_prompt:
            mask &= ~prompt
        dest = evals if D.held_out(t.id, args.eval_share) else train  # whole files
        dest[0].append(ids)
        dest[1].append(mask.tolist())
    if not train[0] and args.steps:
        raise D.DataError(f"{args.data}: no training traces")
    packed = D.pack(train[0], args.seq_len, train[1]) if train[0] else None
    eval_packed = D.pack(evals[0], args.seq_len, evals[1]) if evals[0] else None
    return packed, eval_packed


def step_rows(step, n_rows, rows_per_step, seed):
    """Indices of the rows of global step `step`: consecutive slices of a fresh permutation each epoch,
    a pure function of the step, so a resumed run reads exactly what the killed one would have."""
    out = []
    start = step * rows_per_step
    while len(out) < rows_per_step:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        out += perm[offset:offset + rows_per_step - len(out)].tolist()
    return out


# ---- model setup ------------------------------------------------------------------------------------------

def init_model(args, traces, latents, device):
    if args.init == "scratch":
        texts = [D.render(t, z) for t, z in zip(traces[:5000], (latents or [None] * len(traces))[:5000])]
        tok = M.tiny_tokenizer(args.family, vocab_size=args.vocab_size, texts=texts)
        M.prepare_tokenizer(tok)
        config = M.tiny_config(args.family, tok, hidden=args.hidden, layers=args.layers, heads=args.heads,
                               kv_heads=args.kv_heads, max_len=max(2048, args.seq_len))
        torch.manual_seed(args.seed)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        M.prepare_tokenizer(tok, model)
        M.use_ra3_attention(model)
    else:
        model, tok = M.load_model(args.model, device="cpu", dtype=torch.float32)  # fp32 master weights
    if args.seq_len > M.model_max_len(model):
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model takes ({M.model_max_len(model)} positions)")
    return model.to(device).train(), tok


def make_optimizer(model, args, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def flops_per_token(model, seq_len):
    """6N for the weights (embeddings excluded) plus attention's 12 * layers * hidden * seq_len."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "wte" not in name
            and "wpe" not in name)
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return 6 * n + 12 * cfg.num_hidden_layers * hidden * seq_len


# ---- the loop ---------------------------------------------------------------------------------------------

def evaluate(net, rows, dist_info, args, device):
    """Token-mean held-out loss. Ranks split the rows and all run the same number of forwards (FSDP
    needs every rank in every forward): a rank short of rows scores row 0 with its mask off."""
    if rows is None:
        return None
    mask = targets(rows)
    n = len(rows.input_ids)
    per_rank = math.ceil(n / dist_info.world)
    mine = [dist_info.rank + k * dist_info.world for k in range(per_rank)]
    nll, count = torch.zeros((), device=device), torch.zeros((), device=device)
    with torch.no_grad(), M.autocast(device):
        for i in range(0, per_rank, args.micro_rows):
            idx = (mine[i:i + args.micro_rows] + [n] * args.micro_rows)[:args.micro_rows]  # fixed shape: one graph
            real = torch.tensor([j < n for j in idx])
            idx = [j if j < n else 0 for j in idx]
            lp = net(*(t[idx].to(device) for t in (rows.input_ids, rows.position_ids, rows.doc_ids)))
            m = (mask[idx] & real[:, None]).to(device)
            nll += -(lp * m).sum()
            count += m.sum()
    nll, count = M.all_reduce_sum(nll), M.all_reduce_sum(count)
    return (nll / count.clamp(min=1)).item()


def train_step(net, optimizer, packed, mask, rows, dist_info, args, device):
    """One optimizer step over the global batch `rows`: this rank's share in micro-batches, every rank
    the same number of micro-steps, loss normalised by the global target count (known to every rank)."""
    per_rank = len(rows) // dist_info.world
    mine = rows[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
    denominator = mask[rows].sum().clamp(min=1).to(device)
    local = torch.zeros((), device=device)
    # the whole step's rows go to the device at once: a copy from pageable memory waits for the GPU, and
    # one per micro-step would leave the GPU idle while the next micro-step is being launched
    data = tuple(t[mine].to(device) for t in (packed.input_ids, packed.position_ids, packed.doc_ids, mask))
    micro = [slice(i, i + args.micro_rows) for i in range(0, len(mine), args.micro_rows)]
    for k, idx in enumerate(micro):
        batch = tuple(t[idx] for t in data)
        sync = k == len(micro) - 1 or not hasattr(net, "no_sync")
        with (net.no_sync() if not sync else contextlib.nullcontext()), M.autocast(device):
            loss = batch_loss(net, batch, denominator)
            (loss * dist_info.world).backward()  # DDP/FSDP average gradients over ranks; we want their sum
        local += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return M.all_reduce_sum(local).item(), float(grad_norm)


def score_only(model, eval_rows, dist_info, args, device):
    """--steps 0: the model's token-mean cross-entropy on the held-out traces (all of --data with
    --eval-share 1; code only with --mask-prompt), written to OUT/summary.json. Nothing is trained."""
    if eval_rows is None:
        raise D.DataError(f"{args.data}: no held-out traces to score (raise --eval-share)")
    net = M.wrap_for_ranks(M.PackedLogProbs(model.eval()), dist_info, args.fsdp)
    summary = dict(stage="mstep", steps=0, data=args.data, eval_loss=evaluate(net, eval_rows, dist_info, args, device),
                   eval_tokens=int(targets(eval_rows).sum()), model=args.model)
    if M.is_main():
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    M.print0(json.dumps(summary))
    return summary


def main(args):
    M.check_flags(parser, args, at_least=dict(n_tasks=1, steps=0, seq_len=2, batch_tokens=1, micro_rows=1, warmup=0,
                                              min_lr_ratio=0, weight_decay=0, eval_every=1, save_every=1, hidden=1,
                                              layers=1, heads=1, kv_heads=1, vocab_size=260),
                  above=dict(lr=0, clip=0, epochs=0))
    M.check_wandb(parser, args)
    if not 0 <= args.eval_share < 1 and not (args.steps == 0 and args.eval_share == 1):
        parser.error(f"--eval-share must be in [0, 1) (1 only with --steps 0), not {args.eval_share}")
    dist_info = M.init_dist()
    M.CPU_BF16 = args.cpu_bf16
    # with --epochs the steps are known only once the rows are packed: look for a finished run then
    done = M.finished_run(args.out, args, "mstep", RESUME_KEYS) if args.epochs is None else None
    if done is not None:
        return done
    device = dist_info.device
    out = Path(args.out)
    torch.manual_seed(args.seed)
    traces, latents = minicode.load_traces(args.data, n_tasks=args.n_tasks, field=args.field)
    model, tok = init_model(args, traces, latents, device)
    packed, eval_rows = build_rows(tok, traces, latents, args)
    if args.steps == 0:
        return score_only(model, eval_rows, dist_info, args, device)
    mask = targets(packed)
    rows_per_step = args.batch_tokens // args.seq_len
    if args.epochs is not None:
        args.steps = max(1, round(args.epochs * len(packed.input_ids) / rows_per_step))
        done = M.finished_run(args.out, args, "mstep", RESUME_KEYS)
        if done is not None:
            return done
    if rows_per_step < dist_info.world or rows_per_step % dist_info.world:
        raise ValueError(f"--batch-tokens {args.batch_tokens} gives {rows_per_step} rows of {args.seq_len}, "
                         f"which {dist_info.world} ranks cannot share evenly")
    if args.compile if args.compile is not None else device.type == "cuda":
        M.compile_scorer(model)  # before DDP/FSDP wrap it; in place, so checkpoints keep their keys
    net = M.wrap_for_ranks(M.PackedLogProbs(model), dist_info, args.fsdp)
    optimizer = make_optimizer(net, args, device)
    start, tokens_seen, seconds = 0, 0, 0.0
    if args.resume and (out / "checkpoint").exists():
        M.check_resumable(out / "checkpoint", "mstep", args, RESUME_KEYS)
        start = M.load_training(out / "checkpoint", net, optimizer)
        so_far = M.read_meta(out / "checkpoint")["metrics"]  # so that the summary covers the whole run
        tokens_seen, seconds = so_far.get("tokens", 0), so_far.get("seconds", 0.0)
        M.print0(f"resumed from {out / 'checkpoint'} at step {start}")
    log = M.MetricsLog(out / "metrics.jsonl", start, args)
    M.print0(f"mstep: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(traces)} traces, "
             f"{len(packed.input_ids)} rows of {args.seq_len}, {rows_per_step} rows a step on {dist_info.world} "
             f"rank(s), {args.steps} steps")
    fpt = flops_per_token(model, args.seq_len)
    from tqdm.auto import tqdm
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not M.is_main(), desc="mstep")
    t_start, last = time.perf_counter() - seconds, {}
    interrupt = M.StopOnInterrupt()
    for step in bar:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args)
        t0 = time.perf_counter()
        rows = step_rows(step, len(packed.input_ids), rows_per_step, args.seed)
        loss, grad_norm = train_step(net, optimizer, packed, mask, rows, dist_info, args, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        n_tok = int((packed.doc_ids[rows] >= 0).sum())
        tokens_seen += n_tok
        last = dict(step=step + 1, loss=loss, lr=lr_at(step, args), grad_norm=grad_norm, tokens_per_s=n_tok / dt,
                    tokens=tokens_seen, seconds=round(time.perf_counter() - t_start, 2))
        if device.type == "cuda":
            last["mfu"] = fpt * n_tok / dt / (PEAK_FLOPS * dist_info.world)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            last["eval_loss"] = evaluate(net, eval_rows, dist_info, args, device)
        log(last)
        if M.is_main():
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            M.save_training(out / "checkpoint", net, model, tok, optimizer, "mstep", step + 1, args, last)
        if step + 1 < args.steps and interrupt.asked():
            M.stop_interrupted(out / "checkpoint", net, model, tok, optimizer, "mstep", step + 1, args, last)
    interrupt.restore()
    bar.close()
    elapsed = time.perf_counter() - t_start
    summary = dict(stage="mstep", steps=args.steps, final_loss=last.get("loss"), eval_loss=last.get("eval_loss"),
                   tokens=tokens_seen, seconds=round(elapsed, 2), tokens_per_s=tokens_seen / max(elapsed, 1e-9),
                   params=sum(p.numel() for p in model.parameters()), model=str(out / "model"))
    if "mfu" in last:
        summary["mfu"] = last["mfu"]
    M.finish_training(out, net, model, tok, optimizer, "mstep", args.steps, args, summary)
    log.close()
    return summary


if __name__ == "__main__":
    M.run_main(main, args)
