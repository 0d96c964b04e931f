"""minicode.py: the world's step table, seeded splits, corpora, and the true intent of every line."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import data as D
import minicode


def test_minicode_world_has_enough_kinds_and_types():
    assert len(minicode.STEPS) >= 25 and len({s.kind for s in minicode.STEPS}) == len(minicode.STEPS)
    assert {s.src for s in minicode.STEPS} >= {"ints", "int", "text", "counts", "words"}
    for s in minicode.STEPS:  # every kind can follow something or start a chain, and can be followed
        assert any(o.src == s.dst for o in minicode.STEPS)


def test_minicode_references_pass_their_own_tests():
    tasks = minicode.tasks(3000, seed=11) + minicode.tasks(1000, seed=12, held_out=True)
    for t in tasks:
        p = t.problem
        ns = {}
        exec(p.prompt + p.canonical_solution + p.test, ns)
        ns["check"](ns[p.entry_point])
        assert p.test.count("assert candidate(") >= 3
        assert D.render(t.trace) == p.prompt + p.canonical_solution
        assert 2 <= len(t.kinds) <= 5


def test_minicode_is_seeded_varied_and_held_out_is_disjoint():
    a = minicode.tasks(300, seed=3)
    b = minicode.tasks(300, seed=3)
    assert [t.problem.prompt + t.problem.canonical_solution for t in a] == \
           [t.problem.prompt + t.problem.canonical_solution for t in b]
    train = minicode.tasks(3000, seed=1)
    held = minicode.tasks(500, seed=3, held_out=True)
    train_keys, held_keys = {t.kinds for t in train}, {t.kinds for t in held}
    assert not train_keys & held_keys and len(held_keys) > 100
    # variety: docstring openings, styles (loops and one-liners), and multi-line bodies
    assert len({t.problem.prompt.split("\n")[1].split()[0] for t in train}) >= 8
    bodies = [t.problem.canonical_solution for t in train]
    assert sum("for " in b for b in bodies) > 600 and sum("for " not in b for b in bodies) > 300
    assert sum(len(t.trace.actions) >= 6 for t in train) > 600


def test_minicode_corpora_comment_some_steps_and_only_in_pretraining():
    pre = minicode.corpus("pretrain", 400)
    mid = minicode.corpus("midtrain", 400)
    commented = sum(bool(re.search(r"^\s+# ", text, re.M)) for text in pre)
    assert 0.5 * len(pre) < commented < len(pre)
    assert all(not re.search(r"^\s+#", D.render(t), re.M) for t in mid)
    for text in pre[:200]:
        ast.parse(text)


def test_minicode_splits_by_name():
    held = minicode.load_problems("minicode-heldout")
    assert len(held) == 500 and held[0].task_id.startswith("minicode/heldout/")
    assert len({p.task_id for p in held}) == 500


def test_every_line_knows_its_step_and_the_true_plan_names_it():
    for t in minicode.tasks(300, seed=6) + minicode.pretrain_tasks(300):
        assert len(t.step_of) == len(t.trace.actions) and t.step_of[-1] is None  # the return line
        assert [i for i in t.step_of[:-1]] == sorted(t.step_of[:-1]) and set(t.step_of[:-1]) == set(range(len(t.kinds)))
        starts = t.step_starts()
        assert sum(starts) == len(t.kinds)
        plan = t.true_plan()
        for z, start, i in zip(plan, starts, t.step_of):
            assert (z is not None) == start
            if start:
                assert (t.kinds[i], tuple(sorted(t.params[i].items()))) in minicode.names_of(z)
        for z, i in zip(t.plan_comments, t.step_of):  # the pretraining comments name their step too
            if z is not None:
                assert t.kinds[i] in {kind for kind, _ in minicode.names_of(z)}
        ast.parse(D.render(t.trace, plan))


def test_names_of_reads_comments_as_written():
    assert minicode.names_of("#   Keep values ABOVE 3 ") == {("keep_greater", (("k", 3),))}
    assert minicode.names_of("# keep the even numbers") == {("keep_even", ())}
    assert minicode.names_of("# walk the list") == set()


PLAIN_FINGERPRINT = "f00a516fd0e4cf93"  # computed with the generator of commit f58f853, before worlds existed


def test_the_plain_world_is_the_first_world_task_for_task():
    """plain keeps the tasks every earlier figure was measured on (a fingerprint of the old generator's
    output): a change to the generator that moves plain's stream fails here."""
    import hashlib
    texts = [D.render(t.trace, t.plan_comments) + t.problem.test for t in minicode.pretrain_tasks(40, world="plain")]
    texts += [t.problem.prompt + t.problem.test for t in minicode.split_tasks("plain", "heldout")[:40]]
    assert hashlib.sha256("".join(texts).encode()).hexdigest()[:16] == PLAIN_FINGERPRINT


