"""bench.py: speed of model.py's sampler and scorer against plain transformers, measured in one run.

Sampler: model.generate (transformers) vs model.py's generate on the same model, prompts, batch and
lengths, both producing exactly --max-new-tokens per row (eos ignored). Scorer: a transformers forward
over a padded batch plus a full log-softmax vs packed_logprobs over the same documents packed into rows.
On GPU it also measures device memory bandwidth (a large copy) and estimates the bytes one decode step
must move (weights + the KV cache it reads + logits), to say how close the sampler is to that limit.

E-step (--estep): estep.py's own loop on minicode at --estep-batch traces x 8 rollouts, the median time
of an update's phases (rollout, rewards, training) and the time to annotate --estep-annotate traces;
with --profile, where the time goes (the functions with the most cumulative time); with
--baseline-commit C, the same loop of commit C's files, alternating with ours in one run, and the ratio.
RL (--rlvr): the same for rlvr.py's loop at its default batch (16 prompts x 8 samples): the median time
of a step's phases (sampling, scoring pi_old, waiting for the tests, the update). --stage-args passes
more flags to both sides (another corpus, say), --baseline-args to the baseline only. gpu.sh runs the
GPU figures of docs/speed.md through this script in one go.

    python bench.py                                   # CPU, tiny preset
    python bench.py --model smollm2 --prompts 64 --n 4,10 --max-new-tokens 128   # GPU
    python bench.py --estep --model minicode-base --profile                       # the E-step update
    python bench.py --estep --model minicode-base --baseline-commit 431c937        # and its speed-up over 431c937
    python bench.py --rlvr --model minicode-base --baseline-commit 412f804         # an RL step against 412f804
"""
import argparse
import contextlib
import json
import sysconfig
import time
from pathlib import Path

parser = argparse.ArgumentParser(description="Sampler and scorer throughput vs transformers.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--model", default="tiny-llama", help="any model.py spec")
parser.add_argument("--prompts", type=int, default=8, help="distinct prompts")
parser.add_argument("--n", default="4", help="samples per prompt; a comma list runs several batch sizes")
parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens sampled per row")
parser.add_argument("--prompt-tokens", type=int, default=96, help="longest prompt, in tokens (they vary 50-100%%)")
parser.add_argument("--score-docs", type=int, default=256, help="documents for the scorer benchmark")
parser.add_argument("--score-rows", default="512,1024,2048", help="packed row lengths to time the scorer at")
parser.add_argument("--skip-hf", action="store_true", help="skip the transformers baselines")
parser.add_argument("--compile", action="store_true", help="also time the sampler with torch.compile (GPU)")
parser.add_argument("--profile", action="store_true", help="print where a decode step spends its GPU time")
parser.add_argument("--estep", action="store_true", help="time the E-step instead of the sampler and scorer")
parser.add_argument("--rlvr", action="store_true", help="time rlvr.py's step instead of the sampler and scorer")
parser.add_argument("--estep-batch", type=int, default=16, help="--estep: traces per update (B; G = 8)")
parser.add_argument("--updates", type=int, default=6, help="--estep/--rlvr: updates (RL steps) timed")
parser.add_argument("--estep-annotate", type=int, default=1000, help="--estep: traces annotated")
parser.add_argument("--baseline-commit", default=None,
                    help="--estep/--rlvr: also time this commit's script (e.g. 431c937) in the same run, print the "
                         "ratio; or a directory holding that commit's files")
parser.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 keeps timings sane on a machine shared with other jobs")
parser.add_argument("--cpu-bf16", action="store_true",
                    help="--estep/--rlvr: run the script with --cpu-bf16 (a baseline commit without that flag runs in fp32)")
parser.add_argument("--repeats", type=int, default=1, help="--estep/--rlvr: runs of each, alternating; the best kept")
parser.add_argument("--stage-args", default="",
                    help="--estep/--rlvr: more flags for the stage script, both sides (e.g. \"--data stdlib --max-lines 24\")")
