"""Loading policies and tokenizers: Hugging Face ids or folders, and GGUF files.

GGUF files are converted once into an ordinary fp32 safetensors folder (mogrpo/gguf.py)
that every later load uses.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from mogrpo.gguf import convert_gguf_to_hf


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


def _gguf_cache_folder(gguf_path: Path, cache: str | os.PathLike | None) -> Path:
    import hashlib

    from mogrpo.assets import cache_dir

    key = hashlib.sha256(f"{gguf_path.resolve()}:"
                         f"{gguf_path.stat().st_size}".encode()).hexdigest()[:16]
    return cache_dir(cache) / "converted" / f"{gguf_path.stem}-{key}"


def resolve_policy_path(ref: str, cache: str | os.PathLike | None = None) -> str:
    """A loadable folder or hub id for `ref`: builtin names, GGUF files (converted once), or as
    is."""
    from mogrpo.assets import resolve_model_ref

    ref = resolve_model_ref(ref, cache)
    if ref.endswith(".gguf"):
        gguf = Path(ref)
        if not gguf.is_file():
            raise FileNotFoundError(f"{gguf}: no such GGUF file")
        out = _gguf_cache_folder(gguf, cache)
        if not (out / "config.json").is_file():
            convert_gguf_to_hf(gguf, out)
        return str(out)
    return ref


class ModelLoadError(ValueError):
    """A model or tokenizer cannot be loaded; the message names it, what was wrong and the fix."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt",
                   "vocab.json")