WORLD_FINGERPRINTS = {"echo": "5c00d14751be0c81", "anon": "61186979f13eb131", "echo+anon": "248f5334e71975f6"}  # f8896df


def test_the_worlds_before_skills_keep_their_tasks():
    """echo, anon and echo+anon keep the tasks of the worlds experiment (LOG 2026-12-01), as plain does above."""
    import hashlib
    for world, fingerprint in WORLD_FINGERPRINTS.items():
        texts = [D.render(t.trace, t.plan_comments) + t.problem.test for t in minicode.pretrain_tasks(40, world=world)]
        texts += [t.problem.prompt + t.problem.test for t in minicode.split_tasks(world, "heldout")[:40]]
        assert hashlib.sha256("".join(texts).encode()).hexdigest()[:16] == fingerprint, world


def test_worlds_differ_only_in_what_their_text_gives_away():
    plain, echo, anon = (minicode.pretrain_tasks(300, world=w) for w in ("plain", "echo", "anon"))
    for p, e in zip(plain, echo):  # echo: the same tasks and code; comments in the docstring's words
        assert (p.kinds, p.params, p.trace.actions, p.problem.test) == (e.kinds, e.params, e.trace.actions, e.problem.test)
        for z in e.true_plan() + e.plan_comments:
            if z is not None:
                assert " ".join(z.lstrip("# ").split()).lower() in " ".join(e.problem.prompt.split()).lower()
    step_names = {n for s in minicode.STEPS for n in s.names} - {"acc", "rest"}  # also helpers inside templates
    for t in anon:  # anon: neither the function nor a variable names a step
        assert t.problem.entry_point in minicode.NEUTRAL_FUNCTIONS
        assigned = {line.split("=")[0].strip() for line in t.trace.actions if re.match(r"\s+\w+ = ", line)}
        assert not assigned & step_names
        for z, start, i in zip(t.true_plan(), t.step_starts(), t.step_of):
            assert (z is not None) == start
            if start:
                assert (t.kinds[i], tuple(sorted(t.params[i].items()))) in minicode.names_of(z)


def test_dev_compositions_are_never_test_compositions_in_any_world():
    for world in minicode.WORLDS:
        test = {t.kinds for t in minicode.split_tasks(world, "heldout")}
        for split in ("dev", "dev-long"):
            dev = minicode.split_tasks(world, split)
            assert not {t.kinds for t in dev} & test and all(minicode.is_held_out(t.kinds) for t in dev)
    assert {len(t.kinds) for t in minicode.split_tasks("plain", "dev-long")} == {8}


def test_minicode_names_parse_into_world_and_split():
    assert minicode.parse("minicode-heldout") == (minicode.DEFAULT_WORLD, "heldout")
    assert minicode.parse("minicode-echo+anon-midtrain-oracle") == ("echo+anon", "midtrain-oracle")
    assert minicode.parse("minicode-anon-dev-long") == ("anon", "dev-long")
    assert minicode.parse("minicode-nope") is None and minicode.parse("mbpp") is None
    echo = minicode.load_problems("minicode-echo-dev")
    assert len(echo) == 500 and echo[0].prompt == minicode.split_tasks("echo", "dev")[0].problem.prompt
    traces, latents = minicode.load_traces("minicode-anon-midtrain-oracle", n_tasks=5)
    assert len(traces) == 5 and all(any(z is not None for z in zs) for zs in latents)
    with pytest.raises(D.DataError, match="minicode-echo-heldout"):
        minicode.load_problems("minicode-echo-test")