parser.add_argument("--baseline-args", default="",
                    help="--estep/--rlvr: flags for the baseline's run only, after --stage-args (e.g. the --micro-rows "
                         "it fits in memory with)")
parser.add_argument("--out", default=None, help="write bench.json here")
args = parser.parse_args()

import torch  # noqa: E402

if args.threads:
    torch.set_num_threads(args.threads)

import data as D  # noqa: E402
import model as M  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def code_prompts(tok, count, max_tokens):
    """Slices of stdlib source of varied length: realistic code prompts, available on every machine."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = tok.encode(text, add_special_tokens=False)
    prompts = []
    for i in range(count):
        length = max_tokens // 2 + (i * 37) % (max_tokens // 2 + 1)
        start = (i * 997) % (len(ids) - max_tokens)
        prompts.append(ids[start:start + length])
    return prompts


def hf_generate(mdl, tok, prompts, n, new):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as transformers expects for generation
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    dev = next(mdl.parameters()).device
    with torch.no_grad():
        out = mdl.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True, temperature=1.0,
                           top_p=1.0, top_k=0, num_return_sequences=n, max_new_tokens=new, min_new_tokens=new,
                           pad_token_id=tok.pad_token_id)
    return out.shape[0] * (out.shape[1] - width)


def decode_step_bytes(mdl, rows, t_attn):
    """Bytes one decode step must move at least: every weight once, each row's KV prefix, the logits."""
    cfg = mdl.config
    weights = sum(p.numel() * p.element_size() for p in mdl.parameters())
    layers = cfg.num_hidden_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = rows * t_attn * layers * 2 * kv_heads * head_dim * next(mdl.parameters()).element_size()
    return weights + kv + rows * cfg.vocab_size * 4 * 3  # logits written, read by log-softmax and sampling


