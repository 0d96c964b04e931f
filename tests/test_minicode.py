"""minicode.py: the world's step table, seeded splits, corpora, and the true intent of every line."""
import ast
import re

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
    held = D.load_problems("minicode-heldout")
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
    echo = D.load_problems("minicode-echo-dev")
    assert len(echo) == 500 and echo[0].prompt == minicode.split_tasks("echo", "dev")[0].problem.prompt
    traces, latents = D.load_traces("minicode-anon-midtrain-oracle", n_tasks=5)
    assert len(traces) == 5 and all(any(z is not None for z in zs) for zs in latents)
    with pytest.raises(D.DataError, match="minicode-echo-heldout"):
        D.load_problems("minicode-echo-test")