def test_names_resolve_here_and_data_knows_nothing_of_minicode():
    """The dependency runs one way, minicode -> data: data.py neither imports minicode nor loads it when
    imported. The stages resolve names here, minicode's first, then by data.py's loaders; an unknown name is
    refused with every kind listed, as before the split."""
    root = Path(__file__).resolve().parent.parent
    assert not re.search(r"^\s*(import|from) minicode\b", (root / "data.py").read_text(), re.M)
    probe = "import sys, data; assert 'minicode' not in sys.modules, 'data imported minicode'"
    p = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    with pytest.raises(D.DataError, match=r"^unknown corpus 'nope': a traces .jsonl, minicode-pretrain, minicode-midtrain, "
                       r".*minicode-chain-midtrain-oracle, a minicode split, stdlib, a directory of .py files, or hf:NAME "
                       r"\(each also as stripped:SPEC or oracle:SPEC\)$"):
        minicode.load_traces("nope")
    with pytest.raises(D.DataError, match=r"^unknown benchmark 'minicode-bogus': humaneval, humaneval\+, "
                       r"mbpp\[-train\|-validation\|-test\], mbpp\+, minicode-train, .*minicode-chain-dev-long, "
                       r"or a path to a problems .jsonl$"):
        minicode.load_problems("minicode-bogus")
    with pytest.raises(D.DataError, match=r"^unknown corpus 'nope': a traces .jsonl, stdlib, a directory"):
        D.load_traces("nope")  # data.py alone names its own kinds
    assert minicode.load_problems("humaneval") == D.load_problems("humaneval")  # the rest: data.py's loaders


# ---- the skills world ---------------------------------------------------------------------------------------

def test_the_skill_table_is_consistent():
    skills, steps = minicode.SKILLS, minicode.STEPS
    kinds = [k.kind for k in skills]
    assert 16 <= len(skills) and len(set(kinds)) == len(kinds) and not set(kinds) & {s.kind for s in steps}
    words = set(minicode.NEUTRAL_NAMES) | set(minicode.NEUTRAL_FUNCTIONS)  # what a skill's name must not echo
    for s in steps:
        words |= {s.kind, *s.names} | {w for phrase in s.doc + s.plan for w in re.findall(r"[a-z]+", phrase.lower())}
    assert not set(kinds) & words
    for k in skills:
        assert 2 <= len(k.steps) <= 3
        assert all(a.dst == b.src for (a, _), (b, _) in zip(k.steps, k.steps[1:]))  # the types chain
        for step, params in k.steps:  # fixed parameters, each one the step's own choice
            assert set(params) == {name for name, _ in step.params}
            assert all(params[name] in choices for name, choices in step.params)
        assert any(o.src == k.dst for o in skills)  # something can follow it
    expansions = [tuple((s.kind, tuple(p.items())) for s, p in k.steps) for k in skills]
    assert len(set(expansions)) == len(skills)
    shared = [s for s in {s for e in expansions for s in e} if sum(s in e for e in expansions) > 1]
    assert len(shared) >= 3  # skills share steps, so a line alone does not say which skill it is in
    assert {k.src for k in skills} >= {"ints", "int", "text", "words"} and {k.dst for k in skills} >= {"ints", "int"}


def _blocks_are_their_steps_code(task):
    """Is each skill block's code exactly its steps' code, one after another (each in one of its styles, with
    some output and loop variable), each step reading the previous one's output?"""
    var = task.problem.prompt.split("(")[1].split(")")[0]
    for i, kind in enumerate(task.kinds):
        text, pos = "".join(a for a, j in zip(task.trace.actions, task.step_of) if j == i), 0
        for step, params in minicode.SKILL_BY_KIND[kind].steps:
            for template in step.styles.values():
                code = "".join(f"    {line}\n" for line in template.split("|"))
                pattern = re.escape(code.format(i=var, o="OUTVAR", v="LOOPVAR", **params))
                for name, group in (("OUTVAR", "o"), ("LOOPVAR", "v")):
                    pattern = pattern.replace(name, rf"(?P<{group}>\w+)", 1).replace(name, f"(?P={group})")
                m = re.compile(pattern).match(text, pos)
                if m:
                    pos, var = m.end(), m.group("o")
                    break
            else:
                return False
        if pos != len(text):
            return False
    return task.trace.actions[-1] == f"    return {var}\n"


