"""report.py: the table of a run.sh experiment, from the summaries its stages wrote.

    python report.py runs/pipeline          # writes runs/pipeline/results.md and its figures

Per seed and model (base, NTP, oracle, RA3): held-out pass@1 and pass@5, think rate of the samples, the
cross-entropy on held-out expert code, the ELBO per held-out mid-training trace with the model's own comments
(the CE alone penalises a model that comments) and the share of those comments naming the step that follows,
and the RLVR curve (start, end, steps until pass@1 reaches --target, by default the NTP start's final
pass@1 of the same seed); with several seeds, mean ± sd over seeds. Then the comparison: RA3 - NTP and
oracle - NTP (mean ± sd over seeds of the per-seed differences) and the share of the oracle's gain RA3
recovers, (RA3 - NTP) / (oracle - NTP). Then what each E-step learned (held-out ELBO and think rate at its
first and last measurement, the share of its comments that name the right step) and what it wrote into the
corpus. The oracle is the M-step on traces with the world's true plan comments: what any latents could buy
at this budget. The settings of the run (run.sh writes them to OUT/settings.txt) head the file.

On real code (run.sh on stdlib, a DIR, hf:NAME: its E-step read stripped:SPEC) the expert's own comments
are the true plan and there is no RLVR. Per seed and model: the cross-entropy on the held-out files' code
without its comments, the ELBO per held-out trace with the model's own comments (at c = 0: the code's
log-likelihood with them) and its think rate, the code's log-likelihood with no comments, with the expert's,
and with the model's own words where the expert commented; pass@1 if a benchmark ran. The E-step's table
adds q's words at the expert's places over its updates and where its comments fall.

The figures read the same files: pass1.png (held-out pass@1 per model, ± sd over seeds), estep.png (each
E-step's held-out ELBO and think rate over its updates, from its metrics.jsonl), curves.png (the RLVR
curves per start: reward, held-out pass@1, think rate) and pipeline.png, one row of the three. A figure
with nothing to draw (no benchmark ran, no RLVR) is not written.

    python report.py runs/worlds --worlds echo anon  # worlds.sh's tables, into runs/worlds/worlds.md

With --worlds, the tables of a worlds.sh output instead, per world and dev split: NTP's and the oracle's
pass@1 (mean ± sd over seeds) and oracle - NTP; the oracle's failures by where they first leave the true
plan (minicode.Task.first_departure); whether the oracle fails at writing its plan or at using it (the
share of its completions whose comments are all the true plan's, and pass@1 with and without that); in an
arith or chain world, how many of the operations in its comments' working are right; and in a chain world,
pass@1 by the number of operations in the task's chain (all seeds' samples pooled).
"""
import argparse
import collections
import json
import re
import statistics
from pathlib import Path

