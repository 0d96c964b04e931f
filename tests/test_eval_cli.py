"""eval_code.py's command line: benchmark canonical solutions pass, sampling works end to end, pass@k
is reported per problem and overall, bad input is named."""
import json
import os
from pathlib import Path

import pytest

import data as D
import eval_code as E

BENCH = Path(os.environ.get("RA3_DATA", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
needs_bench = pytest.mark.skipif(not (BENCH / "mbpp.jsonl").is_file(),
                                 reason=f"benchmark files not found in {BENCH} (set RA3_DATA to the folder holding them)")


def canonical_samples(tmp_path, bench):
    path = tmp_path / f"{bench}.jsonl"
    with open(path, "w") as f:
        for p in D.load_problems(bench, data=BENCH):
            f.write(json.dumps({"task_id": p.task_id, "completion": p.canonical_solution}) + "\n")
    return path


def evaluate(*argv):
    return E.main(E.parser.parse_args(list(argv)))


def test_humaneval_canonical_solutions_all_pass(tmp_path):
    s = evaluate("--bench", "humaneval", "--samples", str(canonical_samples(tmp_path, "humaneval")),
                 "--out", str(tmp_path / "out"))
    assert s["problems"] == 164 and s["pass@1"] == 1.0
    assert s["isolation"]["user"] and (tmp_path / "out" / "summary.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 164 and all(r["correct"] == 1 for r in rows)


@needs_bench
@pytest.mark.parametrize("bench", ["mbpp", "humaneval+", "mbpp+"])
def test_reference_solutions_pass_at_least_99_percent(tmp_path, bench):
    s = evaluate("--bench", bench, "--data", str(BENCH), "--samples", str(canonical_samples(tmp_path, bench)))
    assert s["pass@1"] >= 0.99, s


def test_sampling_minicode_base_end_to_end(tmp_path):
    greedy = evaluate("--bench", "minicode-heldout", "--limit", "16", "--out", str(tmp_path / "g"))
    assert greedy["problems"] == 16 and greedy["pass@1"] > 0.5  # the shipped base model writes minicode
    s = evaluate("--bench", "minicode-heldout", "--limit", "8", "--n", "4", "--temperature", "0.8",
                 "--k", "1,4", "--out", str(tmp_path / "s"))
    assert s["pass@4"] >= s["pass@1"] and s["samples"] == 32  # (--k 8 with --n 4 stops at the start)
    samples = (tmp_path / "s" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 32 and all("completion" in json.loads(x) for x in samples)
    # the written samples score the same when read back
    again = evaluate("--bench", "minicode-heldout", "--samples", str(tmp_path / "s" / "samples.jsonl"), "--k", "1,4")
    assert again["pass@1"] == s["pass@1"] and again["pass@4"] == s["pass@4"]


def test_stdin_stdout_problems(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"task_id": "sum", "prompt": "Print the sum of two ints.",
                                    "io_tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]}) + "\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text("\n".join(json.dumps({"task_id": "sum", "completion": c}) for c in [
        "a, b = map(int, input().split())\nprint(a + b)\n",
        "a, b = map(int, input().split())\nprint(a * b)\n",       # right on neither
        "print(3)\n"]) + "\n")                                       # right on the first test only
    s = evaluate("--bench", str(problems), "--samples", str(samples), "--k", "1,3")
    assert s["pass@1"] == pytest.approx(1 / 3) and s["pass@3"] == 1.0


def test_completions_end_at_the_first_stop():
    assert E.cut_at_stops("    return x\n\ndef g():\n    pass\n", E.FUNCTION_STOPS) == "    return x\n"
    assert E.cut_at_stops("    return x\n", E.FUNCTION_STOPS) == "    return x\n"
    assert E.cut_at_stops("def f():\n    return 1\nassert f() == 1\n", E.PROGRAM_STOPS) == "def f():\n    return 1"


def test_bad_samples_are_named(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps({"task_id": "HumanEval/0"}) + "\n")
    with pytest.raises(D.DataError, match=r"s.jsonl, line 1: missing field 'completion'"):
        evaluate("--bench", "humaneval", "--samples", str(tmp_path / "s.jsonl"))
    (tmp_path / "u.jsonl").write_text(json.dumps({"task_id": "nope/1", "completion": "pass"}) + "\n")
    with pytest.raises(D.DataError, match=r"task ids not in humaneval: \['nope/1'\]"):
        evaluate("--bench", "humaneval", "--samples", str(tmp_path / "u.jsonl"))
    with pytest.raises(ValueError, match="--n > 1 needs --temperature > 0"):
        evaluate("--bench", "minicode-heldout", "--n", "2")


def test_think_rate_counts_code_lines_right_after_a_comment(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"task_id": "t", "prompt": "Print 3.",
                                    "io_tests": [{"input": "", "output": "3\n"}]}) + "\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text("\n".join(json.dumps({"task_id": "t", "completion": c}) for c in [
        "# the answer\n\nx = 3\nprint(x)\n",   # 2 code lines, 1 right after a comment (blank lines skipped)
        "print(3)  # inline: not a thought\n"]) + "\n")
    s = evaluate("--bench", str(problems), "--samples", str(samples))
    assert s["pass@1"] == 1.0 and s["think_rate"] == pytest.approx(1 / 3, abs=1e-4)


def test_evalplus_solutions_partial_files_and_unwritable_out(tmp_path, capsys):
    """evalplus's `solution` (the whole program) scores like a completion; a file that covers part of the
    benchmark says so; an --out that cannot be written stops before any work."""
    problems = D.load_problems("humaneval")[:3]
    path = tmp_path / "solutions.jsonl"
    path.write_text("".join(json.dumps({"task_id": p.task_id, "solution": p.prompt + p.canonical_solution}) + "\n"
                            for p in problems))
    s = evaluate("--bench", "humaneval", "--samples", str(path))
    assert s["problems"] == 3 and s["pass@1"] == 1.0
    assert "covers 3 of the 164 humaneval tasks" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        evaluate("--bench", "humaneval", "--samples", str(path), "--out", str(blocker / "out"))