def test_a_skills_task_is_its_skills_steps_and_the_true_plan_spells_them_out():
    tasks = minicode.midtrain_tasks(200, world="skills") + minicode.split_tasks("skills", "dev-long")[:50]
    for t in tasks:
        p = t.problem
        ns = {}
        exec(p.prompt + p.canonical_solution + p.test, ns)
        ns["check"](ns[p.entry_point])
        assert all(k in minicode.SKILL_BY_KIND for k in t.kinds) and t.params == [{}] * len(t.kinds)
        assert all(k not in p.canonical_solution for k in t.kinds)  # the code never names a skill
        assert _blocks_are_their_steps_code(t), D.render(t.trace)
        plan, starts = t.true_plan(), t.step_starts()
        assert sum(starts) == len(t.kinds) == sum(z is not None for z in plan)
        for z, start, i in zip(plan, starts, t.step_of):
            if start:
                skill = minicode.SKILL_BY_KIND[t.kinds[i]]
                assert z == f"# {skill.kind}: " + ", ".join(s.plan[0].format(**q) for s, q in skill.steps)
                assert minicode.names_of(z) == {(skill.kind, ())}
        ast.parse(D.render(t.trace, plan))
    assert {len(t.kinds) for t in tasks} == {2, 3, 4, 5}


def test_names_of_reads_skills():
    for comment in ("# tidy: positives only, dedupe, sort ascending", "# Tidy: remove non-positive numbers, "
                    "remove duplicates in order, order them", "# tidy", "# apply tidy", "tidy it"):
        assert minicode.names_of(comment) == {("tidy", ())}, comment
    assert minicode.names_of("# tidy: sort ascending") == set()  # half an expansion names nothing


def test_skills_pretraining_teaches_steps_and_skills():
    pre = minicode.pretrain_tasks(600, world="skills")
    steps, skills = pre[0::2], pre[1::2]
    anon = minicode.pretrain_tasks(300, world="anon")  # the step tasks are anon's, task for task
    assert [D.render(t.trace, t.plan_comments) for t in steps] == [D.render(t.trace, t.plan_comments) for t in anon]
    assert all(k in minicode.SKILL_BY_KIND for t in skills for k in t.kinds)
    assert {len(t.kinds) for t in skills} == {1, 2, 3}
    commented = [z is not None for t in skills for z, start in zip(t.plan_comments, t.step_starts()) if start]
    assert 0.4 < sum(commented) / len(commented) < 0.6
    for t in skills:  # a pretraining comment spells out its skill's expansion in varied words
        for z, i in zip(t.plan_comments, t.step_of):
            if z is not None:
                assert minicode.names_of(z) == {(t.kinds[i], ())}
    assert len({z for t in skills for z in t.plan_comments if z} - {z for t in skills for z in t.plan}) > 50
    texts = minicode.corpus("pretrain", 100, world="skills")
    assert texts == [D.render(t.trace, t.plan_comments) for t in pre[:100]]
    for text in texts:
        ast.parse(text)


def test_skills_held_out_compositions_never_train():
    pre = [t for t in minicode.pretrain_tasks(2000, world="skills") if t.kinds[0] in minicode.SKILL_BY_KIND]
    train = pre + minicode.midtrain_tasks(1000, world="skills") + minicode.split_tasks("skills", "train")[:1000]
    assert all(minicode.side_of(t.kinds) == "train" for t in train)
    for tasks in (pre, minicode.midtrain_tasks(1000, world="skills")):  # every skill is taught and traced
        assert {k for t in tasks for k in t.kinds} == set(minicode.SKILL_BY_KIND)
    sides = {split: {t.kinds for t in minicode.split_tasks("skills", split)} for split in ("heldout", "dev")}
    assert not (sides["heldout"] | sides["dev"]) & {t.kinds for t in train}
    assert not sides["heldout"] & sides["dev"] and len(sides["dev"]) > 80 and len(sides["heldout"]) > 150
    assert {len(k) for k in sides["heldout"] | sides["dev"]} == {4}


def test_skills_world_by_name():
    assert minicode.parse("minicode-skills-midtrain") == ("skills", "midtrain")
    assert "minicode-skills-dev-long" in minicode.names() and "minicode-skills-pretrain" in minicode.names("corpus")
    dev = minicode.load_problems("minicode-skills-dev")
    assert len(dev) == 500 and dev[0].prompt == minicode.split_tasks("skills", "dev")[0].problem.prompt
    traces, latents = minicode.load_traces("minicode-skills-midtrain-oracle", n_tasks=5)
    tasks = minicode.midtrain_tasks(5, world="skills")
    assert [sum(z is not None for z in zs) for zs in latents] == [len(t.kinds) for t in tasks]