parser = argparse.ArgumentParser(description="The results table of a run.sh output folder.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("out", nargs="?", default="runs/pipeline", help="run.sh's --out folder (holding seed0/, ...)")
parser.add_argument("--target", type=float, default=None,
                    help="RLVR: steps until held-out pass@1 reaches this (default: the NTP start's final pass@1)")
parser.add_argument("--worlds", nargs="+", default=None, metavar="WORLD",
                    help="OUT is a worlds.sh output: report these worlds (OUT/WORLD/{dev,dev-long}-{ntp,oracle}SEED/)")
MODELS = ("base", "ntp", "oracle", "ra3")
NAN = float("nan")


def load(stage_dir):
    path = Path(stage_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def curve(stage_dir):
    path = Path(stage_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def rl_evals(seed_dir, name):
    return [(m["step"], m["eval_pass1"]) for m in curve(seed_dir / f"rl-{name}") if "eval_pass1" in m]


def model_row(seed_dir, name, target):
    ev, ce, rl = load(seed_dir / f"eval-{name}"), load(seed_dir / f"ce-{name}"), curve(seed_dir / f"rl-{name}")
    own = (load(seed_dir / f"elbo-{name}").get("heldout_curve") or [{}])[0]
    evals = rl_evals(seed_dir, name)
    if target is None:  # NTP's final pass@1: how many steps each start needs to get where NTP ends
        ntp = rl_evals(seed_dir, "ntp")
        target = ntp[-1][1] if ntp else NAN
    reach = next((s for s, p in evals if p >= target), None)
    think = [m["think_rate"] for m in rl if "think_rate" in m]
    return {"pass@1": ev.get("pass@1", NAN), "pass@5": ev.get("pass@5", NAN), "think rate": ev.get("think_rate", NAN),
            "CE on expert code": ce.get("eval_loss", NAN), "ELBO, own comments": own.get("heldout_elbo", NAN),
            "its comments naming the step": own.get("heldout_named_step", NAN),
            "RLVR pass@1 start": evals[0][1] if evals else NAN, "RLVR pass@1 end": evals[-1][1] if evals else NAN,
            "RLVR think rate end": think[-1] if think else NAN,
            "RLVR steps to target": NAN if not evals else (reach if reach is not None else f">{evals[-1][0]}")}


def real_row(seed_dir, name, pass1):
    """A real-code row: the held-out code's CE, and its log-likelihood per trace with the model's own comments,
    none, the expert's, and the model's words at the expert's places (estep.py --steps 0 --penalty 0)."""
    ce, own = load(seed_dir / f"ce-{name}"), (load(seed_dir / f"elbo-{name}").get("heldout_curve") or [{}])[0]
    row = {"CE on held-out code": ce.get("eval_loss", NAN), "ELBO, own comments": own.get("heldout_elbo", NAN),
           "think rate": own.get("heldout_think_rate", NAN), "code LL, no comments": own.get("heldout_code_ll_none", NAN),
           "code LL, expert's comments": own.get("heldout_code_ll_plan", NAN),
           "code LL, own words at the expert's places": own.get("heldout_code_ll_q_at_plan", NAN)}
    if pass1:
        row["pass@1"] = load(seed_dir / f"eval-{name}").get("pass@1", NAN)
    return row


def is_real_code(seeds):
    """run.sh's real-code path: its E-step read the code without its comments (stripped:SPEC)."""
    cmds = [d / "ra3/e1/stage.cmd" for d in seeds]
    return any(c.exists() and " --data stripped:" in c.read_text() for c in cmds)


def ran(seeds, pattern):
    """Did any seed run a stage whose folder matches pattern (eval-*, rl-*, ...)?"""
    return any(next(d.glob(pattern), None) is not None for d in seeds)


def fmt(v):
    if isinstance(v, str):
        return v
    return "-" if v is None or v != v else (f"{v}" if isinstance(v, int) else f"{v:.3f}")


def mean_sd(values):
    values = [v for v in values if v is not None and v == v]  # None: nothing to measure (no comments)
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else "-"


def models_table(seeds, row, stages=("eval",)):
    """A row per seed and model that ran any of these stages, then mean ± sd over seeds."""
    table = {(d.name, n): row(d, n) for d in seeds for n in MODELS if any((d / f"{s}-{n}").exists() for s in stages)}
    if not table:
        return []
    cols = list(next(iter(table.values())))
    lines = ["| seed | model | " + " | ".join(cols) + " |", "| --- " * (len(cols) + 2) + "|"]
    lines += [f"| {s} | {n} | " + " | ".join(fmt(r[c]) for c in cols) + " |" for (s, n), r in table.items()]
    if len(seeds) > 1:
        for n in MODELS:
            rows = [table[d.name, n] for d in seeds if (d.name, n) in table]
            if len(rows) < 2:  # a seed still running has no row yet
                continue
            cells = [f"reached in {sum(isinstance(r[c], int) for r in rows)}/{len(rows)}" if c.startswith("RLVR steps")
                     else mean_sd([r[c] for r in rows]) for c in cols]
            lines.append(f"| mean ± sd ({len(rows)}) | {n} | " + " | ".join(cells) + " |")
    return lines


def comparison(seeds):
    """RA3 - NTP and oracle - NTP in pass@1 (per seed, then mean ± sd), and the share of the oracle's gain
    that RA3 recovers (from the means; undefined where the oracle does not beat NTP)."""
    p1 = {(d.name, n): load(d / f"eval-{n}").get("pass@1") for d in seeds for n in ("ntp", "oracle", "ra3")}
    lines = []
    diffs = {}
    for n in ("ra3", "oracle"):
        diffs[n] = [p1[d.name, n] - p1[d.name, "ntp"] for d in seeds
                    if p1[d.name, n] is not None and p1[d.name, "ntp"] is not None]
        if diffs[n]:
            sd = f" ± {statistics.stdev(diffs[n]):.3f}" if len(diffs[n]) > 1 else ""
            lines.append(f"- {'RA3' if n == 'ra3' else 'oracle'} - NTP, pass@1: {statistics.mean(diffs[n]):+.3f}{sd} "
                         f"({len(diffs[n])} seed{'s' if len(diffs[n]) > 1 else ''}: "
                         + ", ".join(f"{x:+.3f}" for x in diffs[n]) + ")")
    if diffs.get("ra3") and diffs.get("oracle"):
        gain = statistics.mean(diffs["oracle"])
        lines.append("- share of the oracle's gain RA3 recovers: " + (
            f"{statistics.mean(diffs['ra3']) / gain:.2f}" if gain > 0 else
            "undefined: the oracle does not beat NTP here, so there is no gain for latents to recover"))
    return lines


# the E-step tables' columns: (title, key, where): "arrow" first -> last held-out measurement, "last" the last
# one (or one fixed for the run), "summary" what q wrote into the corpus
ESTEP_COLUMNS = [("held-out ELBO", "heldout_elbo", "arrow"), ("held-out think rate", "heldout_think_rate", "arrow"),
                 ("comments naming the step", "heldout_named_step", "last"),
                 ("think rate at chains", "heldout_think_at_chain", "arrow"),
                 ("right value at chains", "heldout_chain_right", "arrow"),
                 ("annotated think rate", "annotated_think_rate", "summary"),
                 ("annotated wrong-step share", "annotated_wrong_step", "summary")]
CHAIN_KEYS = ("heldout_think_at_chain", "heldout_chain_right")
REAL_ESTEP_COLUMNS = [("held-out ELBO", "heldout_elbo", "arrow"), ("held-out think rate", "heldout_think_rate", "arrow"),
                      ("code LL, q's words at the expert's places", "heldout_code_ll_q_at_plan", "arrow"),
                      ("code LL, no comments", "heldout_code_ll_none", "last"),
                      ("code LL, expert's comments", "heldout_code_ll_plan", "last"),
                      ("q's comments at the expert's places", "heldout_at_plan", "last"),
                      ("annotated think rate", "annotated_think_rate", "summary")]


def estep_table(seeds, columns=ESTEP_COLUMNS):
    """What each E-step learned on its held-out traces (first -> last measurement) and what it wrote; a column
    that no E-step measured (a chain world's, elsewhere) is left out."""
    esteps = [(d, e, load(e)) for d in seeds for e in sorted((d / "ra3").glob("e*/"), key=lambda p: int(p.name[1:]))]
    columns = [c for c in columns if c[1] not in CHAIN_KEYS
               or any(c[1] in (s.get("heldout_curve") or [{}])[-1] for *_, s in esteps)]
    lines = ["| seed | EM iteration | " + " | ".join(c[0] for c in columns) + " |", "| --- " * (len(columns) + 2) + "|"]
    for d, e, s in esteps:
        held = s.get("heldout_curve") or [{}]
        first, last = held[0], held[-1]
        cell = dict(arrow=lambda k: f"{fmt(first.get(k, NAN))} -> {fmt(last.get(k, NAN))}",
                    last=lambda k: fmt(last.get(k, NAN)), summary=lambda k: fmt(s.get(k, NAN)))
        lines.append(f"| {d.name} | {e.name[1:]} | " + " | ".join(cell[how](k) for _, k, how in columns) + " |")
    return lines if len(lines) > 2 else []


LABELS = dict(base="base", ntp="NTP", oracle="oracle", ra3="RA3")
COLORS = dict(base="C7", ntp="C0", oracle="C2", ra3="C3")  # one colour per model in every panel


def draw_pass1(ax, seeds):
    """Held-out pass@1 per model: the mean over seeds as a bar, each seed as a dot, ± sd as an error bar."""
    names = [n for n in MODELS if any((d / f"eval-{n}").exists() for d in seeds)]
    for i, n in enumerate(names):
        p1 = [v for v in (load(d / f"eval-{n}").get("pass@1") for d in seeds) if v is not None]
        if not p1:
            continue
        sd = statistics.stdev(p1) if len(p1) > 1 else 0.0
        ax.bar(i, statistics.mean(p1), yerr=sd if len(p1) > 1 else None, capsize=4, color=COLORS[n], alpha=0.6)
        ax.plot([i] * len(p1), p1, "k.", ms=5)
        ax.text(i, 0.04, f"{statistics.mean(p1):.2f}", ha="center", fontsize=9)  # inside the bar: clear of the error bar
    ax.set_xticks(range(len(names)), [LABELS[n] for n in names])
    ax.set_ylim(0, 1.05)
    spread = f"mean ± sd, {len(seeds)} seeds" if len(seeds) > 1 else "1 seed"
    ax.set_title(f"held-out pass@1 ({spread})", fontsize=10)


def draw_estep(ax, seeds, key, title):
    """One held-out instrument of every E-step over its updates, one line per EM iteration (and seed)."""
    for d in seeds:
        for e in sorted((d / "ra3").glob("e*/"), key=lambda p: int(p.name[1:])):
            held = [m for m in curve(e) if m.get(key) is not None]
            if not held:  # an empty line still counts as data: the panel would not say it is empty
                continue
            k = int(e.name[1:])
            ax.plot([m["step"] for m in held], [m[key] for m in held], color=f"C{(k + 3) % 10}", marker="o", ms=3,
                    label=f"EM iteration {k}" if d == seeds[0] else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("E-step update")


def draw_rlvr(ax, seeds, key, title, marker=None):
    """One RLVR curve per start (NTP, oracle, RA3), every seed in the start's colour."""
    for d in seeds:
        for name in MODELS[1:]:
            m = [x for x in curve(d / f"rl-{name}") if x.get(key) is not None]
            if not m:
                continue
            ax.plot([x["step"] for x in m], [x[key] for x in m], color=COLORS[name], marker=marker, ms=4,
                    label=f"from {LABELS[name]}" if d == seeds[0] else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("RLVR step")


def finish(fig, path, dpi):
    for ax in fig.axes:
        if ax.has_data():
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        else:  # say so rather than leave a blank frame that reads as a zero
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def plot(out, seeds):
    """The figures, from the same files as the tables: pipeline.png (the overview the README shows),
    pass1.png, estep.png and curves.png (RLVR)."""
    try:
        import matplotlib
    except ImportError:  # a requirement: a run without figures should not look like a finished report
        raise SystemExit(f"report.py: error: matplotlib is not installed (pip install -r requirements.txt); "
                         f"{out / 'results.md'} is written, the figures are not")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    # a stage that never ran (no benchmark, no RLVR on real code) leaves out its panels and figures
    has = dict(pass1=ran(seeds, "eval-*"), estep=ran(seeds, "ra3/e*"), rlvr=ran(seeds, "rl-*"))
    panels = [p for p in (("pass1", lambda ax: draw_pass1(ax, seeds)),
                          ("estep", lambda ax: draw_estep(ax, seeds, "heldout_elbo", "E-step: held-out ELBO per trace")),
                          ("estep", lambda ax: draw_estep(ax, seeds, "heldout_think_rate", "E-step: held-out think rate")),
                          ("rlvr", lambda ax: draw_rlvr(ax, seeds, "eval_pass1", "RLVR: held-out greedy pass@1",
                                                        marker="o"))) if has[p[0]]]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(15 * len(panels) / 4, 3.4), squeeze=False)
        for ax, (_, draw) in zip(axes[0], panels):
            draw(ax)
        paths.append(finish(fig, out / "pipeline.png", dpi=90))
    if has["pass1"]:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        draw_pass1(ax, seeds)
        paths.append(finish(fig, out / "pass1.png", dpi=120))
    if has["estep"]:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        draw_estep(axes[0], seeds, "heldout_elbo", "held-out ELBO per trace")
        draw_estep(axes[1], seeds, "heldout_think_rate", "held-out think rate")
        paths.append(finish(fig, out / "estep.png", dpi=120))
    if has["rlvr"]:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        draw_rlvr(axes[0], seeds, "reward", "RLVR reward")
        draw_rlvr(axes[1], seeds, "eval_pass1", "held-out greedy pass@1", marker="o")
        draw_rlvr(axes[2], seeds, "think_rate", "think rate of samples")
        paths.append(finish(fig, out / "curves.png", dpi=120))
    plt.close("all")
    print("figures: " + ", ".join(str(p) for p in paths))


# ---- worlds.sh ------------------------------------------------------------------------------------------

def world_samples(out, world, split, model):
    """(pass@1 per seed, every sample of every seed) of one model on one dev split of a worlds.sh output."""
    runs = sorted((Path(out) / world).glob(f"{split}-{model}[0-9]*/"), key=lambda d: int(re.findall(r"\d+$", d.name)[0]))
    return ([load(d)["pass@1"] for d in runs],
            [json.loads(x) for d in runs for x in (d / "samples.jsonl").read_text().splitlines() if x.strip()])


def share(flags):
    return f"{sum(flags) / len(flags):.3f}" if flags else "-"


def seeds_mean(values):
    return f"{values[0]:.3f} (1 seed)" if len(values) == 1 else mean_sd(values)


def worlds_report(out, worlds):
    import minicode  # only here: run.sh's report must not need the world
    splits = [(w, s) for w in worlds for s in ("dev", "dev-long")]
    runs = {(w, s, m): world_samples(out, w, s, m) for w, s in splits for m in ("ntp", "oracle")}
    tasks = {(w, s): {t.problem.task_id: t for t in minicode.split_tasks(w, s)} for w, s in splits}
    text = ["| world | dev split | NTP | oracle | oracle - NTP |", "| --- | --- | --- | --- | --- |"]
    for w, s in splits:
        ntp, oracle = runs[w, s, "ntp"][0], runs[w, s, "oracle"][0]
        gap = [o - t for o, t in zip(oracle, ntp)]
        text.append(f"| {w} | {s} | {seeds_mean(ntp)} | {seeds_mean(oracle)} | {seeds_mean(gap)} |")
    text += ["", "| world | dev split | oracle failures | by first departure from the true plan |",
             "| --- | --- | --- | --- |"]
    departures = {(w, s): [tasks[w, s][x["task_id"]].first_departure(x["completion"]) for x in runs[w, s, "oracle"][1]]
                  for w, s in splits}
    for w, s in splits:
        kinds = collections.Counter(k for k, x in zip(departures[w, s], runs[w, s, "oracle"][1]) if not x["passed"])
        text.append(f"| {w} | {s} | {sum(kinds.values())} | " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()) + " |")
    # writing the plan or using it: first_departure reads only the comments, so it judges passed samples too
    text += ["", "| world | dev split | oracle's plan right | pass@1, plan right | pass@1, plan wrong | NTP pass@1 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for w, s in splits:
        right = [k == "code after right comments" for k in departures[w, s]]
        passed = [x["passed"] for x in runs[w, s, "oracle"][1]]
        text.append(f"| {w} | {s} | {share(right)} | {share([p for p, r in zip(passed, right) if r])} | "
                    f"{share([p for p, r in zip(passed, right) if not r])} | "
                    f"{share([x['passed'] for x in runs[w, s, 'ntp'][1]])} |")
    arith = [(w, s) for w, s in splits if minicode.WORLDS[w].arith or minicode.WORLDS[w].chain]
    text += [""] if arith else []
    for w, s in arith:
        ops = [op for x in runs[w, s, "oracle"][1] for line in x["completion"].splitlines()
               if line.strip().startswith("#") for op in minicode.operations(line)]
        text.append(f"{w}, {s}: {sum(ok for *_, ok in ops)} of the {len(ops)} operations in the oracle's working are right")
    # a chain world's reason to exist: one forward pass composes k operations, a working does one at a time
    chain = [(w, s) for w, s in splits if minicode.WORLDS[w].chain]
    text += ["", "| world | dev split | operations in the chain | tasks | NTP pass@1 | oracle pass@1 |",
             "| --- | --- | --- | --- | --- | --- |"] if chain else []
    for w, s in chain:
        by_k = collections.defaultdict(lambda: {"ntp": [], "oracle": []})
        for m in ("ntp", "oracle"):
            for x in runs[w, s, m][1]:
                by_k[tasks[w, s][x["task_id"]].n_ops()][m].append(x["passed"])
        for k in sorted(by_k):
            n = len({x["task_id"] for x in runs[w, s, "ntp"][1] if tasks[w, s][x["task_id"]].n_ops() == k})
            text.append(f"| {w} | {s} | {k} | {n} | {share(by_k[k]['ntp'])} | {share(by_k[k]['oracle'])} |")
    return "\n".join(text) + "\n"


def main(args):
    out = Path(args.out)
    if args.worlds:
        text = worlds_report(out, args.worlds)
        (out / "worlds.md").write_text(text)
        print(text)
        return
    seeds = sorted(out.glob("seed*/"), key=lambda d: int(d.name[4:]))
    if not seeds:
        raise SystemExit(f"report.py: error: no seed*/ folders in {out}")
    settings = out / "settings.txt"
    text = (f"Settings: {settings.read_text().strip()}\n\n" if settings.exists() else "")
    real = is_real_code(seeds)
    if real:
        pass1 = ran(seeds, "eval-*")
        text += "\n".join(models_table(seeds, lambda d, n: real_row(d, n, pass1), ("eval", "ce", "elbo"))) + "\n"
        text += ("\nCE: nats per token of the held-out files' code without its comments. ELBO: nats per held-out "
                 "trace, with the model's own comments, at c = 0 (so also the code's log-likelihood with them); code "
                 "LL: the same with no comments, the expert's, the model's own words where the expert commented. "
                 "Think rate: the share of held-out lines the model comments before.\n")
    else:
        text += "\n".join(models_table(seeds, lambda d, n: model_row(d, n, args.target))) + "\n"
    compare = comparison(seeds)
    if compare:
        text += "\nHeld-out pass@1 against NTP:\n\n" + "\n".join(compare) + "\n"
    estep = estep_table(seeds, REAL_ESTEP_COLUMNS if real else ESTEP_COLUMNS)
    if estep:
        text += "\nE-steps (held-out instruments, first -> last measurement; what q wrote into the corpus):\n\n"
        text += "\n".join(estep) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    plot(out, seeds)


if __name__ == "__main__":
    main(parser.parse_args())
