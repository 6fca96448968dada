"""GGUF -> Hugging Face folder conversion (its own module so that both the asset cache and
the model loader can use it without importing each other).

GGUF files are dequantised by transformers (`from_pretrained(dir, gguf_file=...)`, needs the
`gguf` package). That takes tens of seconds, so it is done once and the result written as an
ordinary fp32 safetensors folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mogrpo.config import atomic_folder


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantise a GGUF causal LM into a safetensors folder (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    # The weights are plain fp32 now; drop the GGUF quantiser so the folder saves and loads
    # as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out_dir