def _completion(task, latents):
    return "".join((f"    {z}\n" if z else "") + a for z, a in zip(latents, task.trace.actions))


def test_first_departure_says_where_a_completion_left_the_plan():
    task = next(t for t in minicode.tasks(200, seed=9, held_out=True, lengths=(5,))
                if any(t.params[1:4]) and len({k for k, _ in map(min, map(minicode.names_of, t.plan))}) == 5)
    plan = task.true_plan()
    starts = [t for t, z in enumerate(plan) if z]
    assert task.first_departure(_completion(task, plan)) == "code after right comments"
    assert task.first_departure(_completion(task, [None] * len(plan))) == "no comments"
    drop = lambda i: [z if t != starts[i] else None for t, z in enumerate(plan)]  # noqa: E731
    assert task.first_departure(_completion(task, drop(1))) == "skipped a step"
    assert task.first_departure(_completion(task, drop(4))) == "stopped early"
    assert task.first_departure(_completion(task, plan) + "    # sort ascending\n") == "extra comment"
    i = next(i for i in range(1, 4) if task.params[i])
    step = minicode.STEP_BY_KIND[task.kinds[i]]
    other = next(p for p in minicode._param_choices(step) if p != task.params[i])
    wrong = [minicode.plan_comment(step, other) if t == starts[i] else z for t, z in enumerate(plan)]
    assert task.first_departure(_completion(task, wrong)) == "wrong parameter"
    kind = next(s.kind for s in minicode.STEPS if s.kind not in task.kinds[:3] and not s.params)
    another = [minicode.plan_comment(minicode.STEP_BY_KIND[kind], {}) if t == starts[0] else z for t, z in enumerate(plan)]
    assert task.first_departure(_completion(task, another)) == "another step"
    assert task.first_departure("    # tidy up a bit\n" + _completion(task, plan)) == "unnamed comment"
    skills = minicode.split_tasks("skills", "dev")[0]  # a skill's expansion comment names the skill
    assert skills.first_departure(_completion(skills, skills.true_plan())) == "code after right comments"


# ---- the arith world ----------------------------------------------------------------------------------------

def _int_params(task, i):
    return {name for name, v in task.params[i].items() if isinstance(v, int)}


def test_arith_expressions_reach_their_values_in_range():
    tasks = minicode.midtrain_tasks(300, world="arith") + minicode.pretrain_tasks(200, world="arith")
    doc = lambda t: " ".join(t.problem.prompt.split())  # noqa: E731
    n_terms = []
    for t in tasks:
        for i, exprs in enumerate(t.exprs):
            assert set(exprs) == _int_params(t, i)  # every integer parameter, and only those
            for name, text in exprs.items():
                assert eval(text) == t.params[i][name]
                terms = [int(text.split()[0])] + [int(o + n) for o, n in zip(text.split()[1::2], text.split()[2::2])]
                assert all(1 <= abs(x) <= 9 for x in terms) and terms[0] > 0
                assert all(0 <= sum(terms[:j]) <= 30 for j in range(1, len(terms) + 1))
                n_terms.append(len(terms))
                assert text in doc(t)  # the docstring writes the sum, the code the value
    assert set(n_terms) == {2, 3} and 0.35 < n_terms.count(2) / len(n_terms) < 0.65
    values = {v for s in minicode.STEPS for _, choices in s.params for v in choices if isinstance(v, int)}
    assert 0 in values and all(minicode._sums(v, 2) and minicode._sums(v, 3) for v in values)  # 0 is a - a


