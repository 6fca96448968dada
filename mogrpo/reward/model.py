"""`MultiAspectRewardModel`: one backbone, one regression output per alignment aspect.

The model reads a (prompt, response) pair as one sequence (a cross-encoder: the
tokenizer's pair encoding, e.g. `[CLS] prompt [SEP] response [SEP]` for BERT-style
encoders), pools the backbone's hidden states, and maps the pooled vector to K outputs
with a linear head; a sigmoid keeps each score in [0, 1], the range of the labels.
Shapes: N pairs, T tokens, H hidden size, K aspects.

The backbone is any `transformers.AutoModel`: an encoder (default all-MiniLM-L6-v2,
mean pooling) or a decoder (use `pooling="last"`, the last non-padding token). The
model keeps its own tokenizer, independent of any policy's.

Saved as a folder: `model.safetensors` (backbone and head), `reward_config.json`
(aspects, pooling, max length, where the backbone came from), the backbone's
`config.json` and the tokenizer files, so loading needs no network and gives back the
same tensors bit for bit.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

POOLINGS = ("mean", "cls", "last")
CHARS_PER_TOKEN = 32  # an upper bound on characters per token, for the cut before tokenising
CONFIG_NAME = "reward_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class RewardModelSpec:
    """What defines a reward model besides its weights (saved as reward_config.json)."""

    aspects: list[str]
    backbone: str  # where the backbone came from (hub id or path), for provenance
    pooling: str = "mean"
    max_length: int = 256
    output: str = "sigmoid"  # "sigmoid" (scores in [0, 1]) or "linear"

    def __post_init__(self) -> None:
        if not self.aspects:
            raise ValueError("a reward model needs at least one aspect")
        if len(set(self.aspects)) != len(self.aspects):
            raise ValueError(f"aspects must be unique, got {self.aspects}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.output not in ("sigmoid", "linear"):
            raise ValueError(f"output must be 'sigmoid' or 'linear', got {self.output!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length={self.max_length} is too small; use at least 8 tokens")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool hidden states [N, T, H] with attention mask [N, T] to [N, H]."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":  # last non-padding position, for right- or left-padded decoders
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask.long()).max(dim=1).values  # [N]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}")


def _drop_unused_pooler(backbone: nn.Module) -> None:
    """BERT-style backbones carry a pooler (dense + tanh over [CLS]) that our own pooling
    never reads; drop it so it neither costs compute nor sits untrained in the checkpoint."""
    if isinstance(getattr(backbone, "pooler", None), nn.Module):
        backbone.pooler = None


def set_dropout(module: nn.Module, p: float) -> None:
    """Set every dropout probability inside `module` (nn.Dropout layers and the float
    `*dropout*` attributes that attention implementations read at call time)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = p
        for name, value in list(vars(sub).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(sub, name, p)
    config = getattr(module, "config", None)
    for name in dir(config) if config is not None else []:
        if "dropout" in name and isinstance(getattr(config, name, None), float):
            setattr(config, name, p)


class MultiAspectRewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer, spec: RewardModelSpec):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.spec = spec
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, len(spec.aspects))  # one regression output per aspect
        if tokenizer.pad_token is None:  # decoder tokenizers often have none
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.autocast_dtype: torch.dtype | None = None  # set by callers (bf16 where supported)

    @property
    def aspects(self) -> list[str]:
        return list(self.spec.aspects)

    @classmethod
    def from_backbone(cls, backbone: str, aspects: list[str], *, pooling: str = "mean",
                      max_length: int = 256, output: str = "sigmoid", seed: int | None = None,
                      dropout: float | None = None) -> "MultiAspectRewardModel":
        """A fresh reward model on a pretrained backbone (hub id or folder); the head is new."""
        from transformers import AutoModel, AutoTokenizer

        from mogrpo.models import check_model_ref, loading

        spec = RewardModelSpec(aspects=list(aspects), backbone=str(backbone), pooling=pooling,
                               max_length=max_length, output=output)
        check_model_ref(str(backbone), "backbone")
        with loading(str(backbone), "backbone"):
            tok = AutoTokenizer.from_pretrained(backbone)
            bb = AutoModel.from_pretrained(backbone, dtype=torch.float32)
        _drop_unused_pooler(bb)
        if dropout is not None:
            set_dropout(bb, dropout)
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(bb, tok, spec)
        nn.init.normal_(model.head.weight, std=0.02)
        nn.init.zeros_(model.head.bias)
        return model

    # ---- encoding --------------------------------------------------------------------
    def encode(self, prompts: list[str], responses: list[str]) -> tuple[dict[str, torch.Tensor],
                                                                        int]:
        """Tokenise pairs (truncating the longer side first); returns (batch, n_truncated)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        tok = self.tokenizer
        # No token covers more than a few dozen characters, so cutting each text to
        # CHARS_PER_TOKEN * max_length characters changes no kept token, and a 10 MB text costs
        # no more to tokenise than a long one (truncation below keeps the first tokens).
        cut = CHARS_PER_TOKEN * self.spec.max_length
        prompts, responses = [p[:cut] for p in prompts], [r[:cut] for r in responses]
        n_special = tok.num_special_tokens_to_add(pair=True)
        lp = tok(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]
        lr = tok(list(responses), add_special_tokens=False, verbose=False)["input_ids"]
        n_trunc = sum(1 for a, b in zip(lp,
                                        lr) if len(a) + len(b) + n_special > self.spec.max_length)
        batch = tok(list(prompts), list(responses), truncation="longest_first",
                    max_length=self.spec.max_length, padding=True, return_tensors="pt")
        return dict(batch), n_trunc

    # ---- forward ---------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [N, K] for encoded pairs [N, T]."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        device = input_ids.device
        ctx = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else nullcontext())
        with ctx:
            hidden = self.backbone(**kwargs).last_hidden_state  # [N, T, H]
        pooled = pool(hidden.float(), attention_mask, self.spec.pooling)  # [N, H]
        out = self.head(pooled)  # [N, K]
        return torch.sigmoid(out) if self.spec.output == "sigmoid" else out

    @torch.inference_mode()
    def score(self, prompts: list[str], responses: list[str], *, batch_size: int = 64,
              return_truncated: bool = False):
        """Score pairs on every aspect: a float tensor [N, K] (columns in `self.aspects` order).

        Inputs longer than `max_length` tokens are truncated (longer side first); with
        `return_truncated=True` the result is `(scores, n_truncated)`.
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        # Sort by length so each batch pads little; restore the order at the end.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        out = torch.empty(len(prompts), len(self.spec.aspects))
        n_trunc = 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch, nt = self.encode([prompts[i] for i in idx], [responses[i] for i in idx])
            n_trunc += nt
            batch = {k: v.to(device) for k, v in batch.items()}
            out[idx] = self(**batch).float().cpu()
        if was_training:
            self.train()
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"the reward model produced NaN/inf scores for "
                             f"{int((~torch.isfinite(out)).any(1).sum())} "
                             f"of {len(out)} pairs; its weights are broken (retrain it, e.g. with "
                             f"a lower lr)")
        return (out, n_trunc) if return_truncated else out

    # ---- persistence -----------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the model folder atomically (a temp folder renamed into place)."""
        from mogrpo.config import atomic_folder

        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            # the aspect names travel with the head's weights: a renamed reward_config.json is
            # caught at load
            save_file(state, str(tmp / WEIGHTS_NAME),
                      metadata={"format": "pt", "aspects": json.dumps(self.aspects)})
            (tmp / CONFIG_NAME).write_text(json.dumps(asdict(self.spec), indent=2))
            self.backbone.config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *,
             device: str | torch.device = "cpu") -> "MultiAspectRewardModel":
        """Load a saved reward model. Every way a folder can be wrong (missing or damaged files, a
        head that does not fit reward_config.json, aspect names changed since training,
        non-finite weights) is a ModelLoadError naming the file and the fix."""
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from mogrpo.models import ModelLoadError, check_model_ref, loading

        folder = Path(folder)
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"{folder} is not a mogrpo reward model folder (no {CONFIG_NAME}); "
                "train one with `mogrpo reward train --output DIR` and pass DIR/model")
        try:
            spec = RewardModelSpec(**json.loads(cfg_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{cfg_path}: not a valid reward model config ({exc}); save the "
                                 f"model again "
                                 f"or restore the file") from None
        check_model_ref(str(folder), "reward model")
        with loading(str(folder), "reward model"):
            config = AutoConfig.from_pretrained(folder)
            backbone = AutoModel.from_config(config)
            tok = AutoTokenizer.from_pretrained(folder)
            with safe_open(str(folder / WEIGHTS_NAME), "pt") as fh:
                saved_aspects = (fh.metadata() or {}).get("aspects")
            state = load_file(str(folder / WEIGHTS_NAME))
        _drop_unused_pooler(backbone)
        if saved_aspects is not None and json.loads(saved_aspects) != spec.aspects:
            raise ModelLoadError(f"{cfg_path} names the aspects {spec.aspects}, but the head in "
                                 f"{WEIGHTS_NAME} was "
                                 f"trained for {json.loads(saved_aspects)} (in that order); "
                                 f"scores would go under "
                                 f"the wrong names. Restore the aspects in {CONFIG_NAME}")
        head = state.get("head.weight")
        if head is not None and head.shape[0] != len(spec.aspects):
            raise ModelLoadError(f"{folder / WEIGHTS_NAME}: the head has {head.shape[0]} outputs "
                                 f"but {CONFIG_NAME} "
                                 f"names {len(spec.aspects)} aspects {spec.aspects}; the two "
                                 f"files are from "
                                 f"different models")
        bad = [k for k,
               v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ModelLoadError(f"{folder / WEIGHTS_NAME}: non-finite (NaN/inf) values in "
                                 f"{bad[:3]}; the model "
                                 f"diverged or the file is damaged: retrain it (e.g. with a lower "
                                 f"lr)")
        model = cls(backbone, tok, spec)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ModelLoadError(f"{folder / WEIGHTS_NAME}: the weights do not fit the backbone "
                                 f"in config.json "
                                 f"({str(exc).splitlines()[-1].strip()[:200]})") from None
        # Some backbones register non-persistent buffers (e.g. position ids); weights must all
        # match.
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise ModelLoadError(f"{folder}: weights do not match the model (missing "
                                 f"{missing[:5]}, "
                                 f"unexpected {unexpected[:5]})")
        return model.to(device).eval()


def require_reward_model(path: str) -> Path:
    rm_path = Path(path)
    if not (rm_path / "reward_config.json").is_file():
        raise FileNotFoundError(f"reward model {rm_path} not found; train it first: mogrpo reward "
                                f"train "
                                f"--config configs/reward/default.yaml --output {rm_path.parent}")
    return rm_path