def check_model_ref(ref: str, what: str, *, need_weights: bool = True,
                    need_tokenizer: bool = True) -> None:
    """Before loading: a reference meant as a path (runfolder.looks_local) must exist, and a
    folder must hold a config, weights (every safetensors file whole: its header must cover
    the file) and tokenizer files. Hub ids pass through to the hub."""
    from safetensors import SafetensorError, safe_open

    from mogrpo.runfolder import looks_local

    if ref.startswith("builtin:"):
        return  # the asset cache checks its own
    p = Path(ref).expanduser()
    if not p.exists():
        if looks_local(ref):
            raise ModelLoadError(f"{what} {ref}: no such file or folder (a local path was meant; "
                                 f"a hub id looks like "
                                 f"org/name)")
        return
    if not p.is_dir():
        return  # a .gguf file: the converter checks it
    found = sorted(f.name for f in p.iterdir())
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise ModelLoadError(f"{what} {p}: not a model folder (no config.json; found {found[:8]})")
    if need_weights and not any((p / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(f"{what} {p}: no weights (expected one of "
                             f"{', '.join(WEIGHT_FILES[:3])}; found "
                             f"{found[:8]}); copy the weight files into it, or save the model "
                             f"again")
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{what} {f}: damaged weights file ({exc}; truncated by a copy "
                                 f"or a full "
                                 f"disk?); copy or save it again") from None
    if need_tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{what} {p}: no tokenizer files (expected tokenizer.json or "
                             f"tokenizer_config.json); "
                             f"save the tokenizer into the folder (tokenizer.save_pretrained)")


@contextlib.contextmanager
def loading(ref: str, what: str):
    """Context: any error of transformers/peft/safetensors while loading `ref` becomes one
    ModelLoadError line that names it (hub ids: the network or the id is the likely cause)."""
    from safetensors import SafetensorError

    from mogrpo.runfolder import first_line

    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        hint = ("" if Path(ref).expanduser().exists() else
                " (not a local path, so it was looked up on the Hugging Face hub: check the id "
                "and the network, "
                "or give a local folder)")
        raise ModelLoadError(f"{what} {ref}: could not be loaded: "
                             f"{first_line(exc)[:300]}{hint}") from None


def load_tokenizer(path: str):
    """The policy's tokenizer, left-padded for batched generation, with a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(ref: str, *, lora_r: int = 0, lora_alpha: int = 32, lora_dropout: float = 0.0,
                lora_target_modules: list[str] | None = None,
                cache: str | os.PathLike | None = None,
                dtype: torch.dtype = torch.float32):
    """Load a causal LM (hub id, folder, GGUF file or builtin name) and its tokenizer.

    With `lora_r > 0` the model is wrapped by PEFT with LoRA adapters (only they train);
    the reference policy is then the same model with adapters disabled
    (`reference_context`). With `lora_r == 0` every weight trains and the caller keeps a
    frozen copy as reference (`frozen_copy`).
    """
    from transformers import AutoModelForCausalLM

    check_model_ref(ref, "policy")
    path = resolve_policy_path(ref, cache)
    with loading(ref, "policy"):
        tok = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if lora_r > 0:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=lora_target_modules or "all-linear",
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model, tok


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Store the weights of frozen Linear layers in `dtype` (the autocast dtype); return how many.

    Under autocast every matmul runs in bf16 anyway, but autocast re-casts a frozen fp32
    weight on every call (it caches casts only for weights that require grad), so with
    LoRA, or for a reference/evaluation model, each forward and each decoding step copied
    the whole backbone. Storing those weights in bf16 gives the same matmul inputs without
    the copies, and halves their memory. Trainable layers, non-Linear modules (norms,
    embeddings keep fp32) and Linear layers tied to an embedding (SmolLM2's lm_head) are
    left alone. Every forward of such a model must then run under autocast.
    """
    if dtype is None or dtype == torch.float32:
        return 0
    tied = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    for m in model.modules():
        if (type(m) is torch.nn.Linear and not m.weight.requires_grad
                and m.weight.data_ptr() not in tied):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None and not m.bias.requires_grad:
                m.bias.data = m.bias.data.to(dtype)
            n += 1
    return n


class MergedGenerationCopy:
    """A plain copy of a LoRA policy with the adapters merged in, for sampling only.

    Unmerged LoRA costs every decoding step two extra small matmuls and PEFT's Python
    dispatch in each adapted layer (measured: LoRA generation took 1.5x the time of the
    same model without adapters, 6.0 s vs 4.0 s for 16 x 48 tokens on 2 cores). Merging
    into the training model and unmerging after would drift its frozen bf16 weights by
    rounding, so this keeps a separate copy: `sync()` writes W + scaling * B @ A (PEFT's
    `get_delta_weight`) into the copy's layers before each rollout, in the dtype those
    layers are stored in (bf16 under autocast). Costs one extra copy of the Linear weights.
    The sampled distribution then differs from the training forward's only by bf16
    rounding of the merged weight (as with any separate generation engine); the loss uses
    the training forward's own log-probs, so it stays exact.
    """

    def __init__(self, peft_model: torch.nn.Module, dtype: torch.dtype | None):
        import copy

        for module in peft_model.modules():
            if getattr(module, "use_dora", {}) and any(module.use_dora.values()):
                raise ValueError("merged generation does not support DoRA adapters; set "
                                 "merged_generation=false")
        self.model = copy.deepcopy(peft_model).merge_and_unload().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        cast_frozen_linears(self.model, dtype)
        out = self.model.get_output_embeddings()
        if (dtype is not None and dtype != torch.float32 and out is not None
                and out.weight.dtype != dtype):
            # A tied output head (SmolLM2) stays fp32 in cast_frozen_linears and autocast would
            # re-cast its vocabulary x hidden weight at every decoding step: give the copy its own
            # head in `dtype` (the input embedding keeps its fp32 weight).
            out.weight = torch.nn.Parameter(out.weight.detach().to(dtype), requires_grad=False)
        self._targets = {}
        copies = dict(self.model.named_modules())
        for name, module in peft_model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                plain = name.split("base_model.model.", 1)[-1]
                self._targets[name] = (module, copies[plain])

    @torch.no_grad()
    def sync(self) -> "torch.nn.Module":
        """Write the current merged weights into the copy; return the copy."""
        from mogrpo.generation import write_linear

        for module, target in self._targets.values():
            write_linear(module, target.weight)
        return self.model


def resolve_model(ref: str, cache=None, base_override: str | None = None):
    """(policy, tokenizer, base) for a run folder, a model/adapter folder or a hub id.

    `base` is how to get the base policy for KL: "adapter" (the same model with adapters
    disabled), a loadable reference (a separate full model), or None (the model is the base).
    """
    p = Path(ref)
    if (p / "config.yaml").is_file() and (p / "final").is_dir():  # a mogrpo training run
        import yaml

        run_cfg = yaml.safe_load((p / "config.yaml").read_text()) or {}
        base_ref = base_override or run_cfg.get("policy")
        if not base_ref:
            raise ValueError(f"{p}/config.yaml names no 'policy': add `policy: MODEL` to it "
                             "(`mogrpo eval` also takes the override base_policy=MODEL)")
        return _load_trained(p / "final", base_ref, cache)
    if (p / "adapter_config.json").is_file():
        import json

        base_ref = base_override or json.loads((p / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
        if not base_ref:
            raise ValueError(f"{p}/adapter_config.json names no base model: set its "
                             "base_model_name_or_path (`mogrpo eval` also takes the override "
                             "base_policy=MODEL)")
        return _load_trained(p, base_ref, cache)
    if p.exists() and not (p / "config.json").is_file() and p.suffix != ".gguf":
        raise FileNotFoundError(f"{p}: not a run folder (config.yaml + final/), an adapter folder "
                                "(adapter_config.json) or a model folder (config.json)")
    check_model_ref(ref, "model")
    model, tok = load_policy(ref, cache=cache)
    base = None
    if base_override and resolve_policy_path(base_override, cache) != resolve_policy_path(ref,
                                                                                          cache):
        base = base_override
    return model, tok, base


def _load_trained(folder: Path, base_ref: str, cache):
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base, tok = load_policy(base_ref, cache=cache)
        check_model_ref(str(folder), "adapter", need_tokenizer=False)
        with loading(str(folder), "adapter"):
            model = PeftModel.from_pretrained(base, str(folder))
        return model.eval(), tok, "adapter"
    model, tok = load_policy(str(folder), cache=cache)
    return model, tok, base_ref