def test_arith_true_plan_works_the_sum_out_and_names_the_step():
    for t in minicode.midtrain_tasks(200, world="arith") + minicode.split_tasks("arith", "dev")[:50]:
        plan = t.true_plan()
        for z, start, i in zip(plan, t.step_starts(), t.step_of):
            if not start:
                continue
            step, params = minicode.STEP_BY_KIND[t.kinds[i]], t.params[i]
            words = step.plan[0].format(**params)
            if not t.exprs[i]:
                assert z == f"# {words}"
            else:
                head, tail = z[2:].split(": ")
                assert tail == words
                for name, chain in zip(t.exprs[i], head.split("; ")):  # one chain of equations per parameter
                    equations = [re.fullmatch(r"(\d+) ([+-]) (\d+) = (\d+)", e).groups() for e in chain.split(", ")]
                    for a, op, b, c in equations:
                        assert eval(f"{a} {op} {b}") == int(c)  # each step of the working is right
                    for (_, _, _, c), (a, _, _, _) in zip(equations, equations[1:]):
                        assert c == a  # and carries on from the previous result
                    assert int(equations[-1][3]) == params[name]  # the working ends at the code's value
            assert (t.kinds[i], tuple(sorted(params.items()))) in minicode.names_of(z)  # some words omit k
        ast.parse(D.render(t.trace, plan))
        assert t.first_departure(_completion(t, plan)) == "code after right comments"


def test_names_of_reads_arith_comments():
    assert minicode.names_of("# 7 + 5 = 12, 12 - 2 = 10: shift by 10") == {("add_each", (("k", 10),))}
    assert minicode.names_of("# 4 + 6 = 10: shift by 10") == {("add_each", (("k", 10),))}
    assert minicode.names_of("#  8 - 2 = 6, 6 + 4 = 10:  Add 10 to each") == {("add_each", (("k", 10),))}
    assert minicode.names_of("# 3 - 3 = 0; 2 + 7 = 9: clip to [0, 9]") == {("clamp", (("hi", 9), ("lo", 0)))}
    assert minicode.names_of("# 4 + 6 = 10:") == set() and minicode.names_of("# 4 + 6: shift by 10") == set()


def test_arith_is_anon_task_for_task_but_its_words():
    for a, n in zip(minicode.pretrain_tasks(200, world="arith"), minicode.pretrain_tasks(200, world="anon")):
        assert (a.kinds, a.params, a.trace.actions, a.problem.test) == (n.kinds, n.params, n.trace.actions, n.problem.test)
        for za, zn in zip(a.plan_comments, n.plan_comments):  # the same comments, after their working
            assert (za is None) == (zn is None) and (za is None or za.endswith(zn[2:]))
    mid = minicode.midtrain_tasks(400, world="arith")
    steps = [e for t in mid for e in t.exprs]
    assert 0.2 < sum(bool(e) for e in steps) / len(steps) < 0.6  # a fair share of steps carry a sum


def test_arith_world_by_name():
    assert minicode.parse("minicode-arith-midtrain") == ("arith", "midtrain")
    assert "minicode-arith-dev-long" in minicode.names() and "minicode-arith-midtrain-oracle" in minicode.names("corpus")
    dev = minicode.split_tasks("arith", "dev")
    assert len(dev) == 500 and dev[0].problem.prompt == minicode.load_problems("minicode-arith-dev")[0].prompt
    for t in dev[:200] + minicode.midtrain_tasks(200, world="arith"):  # the references pass their own tests
        ns = {}
        exec(t.problem.prompt + t.problem.canonical_solution + t.problem.test, ns)
        ns["check"](ns[t.problem.entry_point])
    traces, latents = minicode.load_traces("minicode-arith-midtrain-oracle", n_tasks=5)
    assert latents == [t.true_plan() for t in minicode.midtrain_tasks(5, world="arith")]


# ---- the chain world (the positive control) ----------------------------------------------------------------

def _chain(task):
    """(step index, parameter, its text) of a chain task's one chain."""
    (i, name, text), = [(i, name, text) for i, e in enumerate(task.exprs) for name, text in e.items()]
    return i, name, text


