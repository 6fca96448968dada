"""Loading policies and tokenizers: Hugging Face ids or folders, and GGUF files.

GGUF files are dequantised by transformers (`from_pretrained(dir, gguf_file=...)`,
needs the `gguf` package). That takes tens of seconds, so `convert_gguf_to_hf` does it
once and writes an ordinary fp32 safetensors folder that every later load uses.
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


def bf16_supported_on_cpu() -> bool:
    """True when this CPU has native bf16 arithmetic (avx512_bf16 or AMX); checked, not assumed."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def autocast_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """Resolve a precision setting ('auto' | 'bf16' | 'fp32') to an autocast dtype or None."""
    if mode == "fp32":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode != "auto":
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {mode!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if bf16_supported_on_cpu() else None
    return None
