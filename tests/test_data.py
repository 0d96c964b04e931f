"""data.py: traces and latents on real code, packing, benchmark loaders, bad input."""
import ast
import functools
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

import data as D
import minicode
from helpers import tiny

BENCH = Path(os.environ.get("RA3_DATA", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
needs_bench = pytest.mark.skipif(not (BENCH / "mbpp.jsonl").is_file(),
                                 reason=f"benchmark files not found in {BENCH} (set RA3_DATA to the folder holding them)")


@pytest.fixture(scope="module")
def stdlib_traces():
    traces, n_files, skipped = D.traces_from_dir(max_files=150)
    assert len(traces) > 1000 and n_files == 150
    return traces


@functools.lru_cache(maxsize=None)
def parsed(path):
    src = path.read_text(encoding="utf-8")
    return src, ast.parse(src)


def function_source(path, lineno, name):
    """The dedented source of one function, found independently of split_function."""
    src, tree = parsed(path)
    node = next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                and n.lineno == lineno and n.name == name)
    lines = src.splitlines(keepends=True)[min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1:node.end_lineno]
    pad = re.match(r"[ \t]*", lines[0]).group()
    return "".join(line[len(pad):] if line.startswith(pad) else line for line in lines)


# ---- traces and latents on real code ----------------------------------------------------------------------

def test_traces_are_the_source_byte_for_byte(stdlib_traces):
    root = D.stdlib_dir()
    for t in random.Random(0).sample(stdlib_traces, 400):
        path, lineno, name = t.id.rsplit(":", 2)
        assert D.render(t) == function_source(root / path, int(lineno), name)
        assert all(D.action_parts(a)[1] for a in t.actions)  # every action holds code


def test_latents_keep_the_program_and_strip_back_exactly(stdlib_traces):
    rng = random.Random(1)
    words = "compute check the value loop over items then return result handle edge case".split()
    for t in rng.sample(stdlib_traces, 1500):
        latents = [" ".join(rng.sample(words, rng.randint(1, 6))) if rng.random() < 0.4 else None
                   for _ in t.actions]
        text = D.render(t, latents)
        original = D.render(t)
        # comments change nothing that Python sees
        assert ast.dump(ast.parse(text)) == ast.dump(ast.parse(original)), t.id
        # cutting the latent lines out gives the original back, byte for byte
        spans = D.latent_spans(t, latents)
        assert len(spans) == sum(z is not None for z in latents)
        stripped, last = [], 0
        for a, b in spans:
            assert text[a:b].lstrip().startswith("# ") and text[a:b].endswith("\n")
            stripped.append(text[last:a])
            last = b
        assert "".join(stripped) + text[last:] == original


def full_line_comments(text):
    """Comment tokens alone on their line, found by tokenizing the whole function (not per action)."""
    import io
    import tokenize
    lines = text.splitlines(keepends=True)
    return [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type == tokenize.COMMENT and not lines[t.start[0] - 1][:t.start[1]].strip()]


def test_strip_comments_keeps_the_code_and_the_plan_is_the_experts_comments():
    src = ('def f(a):\n    """Doc.\n    # not a comment: the docstring stays\n    """\n'
           '    # first block,\n    #   on two lines\n\n    x = [1,\n         # inside a bracket\n         2]  # trailing stays\n'
           '    s = """line\n# not a comment\n"""\n    if a:\n        #\n        y = 1\n    # closing remark\n'
           '    return x, s\n    # after the last line\n')
    t = D.split_function(src, ast.parse(src).body[0], "m.py:1:f")
    stripped, plan = D.strip_comments(t)
    assert plan == ["# first block, on two lines", None, None, None, "# closing remark"]  # a bare "#" says nothing
    text = D.render(stripped)
    assert full_line_comments(text) == []
    assert "# trailing stays" in text and "# not a comment\n" in text and "    # not a comment: the" in text
    assert ast.dump(ast.parse(text)) == ast.dump(ast.parse(src))
    assert D.render(stripped, plan) == (
        'def f(a):\n    """Doc.\n    # not a comment: the docstring stays\n    """\n'
        '\n    # first block, on two lines\n    x = [1,\n         2]  # trailing stays\n'  # right before the code
        '    s = """line\n# not a comment\n"""\n    if a:\n        y = 1\n    # closing remark\n'
        '    return x, s\n')


def test_stripped_stdlib_is_the_same_program_and_its_plan_is_every_comment_block(stdlib_traces):
    n_blocks = 0
    for t in random.Random(2).sample(stdlib_traces, 1000):
        stripped, plan = D.strip_comments(t)
        original = D.render(t)
        body = D.render(stripped)[len(t.prompt):]
        assert ast.dump(ast.parse(D.render(stripped))) == ast.dump(ast.parse(original)), t.id
        assert full_line_comments(body) == [], t.id
        # what was taken out is exactly the comment lines; every block before an action is in the plan
        assert [line for line in D.render(stripped).splitlines() if line.strip()] == \
            [line for line in original.splitlines() if line.strip() and (line.strip() not in set(
                full_line_comments(original[len(t.prompt):])) or line in t.prompt)]
        for a, z in zip(t.actions, plan):
            lead = D.action_parts(a)[0]
            said = [line.strip().lstrip("#").strip() for line in lead.splitlines() if line.strip().startswith("#")]
            assert (z is not None) == any(said), t.id
            n_blocks += z is not None
    assert n_blocks > 100


def test_stripped_and_oracle_corpora(tmp_path):
    (tmp_path / "a.py").write_text("def f(x):\n    # double it\n    y = x * 2\n    return y\n")
    traces, latents = D.load_traces(f"stripped:{tmp_path}")
    assert latents is None and D.render(traces[0]) == "def f(x):\n    y = x * 2\n    return y\n"
    traces, latents = D.load_traces(f"oracle:{tmp_path}")
    assert latents == [["# double it", None]] and D.render(traces[0], latents[0]) == (tmp_path / "a.py").read_text()
    with pytest.raises(D.DataError, match="no expert comments"):
        minicode.load_traces("stripped:minicode-midtrain")  # the way the stages read names


def test_held_out_share_is_whole_files(stdlib_traces):
    import hashlib
    held = [t for t in stdlib_traces if D.held_out(t.id, 0.1)]
    files = {D.trace_file(t.id) for t in held}
    assert 0 < len(held) < len(stdlib_traces) and not {D.trace_file(t.id) for t in stdlib_traces if t not in held} & files
    # held_out_files holds whole files, the same ones a share holds first
    for n, share in ((40, 0.05), (40, 0.0001), (len(stdlib_traces) // 5, 0.05)):
        kept, first = D.held_out_files(stdlib_traces, n, share)
        assert len(first) >= n and len(kept) + len(first) == len(stdlib_traces)
        ranks = sorted({D.file_rank(t.id) for t in first})
        assert all(D.file_rank(t.id) > ranks[-1] for t in kept)
    assert {t.id for t in D.held_out_files(stdlib_traces, 40)[1]} == {t.id for t in stdlib_traces if D.held_out(t.id, 0.05)}
    assert D.spread(list(range(10)), 4) == [0, 2, 5, 7] and D.spread([1, 2], 4) == [1, 2]
    # a minicode id is its own file: the split is the one mstep.py has always made
    for i in range(200):
        tid = f"minicode/train/0/{i}"
        assert D.held_out(tid, 0.3) == (int(hashlib.sha256(tid.encode()).hexdigest(), 16) % 10_000 < 3000)


def test_multiline_statements_are_one_action_and_comments_ride_along():
    src = ('def f(a):\n    """Doc."""\n    x = [1,\n         2]  # trailing\n\n    # a comment\n'
           '    s = """line\n# not a comment\n"""\n    y = a + \\\n        1\n    return x, s, y\n\n')
    node = ast.parse(src).body[0]
    t = D.split_function(src, node, "f")
    assert t.prompt == 'def f(a):\n    """Doc."""\n'
    assert t.actions == ["    x = [1,\n         2]  # trailing\n", "\n    # a comment\n    s = \"\"\"line\n# not a comment\n\"\"\"\n",
                         "    y = a + \\\n        1\n", "    return x, s, y\n"]
    assert t.suffix == ""  # the function ends at its last statement
    text = D.render(t, ["make x", "the string", None, "done"])
    assert "    # a comment\n    # the string\n    s = " in text and "\n    # done\n    return" in text
    assert ast.dump(ast.parse(text)) == ast.dump(ast.parse(src))


def test_tabs_crlf_and_nested_blocks_round_trip():
    src = "def g(n):\r\n\tif n:\r\n\t\tfor i in range(n):\r\n\t\t\tprint(i)\r\n\treturn n\r\n"
    t = D.split_function(src, ast.parse(src).body[0], "g")
    assert D.render(t) == src and len(t.actions) == 4
    text = D.render(t, [None, "loop", "print", None])
    assert "\t\t# loop\r" not in text and "\t\t# loop\n\t\tfor" in text


def test_encode_trace_masks_the_latent_tokens():
    _, tok = tiny("tiny-gpt2")
    t = minicode.tasks(1, seed=5)[0].trace
    latents = [None] * len(t.actions)
    latents[1] = "now square them"
    ids, prompt, latent = D.encode_trace(tok, t, latents)
    assert ids[-1] == tok.eos_token_id and prompt[0] and not prompt[-1]
    assert "now square them" in tok.decode([i for i, m in zip(ids, latent) if m])
    assert tok.decode([i for i, m in zip(ids, latent) if not m]).replace(" ", "") \
        .startswith(D.render(t).split("\n")[0].replace(" ", ""))
    ids0, _, latent0 = D.encode_trace(tok, t)
    assert not latent0.any() and tok.decode(ids0[:-1]) == D.render(t)


def test_trace_files_round_trip_and_reject_bad_latents(tmp_path):
    tasks = minicode.tasks(5, seed=9, comment_rate=0.5)
    traces = [t.trace for t in tasks]
    D.write_traces(tmp_path / "t.jsonl", traces, [t.plan_comments for t in tasks])
    back, latents = D.read_traces(tmp_path / "t.jsonl")
    assert back == traces and latents == [t.plan_comments for t in tasks]
    rec = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[2])
    rec["latents"] = rec["latents"][:-1]
    (tmp_path / "bad.jsonl").write_text(json.dumps(traces[0].to_json()) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(D.DataError, match=r"bad.jsonl, line 2: field 'latents'"):
        D.read_traces(tmp_path / "bad.jsonl")


# ---- packing -----------------------------------------------------------------------------------------------

def slow_best_fit_rows(lengths, row_len):
    """Reference best fit decreasing: scan every row, take the fullest one the piece fits in."""
    free = []
    for n in sorted(lengths, reverse=True):
        fits = [r for r in range(len(free)) if free[r] >= n]
        if fits:
            free[min(fits, key=lambda r: (free[r], r))] -= n
        else:
            free.append(row_len - n)
    return len(free)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_equals_unpacked(seed):
    rng = random.Random(seed)
    row_len = 64
    docs = [[rng.randint(1, 999) for _ in range(rng.choice([1, 3, 17, 40, 64, 65, 150]))] for _ in range(60)]
    masks = [[rng.random() < 0.7 for _ in d] for d in docs]
    p = D.pack(docs, row_len, masks)
    assert p.input_ids.shape[1] == row_len and p.n_split == sum(len(d) > row_len for d in docs)
    for i, (d, m) in enumerate(zip(docs, masks)):  # unpack document i from the rows, in row order
        sel = p.doc_ids == i
        got = p.input_ids[sel].tolist()
        assert sorted(got) == sorted(d)  # every token is there once
        pieces = [d[s:s + row_len] for s in range(0, len(d), row_len)]
        rows = [p.input_ids[r][p.doc_ids[r] == i].tolist() for r in range(len(p.input_ids)) if (p.doc_ids[r] == i).any()]
        assert sorted(rows) == sorted(pieces)
        for r in range(len(p.input_ids)):
            where = (p.doc_ids[r] == i).nonzero()[:, 0]
            if len(where):
                assert where.tolist() == list(range(where[0], where[0] + len(where)))  # contiguous
                assert p.position_ids[r, where].tolist() == list(range(len(where)))
                piece = p.input_ids[r, where].tolist()
                start = next(s for s in range(0, len(d), row_len) if d[s:s + row_len] == piece)
                assert p.loss_mask[r, where].tolist() == m[start:start + len(where)]
    assert (p.input_ids[p.doc_ids < 0] == 0).all() and not p.loss_mask[p.doc_ids < 0].any()
    lengths = [len(x) for d in docs for x in (d[s:s + row_len] for s in range(0, len(d), row_len))]
    assert len(p.input_ids) == slow_best_fit_rows(lengths, row_len)


def test_packed_scoring_of_traces_equals_unpacked():
    import model as M
    mdl, tok = tiny("tiny-qwen2")
    docs = [D.encode_trace(tok, t.trace)[0] for t in minicode.tasks(6, seed=4)]
    p = D.pack(docs, 256)
    with torch.no_grad():
        lp = M.packed_logprobs(mdl, p.input_ids, p.position_ids, p.doc_ids)
        for i, d in enumerate(docs):
            alone = M.packed_logprobs(mdl, torch.tensor([d]), torch.arange(len(d))[None], torch.zeros(1, len(d), dtype=torch.long))
            assert torch.allclose(lp[p.doc_ids == i], alone[0], atol=1e-5)


# ---- benchmarks --------------------------------------------------------------------------------------------

def test_humaneval_from_the_package():
    probs = D.load_problems("humaneval")
    assert len(probs) == 164 and probs[0].task_id == "HumanEval/0" and probs[0].entry_point == "has_close_elements"
    assert "def check(candidate)" in probs[0].test and probs[0].canonical_solution


@needs_bench
def test_benchmark_files_load_with_their_splits():
    assert len(D.load_problems("humaneval+", data=BENCH)) == 164
    sizes = {s: len(D.load_problems(f"mbpp-{s}", data=BENCH)) for s in ("train", "validation", "test", "prompt")}
    assert sizes == {"train": 374, "validation": 90, "test": 500, "prompt": 10}
    assert len(D.load_problems("mbpp", data=BENCH)) == 500
    mp = D.load_problems("mbpp+", data=BENCH)
    assert len(mp) == 399 and mp[0].task_id == "Mbpp/2" and mp[0].entry_point == "similar_elements"
    assert mp[0].prompt.startswith('"""\nWrite a function') and "assert similar_elements(" in mp[0].prompt


@needs_bench
def test_mbpp_plus_huge_integers_stay_exact():
    big = []
    for _, r in D.read_jsonl(BENCH / "MbppPlus.jsonl.gz"):
        inputs = json.loads(r["plus_input"]) if isinstance(r["plus_input"], str) else r["plus_input"]
        big += [(r["task_id"], x) for x in _ints(inputs) if abs(x) > 2 ** 63]
    assert big, "expected integers beyond 64 bits in MBPP+"
    probs = {p.task_id: p for p in D.load_problems("mbpp+", data=BENCH)}
    for task_id, x in big[:50]:
        assert re.search(rf"(?<![\d]){x}(?![\d])", probs[task_id].test_setup), (task_id, x)


def _ints(x):
    if isinstance(x, bool):
        return []
    if isinstance(x, int):
        return [x]
    if isinstance(x, list):
        return [i for v in x for i in _ints(v)]
    return []


def test_missing_benchmark_files_say_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RA3_DATA", raising=False)
    with pytest.raises(D.DataError, match="MbppPlus.jsonl.gz not found.*--data or set RA3_DATA"):
        D.load_problems("mbpp+", data=tmp_path)


def test_problems_jsonl_function_and_io_formats(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        {"task_id": "f1", "prompt": "def add(a, b):\n", "entry_point": "add", "test": "def check(c):\n    assert c(1, 2) == 3\n"},
        {"task_id": "io1", "prompt": "Read two ints, print the sum.", "io_tests": [{"input": "1 2\n", "output": "3\n"}]},
        {"question_id": "lcb7", "question_content": "Print the input reversed.",
         "public_test_cases": json.dumps([{"input": "abc\n", "output": "cba\n", "testtype": "stdin"}]),
         "private_test_cases": json.dumps([{"input": "xy\n", "output": "yx\n", "testtype": "stdin"}])},
        {"contestId": 1, "index": "A", "statement": "Echo.", "examples": [["5\n", "5\n"]]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    probs = D.load_problems(str(path))
    assert [p.task_id for p in probs] == ["f1", "io1", "lcb7", "1A"]
    assert probs[0].entry_point == "add" and not probs[0].io_tests
    assert probs[2].io_tests == [("abc\n", "cba\n"), ("xy\n", "yx\n")] and '"""\nPrint the input reversed.' in probs[2].prompt
    assert probs[3].io_tests == [("5\n", "5\n")]


# ---- bad input ---------------------------------------------------------------------------------------------

def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"task_id": "a", "prompt": "x", "test": "t", "entry_point": "f"}\n{"task_id": oops}\n')
    with pytest.raises(D.DataError, match=r"p.jsonl, line 2: not valid JSON"):
        D.load_problems(str(path))


def test_missing_field_names_the_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"task_id": "a", "prompt": "x", "test": "t"}\n')
    with pytest.raises(D.DataError, match=r"p.jsonl, line 1: missing field 'entry_point'"):
        D.load_problems(str(path))
    path.write_text('{"task_id": "a", "prompt": "x"}\n')
    with pytest.raises(D.DataError, match=r"line 1: missing field 'test'.*or 'io_tests'"):
        D.load_problems(str(path))
    (tmp_path / "t.jsonl").write_text('{"id": "a", "prompt": "x"}\n')
    with pytest.raises(D.DataError, match=r"t.jsonl, line 1: missing field 'actions'"):
        D.read_traces(tmp_path / "t.jsonl")


def test_empty_inputs_and_unparsable_files(tmp_path):
    with pytest.raises(D.DataError, match="no such file"):
        D.read_jsonl(tmp_path / "none.jsonl").__next__()
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(D.DataError, match="e.jsonl: no problems"):
        D.load_problems(str(tmp_path / "e.jsonl"))
    (tmp_path / "src").mkdir()
    with pytest.raises(D.DataError, match="no function traces found in 0 .py files"):
        D.traces_from_dir(tmp_path / "src")
    (tmp_path / "src" / "bad.py").write_text("def f(:\n    pass\n")
    (tmp_path / "src" / "good.py").write_text("def f(x):\n    y = x + 1\n    return y\n")
    traces, n_files, skipped = D.traces_from_dir(tmp_path / "src")
    assert (len(traces), n_files, skipped) == (1, 2, 1)
    with pytest.raises(D.DataError, match="pack: no documents"):
        D.pack([], 16)


def test_hf_traces_from_a_local_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recs = [{"content": "def f(x):\n    y = x * 2\n    return y\n"}, {"content": "not python ("},
            {"content": "class A:\n    def g(self):\n        a = 1\n        return a\n"}]
    (tmp_path / "code.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    traces, skipped = D.traces_from_hf(str(tmp_path / "code.jsonl"), field="content")
    assert len(traces) == 2 and skipped == 1 and traces[1].prompt == "def g(self):\n"
    with pytest.raises(D.DataError, match="no field 'text'"):
        D.traces_from_hf(str(tmp_path / "code.jsonl"), field="text")
    with pytest.raises(D.DataError, match="hub cannot be reached"):
        D.traces_from_hf("some-org/some-dataset")