def test_chain_expressions_reach_their_values_left_to_right_in_range():
    assert minicode.evaluate("2 + 3 * 4") == 20 and minicode.evaluate("9 - 4 - 3") == 2  # not Python's order
    for split in ("dev", "dev-long", "heldout"):
        steps, ops = minicode.CHAIN_LENGTHS[split]
        tasks = minicode.split_tasks("chain", split)[:150]
        n_ops = []
        for t in tasks:
            i, name, text = _chain(t)
            assert t.kinds[i] in minicode.CHAIN_STEPS and t.params[i][name] in minicode.CHAIN_VALUES
            assert minicode.evaluate(text) == t.params[i][name]
            start, pairs = int(text.split()[0]), list(zip(text.split()[1::2], map(int, text.split()[2::2])))
            assert 1 <= start <= 20 and len(set(pairs)) == len(pairs)  # no operation twice: each is found by the last
            assert all((op == "*" and b in (2, 3)) or (op in "+-" and 1 <= b <= 9) for op, b in pairs)
            partials = [minicode.evaluate(" ".join(text.split()[:j])) for j in range(1, len(text.split()) + 1, 2)]
            assert all(0 <= p <= minicode.CHAIN_MAX for p in partials)
            assert any(text in line for line in t.problem.prompt.splitlines())  # on one docstring line
            assert minicode.CHAIN_NOTE in " ".join(t.problem.prompt.split())
            assert len(t.kinds) in steps
            n_ops.append(len(pairs))
        assert set(n_ops) == set(ops)


def test_chain_true_plan_works_one_operation_at_a_time():
    for t in minicode.midtrain_tasks(200, world="chain") + minicode.split_tasks("chain", "dev")[:50]:
        i, name, text = _chain(t)
        plan = t.true_plan()
        z = next(z for z, start, j in zip(plan, t.step_starts(), t.step_of) if start and j == i)
        head, tail = z[2:].split(": ")
        equations = [re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)", e).groups() for e in head.split(", ")]
        assert len(equations) == len(text.split()) // 2 and all(ok for *_, ok in minicode.operations(z))
        assert [f"{op} {b}" for _, op, b, _ in equations] == [" ".join(p) for p in zip(text.split()[1::2], text.split()[2::2])]
        for (_, _, _, c), (a, _, _, _) in zip(equations, equations[1:]):
            assert c == a  # each operation starts from the last result
        assert int(equations[-1][3]) == t.params[i][name] and str(t.params[i][name]) in "".join(t.trace.actions)
        assert (t.kinds[i], ((name, t.params[i][name]),)) in minicode.names_of(z)
        for z, start, j in zip(plan, t.step_starts(), t.step_of):  # every other step: a plain plan comment
            assert (z is not None) == start and (not start or (t.kinds[j], tuple(sorted(t.params[j].items()))) in minicode.names_of(z))
        ast.parse(D.render(t.trace, plan))
        assert t.first_departure(_completion(t, plan)) == "code after right comments"
    assert minicode.operations("# 4 * 3 = 12, 12 - 5 = 8: mod 8") == [(4, 3, 12, True), (12, 5, 8, False)]


CHAIN_FINGERPRINT = "e8f14c32fbb69736"  # the tasks models/minicode-chain-base was pretrained on (2026-12-06)


def test_the_chain_world_keeps_the_tasks_its_shipped_base_learned():
    import hashlib
    texts = [D.render(t.trace, t.plan_comments) + t.problem.test for t in minicode.pretrain_tasks(40, world="chain")]
    texts += [t.problem.prompt + t.problem.test for t in minicode.split_tasks("chain", "heldout")[:40]]
    assert hashlib.sha256("".join(texts).encode()).hexdigest()[:16] == CHAIN_FINGERPRINT


def test_chain_world_by_name_and_its_pretraining_works_some_chains_out():
    assert minicode.parse("minicode-chain-dev-long") == ("chain", "dev-long")
    dev = minicode.split_tasks("chain", "dev")
    assert len(dev) == 500 and dev[0].problem.prompt == minicode.load_problems("minicode-chain-dev")[0].prompt
    for t in dev[:150] + minicode.split_tasks("chain", "dev-long")[:50] + minicode.midtrain_tasks(150, world="chain"):
        ns = {}
        exec(t.problem.prompt + t.problem.canonical_solution + t.problem.test, ns)
        ns["check"](ns[t.problem.entry_point])
    traces, latents = minicode.load_traces("minicode-chain-midtrain-oracle", n_tasks=5)
    assert latents == [t.true_plan() for t in minicode.midtrain_tasks(5, world="chain")]
    pre = minicode.pretrain_tasks(300, world="chain")
    worked = [z for t in pre for z in t.plan_comments if z and minicode.operations(z)]
    assert 0.3 < len(worked) / len(pre) < 0.7 and all(ok for z in worked for *_, ok in minicode.operations(z))
