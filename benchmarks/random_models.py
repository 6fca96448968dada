"""`--policy random:qwen2.5-0.5b` (or -7b, -14b) for the benchmarks: a model folder with the
shape of the published Qwen2.5-Instruct model (mogrpo/memory.py QWEN25) and random weights,
built once without a download, so GPU timings need no hub.

The tokenizer is the default policy's (SmolLM2's, from mogrpo's asset cache): its ids are
all below Qwen2.5's vocabulary, and a random model never picks EOS on purpose, so every
completion runs to max_new_tokens on both sides of a benchmark (equal work). Weights are
written in bf16 (half the disk; runs that keep fp32 weights load them as fp32) and drawn
on the GPU when there is one (a 7B model's initialisation on a CPU takes minutes).
"""

from __future__ import annotations

import os

PREFIX = "random:"


def resolve(spec: str, cache: str | os.PathLike | None = None) -> str:
    """`random:qwen2.5-<size>` -> the folder (built on first use); anything else unchanged."""
    if not spec.startswith(PREFIX):
        return spec
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from mogrpo.assets import cache_dir
    from mogrpo.memory import QWEN25
    from mogrpo.models import resolve_policy_path

    name = spec[len(PREFIX):]
    size = name.removeprefix("qwen2.5-")
    if size not in QWEN25:
        raise SystemExit(f"--policy {spec}: known random models are " +
                         ", ".join(f"{PREFIX}qwen2.5-{s}" for s in QWEN25))
    folder = cache_dir(cache) / "random-models" / name
    if (folder / "config.json").is_file():
        return str(folder)
    s = QWEN25[size]
    tok = AutoTokenizer.from_pretrained(resolve_policy_path("builtin:smollm2-135m-instruct", cache))
    config = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads,
                         num_key_value_heads=s.kv_heads,
                         tie_word_embeddings=s.tied, max_position_embeddings=32768, rope_theta=1e6,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return str(folder)
