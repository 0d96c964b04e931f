"""Test helpers: tiny models and a GGUF writer, all made here, nothing downloaded; torchrun on the CPU; a
directory of commented code."""
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import torch

import model as M


def tiny(preset, seed=0, **overrides):
    """A tiny preset in eval mode, fp32, on CPU, using the RA3 attention path like load_model does."""
    mdl, tok = M.make_tiny(preset, seed=seed, **overrides)
    M.prepare_tokenizer(tok, mdl)
    M.use_ra3_attention(mdl)
    return mdl.eval(), tok


def real_code(root, n_files, seed=0):
    """A directory of small modules whose functions carry full-line comments, as real code does: 3 functions a
    file, each of 4 lines with 2 comments."""
    ops = ["x * 2", "x + 1", "x - 3", "x * 5", "x + 7", "x // 2", "x % 3", "x - 1"]
    rng = random.Random(seed)
    root.mkdir()
    for i in range(n_files):
        (root / f"m{i}.py").write_text("".join(
            f"def f{j}(x):\n    # {rng.choice(['scale it', 'shift it', 'keep it'])}\n    y = {rng.choice(ops)}\n"
            f"    if y > {j}:\n        # clamp\n        y = {j}\n    return y\n\n" for j in range(3)))
    return root


def logits_of(mdl, ids):
    with torch.no_grad():
        return mdl(input_ids=torch.tensor([ids])).logits[0].float()


def _llama_cpp_permute(w, n_head):
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(mdl, tok, path):
    """Write a Llama-architecture model with a byte-level BPE tokenizer to GGUF (F32 tensors), the same
    layout as the SmolLM2 file that `smollm2` loads."""
    import gguf
    cfg = mdl.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tok.backend_tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    import json
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(True)
    sd = {k: v.detach().float().numpy() for k, v in mdl.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = dict(input_layernorm="attn_norm", post_attention_layernorm="ffn_norm")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- torchrun on the CPU: gloo ranks, GPUs hidden, one thread a rank (2 ranks share 2 cores) ----------------

CPU_RANKS_ENV = dict(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(ranks):
    """The command line that starts a script under torchrun with `ranks` local ranks, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]


def torchrun(script, args=(), ranks=2, cwd=None, env=None, timeout=300):
    """Run a script under torchrun on the CPU, from the repository root unless `cwd`; fail with its output if
    any rank fails."""
    p = subprocess.run(torchrun_cmd(ranks) + [str(script), *map(str, args)], cwd=cwd or ROOT, capture_output=True, text=True,
                       env=dict(os.environ, **CPU_RANKS_ENV, **(env or {})), timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p