def bench_sampler(mdl, tok, prompts, n, new, results):
    rows = len(prompts) * n
    kw = dict(n=n, max_new_tokens=new, temperature=1.0, ignore_eos=True, max_rows=rows)
    M.release_decoder(mdl)
    out, cold = timed(lambda: M.generate(mdl, tok, prompts, seed=0, **kw))  # includes CUDA graph capture
    out, warm = timed(lambda: M.generate(mdl, tok, prompts, seed=1, **kw))
    tokens = int(out.lengths.sum())
    row = dict(rows=rows, new_tokens=tokens, ours_s=warm, ours_cold_s=cold, ours_tok_s=tokens / warm)
    if not args.skip_hf:
        hf_generate(mdl, tok, prompts, n, 4)  # warm-up, as ours had its first call
        hf_tokens, hf_s = timed(lambda: hf_generate(mdl, tok, prompts, n, new))
        row.update(hf_s=hf_s, hf_tok_s=hf_tokens / hf_s, speedup=(tokens / warm) / (hf_tokens / hf_s))
    if torch.cuda.is_available():
        p_max = max(map(len, prompts))
        buckets = [min(-(-(p_max + s + 1) // M.Decoder.T_BUCKET) * M.Decoder.T_BUCKET, 10**9) for s in range(new)]
        moved = sum(decode_step_bytes(mdl, rows, t) for t in buckets)
        row.update(step_ms=1e3 * warm / new, achieved_gb_s=moved / warm / 1e9)
    if args.compile:
        M.release_decoder(mdl)
        _, c_cold = timed(lambda: M.generate(mdl, tok, prompts, seed=0, compile=True, **kw))
        _, c_warm = timed(lambda: M.generate(mdl, tok, prompts, seed=1, compile=True, **kw))
        row.update(compiled_tok_s=tokens / c_warm, compiled_first_call_s=c_cold)
        M.release_decoder(mdl)
    results["sampler"].append(row)
    line = f"sampler rows={rows:4d}: ours {row['ours_tok_s']:9.0f} tok/s (first call {tokens / cold:9.0f})"
    if "compiled_tok_s" in row:
        line += f" | compiled {row['compiled_tok_s']:9.0f} tok/s (first call {c_cold:.0f} s)"
    if "hf_tok_s" in row:
        line += f" | transformers {row['hf_tok_s']:8.0f} tok/s | ratio {row['speedup']:.1f}x"
        if "compiled_tok_s" in row:
            line += f" (compiled {row['compiled_tok_s'] / row['hf_tok_s']:.1f}x)"
    if "achieved_gb_s" in row:
        line += f" | {row['step_ms']:.2f} ms/step, {row['achieved_gb_s']:.0f} GB/s moved"
    print(line, flush=True)


def profile_decode(mdl, tok, prompts, n, new, results):
    """Where a sampling step's time goes: CUDA-event time of one replay of the decode graph (the model's
    forward; the longest attention window of the run) and of choosing the tokens from its logits, against
    the whole step (bench_sampler's step_ms; the rest is the host's loop); then the kernels of a few steps."""
    from torch.profiler import ProfilerActivity, profile
    kw = dict(n=n, max_new_tokens=new, temperature=1.0, ignore_eos=True, max_rows=len(prompts) * n)
    M.generate(mdl, tok, prompts, **kw)
    dec = mdl._ra3_decoder
    graph, logits = dec.graphs[max(dec.graphs)]
    gen = torch.Generator(device=logits.device).manual_seed(0)

    def event_ms(fn, times=50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(times):
            fn()
        end.record()
        sync()
        return start.elapsed_time(end) / times

    with torch.inference_mode():  # as the sampler runs: the graph's logits are an inference tensor
        replay_ms = event_ms(graph.replay)
        pick_ms = event_ms(lambda: M.pick_tokens(logits, 1.0, 1.0, gen))
    step_ms = next((r["step_ms"] for r in results["sampler"] if r["rows"] == len(prompts) * n), None)
    results["profile"] = dict(rows=len(prompts) * n, replay_ms=replay_ms, pick_ms=pick_ms, step_ms=step_ms)
    print(f"profile, {len(prompts) * n} rows: decode-graph replay {replay_ms:.3f} ms, choosing the tokens "
          f"{pick_ms:.3f} ms" + (f", of a {step_ms:.3f} ms step" if step_ms else ""), flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        M.generate(mdl, tok, prompts, **dict(kw, max_new_tokens=16))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)


def hf_score(mdl, tok, docs, dev):
    for i in range(0, len(docs), 16):  # padded batches of 16 documents, full-vocab log-softmax
        batch = docs[i:i + 16]
        width = max(map(len, batch))
        x = torch.full((len(batch), width), tok.pad_token_id)
        m = torch.zeros_like(x)
        for j, d in enumerate(batch):
            x[j, :len(d)], m[j, :len(d)] = torch.tensor(d), 1
        x, m = x.to(dev), m.to(dev)
        lp = torch.log_softmax(mdl(input_ids=x, attention_mask=m).logits.float(), -1)
        lp[:, :-1].gather(2, x[:, 1:, None])


def bench_scorer(mdl, tok, results):
    docs = code_prompts(tok, args.score_docs, 512)
    dev = next(mdl.parameters()).device
    n_tok = sum(map(len, docs))
    results["scorer"] = []
    with torch.no_grad():
        if not args.skip_hf:
            hf_score(mdl, tok, docs[:16], dev)  # warm-up
            _, theirs = timed(lambda: hf_score(mdl, tok, docs, dev))
            print(f"scorer, {len(docs)} documents of 256-512 tokens: transformers padded batches "
                  f"{n_tok / theirs:9.0f} tok/s", flush=True)
        for row_len in map(int, args.score_rows.split(",")):
            p = D.pack(docs, row_len)
            ids, pos, doc = p.input_ids.to(dev), p.position_ids.to(dev), p.doc_ids.to(dev)
            M.packed_logprobs(mdl, ids[:1], pos[:1], doc[:1])  # warm-up
            _, ours = timed(lambda: M.packed_logprobs(mdl, ids, pos, doc))
            res = dict(docs=len(docs), tokens=n_tok, row_len=row_len, packed_rows=len(ids), ours_tok_s=n_tok / ours)
            line = f"scorer, packed rows of {row_len:4d}: ours {res['ours_tok_s']:9.0f} tok/s"
            if not args.skip_hf:
                res.update(hf_tok_s=n_tok / theirs, speedup=theirs / ours)
                line += f" | ratio {res['speedup']:.1f}x"
            results["scorer"].append(res)
            print(line, flush=True)


# one E-step run in a subprocess whose sys.path starts at `root` (this tree, or a baseline commit's files), so
# that `import stage` and the `model` it imports are that tree's; flags its parser lacks are dropped
STAGE_WORKER = """
import cProfile, importlib, io, json, pstats, statistics, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
stage = importlib.import_module({stage!r})
torch.set_num_threads({threads})
argv, known, kept = {argv!r}, {{a for x in stage.parser._actions for a in x.option_strings}}, []
for i, x in enumerate(argv):
    if x.startswith("--") and x not in known:
        continue
    if not x.startswith("--") and argv[i - 1] not in known:
        continue
    kept.append(x)
spent, annotate = [], getattr(stage, "annotate", None)
def timed_annotate(*a, **k):
    t = time.perf_counter()
    out = annotate(*a, **k)
    spent.append(time.perf_counter() - t)
    return out
stage.annotate = timed_annotate
with tempfile.TemporaryDirectory() as out:
    prof = cProfile.Profile() if {profile} else None
    args = stage.parser.parse_args(kept + ["--out", out])
    prof.runcall(stage.main, args) if prof else stage.main(args)
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]
rows = [r for r in rows if {{*{phases!r}}} <= r.keys()]
res = {{k: statistics.median(r[k] for r in rows) for k in {phases!r}}}
res.update(updates=len(rows), annotate_s=sum(spent), annotate_mode=getattr(args, "annotate", None), flags=kept)
if prof:
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
    print(text.getvalue(), file=sys.stderr)
print("RESULT " + json.dumps(res))
"""


# per stage: its flags for the benchmark, and the phases of one update (seconds logged in metrics.jsonl)
STAGES = dict(
    estep=(lambda: ["--batch-traces", str(args.estep_batch), "--group", "8", "--steps", str(args.updates),
                    "--eval-traces", "0", "--annotate-limit", str(args.estep_annotate)],
           ("rollout_s", "reward_s", "train_s")),
    rlvr=(lambda: ["--batch-prompts", "16", "--group", "8", "--steps", str(args.updates), "--eval-limit", "1",
                   "--eval-every", "1000", "--problems", "minicode-train",
                   "--eval-bench", "minicode-heldout"],
          ("sample_s", "score_s", "reward_wait_s", "train_s")),
)


def stage_run(stage, root, extra="", profile=False):
    """The stage's own loop (estep.py or rlvr.py) from the tree at `root`: the median of each phase of an
    update (and their sum, update_s) and the seconds spent annotating."""
    import shlex
    import subprocess
    import sys
    flags, phases = STAGES[stage]
    argv = (["--model", args.model] + flags() + shlex.split(args.stage_args) + shlex.split(extra) +
            (["--cpu-bf16"] if args.cpu_bf16 else []))
    code = STAGE_WORKER.format(root=str(root), stage=stage, argv=argv, phases=phases, profile=profile,
                               threads=torch.get_num_threads())
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{stage} run in {root} failed:\n{done.stderr[-3000:]}")
    if profile:
        print(done.stderr[done.stderr.find("   Ordered by"):], flush=True)
    res = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
    res["update_s"] = sum(res[k] for k in phases)
    return res


@contextlib.contextmanager
def checkout(commit):
    """The files of `commit` in a temporary directory (git archive: the repository is left as it is), or
    `commit` itself where it names a directory of them (for a copy of the tree without its git history)."""
    import subprocess
    import tempfile
    if Path(commit).is_dir():
        yield Path(commit).resolve()
        return
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as d:
        tar = subprocess.run(["git", "-C", str(here), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", d], input=tar, check=True)
        yield Path(d)


def describe(stage, name, r):
    phases = ", ".join(f"{k[:-2]} {r[k]:.2f}" for k in STAGES[stage][1])
    annotated = (f"; annotating {args.estep_annotate} traces ({r['annotate_mode']}): {r['annotate_s']:.1f} s"
                 if stage == "estep" else "")
    return f"{name}: update {r['update_s']:.2f} s ({phases}){annotated}"


def bench_stage(stage, results):
    """estep.py's or rlvr.py's loop itself (no copy of it here), each run in its own process: the phases'
    median seconds over the updates, from its metrics.jsonl (and for the E-step the seconds spent in
    estep.annotate). With --baseline-commit, that commit's script runs the same way, alternating with ours
    (--repeats times each, the best of each kept), and the ratios are printed: one machine, one run,
    one load."""
    here = Path(__file__).resolve().parent
    ours, base = [], []
    with (checkout(args.baseline_commit) if args.baseline_commit else contextlib.nullcontext()) as old:
        for k in range(args.repeats):
            if old is not None:
                base.append(stage_run(stage, old, args.baseline_args))
                print(describe(stage, f"baseline {args.baseline_commit}, run {k + 1}", base[-1]), flush=True)
            ours.append(stage_run(stage, here, profile=args.profile and k == 0))
            print(describe(stage, f"this tree, run {k + 1}", ours[-1]), flush=True)
    best = lambda runs, key: min(r[key] for r in runs)  # noqa: E731  (the least disturbed run)
    keys = ("update_s", *STAGES[stage][1]) + (("annotate_s",) if stage == "estep" else ())
    results[stage] = dict(runs=ours, annotate_mode=ours[0]["annotate_mode"], **{k: best(ours, k) for k in keys})
    print(describe(stage, f"{stage}, best of {args.repeats}", results[stage]), flush=True)
    if base:
        results["baseline"] = dict(commit=args.baseline_commit, runs=base, **{k: best(base, k) for k in keys})
        ratio = {k: best(base, k) / best(ours, k) for k in keys}
        results["speedup"] = ratio
        print(f"speed-up against {args.baseline_commit} (its time / ours, best of {args.repeats}): " +
              ", ".join(f"{k[:-2]} {v:.2f}x" for k, v in ratio.items()), flush=True)


def main():
    if args.estep or args.rlvr:
        results = dict(model=args.model, torch=torch.__version__)
        bench_stage("estep" if args.estep else "rlvr", results)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "bench.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results))
        return
    mdl, tok = M.load_model(args.model)
    dev = next(mdl.parameters()).device
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    results = dict(model=args.model, device=name, dtype=str(mdl.dtype), torch=torch.__version__,
                   params=sum(p.numel() for p in mdl.parameters()), sampler=[])
    print(f"{args.model} on {name}, {mdl.dtype}, {results['params'] / 1e6:.1f}M parameters", flush=True)
    if dev.type == "cuda":
        x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        y = torch.empty_like(x)
        y.copy_(x)
        _, t = timed(lambda: [y.copy_(x) for _ in range(10)])
        results["copy_gb_s"] = 2 * 10 * x.numel() / t / 1e9  # read + write
        print(f"device copy bandwidth: {results['copy_gb_s']:.0f} GB/s", flush=True)
        del x, y
    prompts = code_prompts(tok, args.prompts, args.prompt_tokens)
    for n in map(int, args.n.split(",")):
        bench_sampler(mdl, tok, prompts, n, args.max_new_tokens, results)
    if args.profile and dev.type == "cuda":
        profile_decode(mdl, tok, prompts, int(args.n.split(",")[0]), args.max_new_tokens, results)
    M.release_decoder(mdl)
    bench_scorer(mdl, tok, results)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
