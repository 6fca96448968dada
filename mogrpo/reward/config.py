"""The config of `mogrpo reward train` (one documented dataclass; mogrpo/reward/train.py runs
it)."""

from __future__ import annotations

from dataclasses import dataclass

from mogrpo.config import field
from mogrpo.data.schema import DEFAULT_ASPECTS
from mogrpo.reward.model import POOLINGS


@dataclass
class RewardTrainConfig:
    """Config of `mogrpo reward train` (YAML keys = field names)."""

    aspects: list[str] = field(default_factory=lambda: list(DEFAULT_ASPECTS),
                               help="aspects to predict, one regression output each")
    backbone: str = field("builtin:all-minilm-l6-v2",
                          help="Hugging Face id, local folder, or builtin:all-minilm-l6-v2")
    pooling: str = field("mean", help="mean | cls | last (use last for decoder backbones)")
    max_length: int = field(256,
                            help="max tokens per (prompt, response) pair; longer side truncated")
    dropout: float = field(0.0, help="dropout inside the backbone; 0 by default: early stopping "
                                     "regularises the small data set, and dropout slows CPU "
                                     "training (benchmarks/RESULTS.md)")
    data: list[str] = field(default_factory=lambda: ["default", "onpolicy"],
                            help="data sources: 'default' (packaged, offline), 'onpolicy' "
                                 "(packaged "
                                 "SmolLM2 completions labelled by the refusal labeller), a "
                                 ".jsonl/.csv "
                                 "path (e.g. from `mogrpo reward data`), or "
                                 "'hf:<pku-saferlhf|helpsteer2|beavertails>:<hub id or file>'")
    splits: list[float] = field(default_factory=lambda: [0.75, 0.10, 0.15],
                                help="train/validation/test fractions for non-default sources, by "
                                     "prompt")
    aspect_weights: dict[str, float] = field(default_factory=dict,
                                             help="loss weight per aspect (missing = 1.0)")
    epochs: int = field(4, help="maximum epochs")
    batch_size: int = field(16, help="pairs per optimiser step")
    eval_batch_size: int = field(64, help="pairs per scoring batch")
    lr: float = field(5e-5, help="AdamW learning rate of the backbone")
    head_lr: float = field(1e-3, help="AdamW learning rate of the regression head")
    weight_decay: float = field(0.01, help="AdamW weight decay (not on biases/LayerNorm)")
    warmup_ratio: float = field(0.06, help="fraction of steps of linear warm-up, then linear decay")
    grad_clip: float = field(1.0, help="max gradient norm (0 = off)")
    patience: int = field(2, help="stop after this many epochs without a better validation loss")
    onpolicy_labels: str = field("hard", help="on-policy rows (source onpolicy or `mogrpo reward "
                                              "data` files): hard = the refusal labeller's verdict "
                                              "(safety or actionability 1/0 at P(refusal) = 0.5) | "
                                              "soft = P(refusal) itself, which grades how cautious "
                                              "a compliant answer sounds (docs/theory.md section "
                                              "7)")
    restate_prompts: bool = field(True, help="restate the packaged sources' prompts ('default', "
                                             "'onpolicy') in a form family picked by hash "
                                             "(imperative, question, first person, request; "
                                             "mogrpo/data/forms.py), so that phrasing does not "
                                             "predict the labels; your own files are never "
                                             "rewritten")
    max_train_rows: int = field(0, help="use at most this many training rows (0 = all)")
    partition: str = field("all", help="all | a | b: keep only the prompts in one half of a fixed, "
                                       "seed-independent hash partition; a reward model on 'a' "
                                       "and an "
                                       "evaluator on 'b' never share a prompt")
    seed: int = field(0, help="seed for data construction, shuffling and the head's init")
    precision: str = field("auto",
                           help="auto (bf16 autocast where the CPU/GPU supports it) | bf16 | fp32")
    device: str = field("auto", help="auto | cpu | cuda")
    num_threads: int = field(0, help="torch CPU threads (0 = all cores)")
    cache_dir: str | None = field(None,
                                  help="asset cache (default $MOGRPO_CACHE or ~/.cache/mogrpo)")
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"],
                                 help="metric backends besides metrics.jsonl: tensorboard, wandb "
                                      "(as the policy "
                                      "trainers)")
    keep_state: bool = field(False,
                             help="keep checkpoints/ (optimiser and RNG state, about 3x the model) "
                                         "after a successful run; by default it is removed then")

    def __post_init__(self) -> None:
        from mogrpo.tracking import check_report_to

        check_report_to(self.report_to)
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:  # also rejects NaN
                raise ValueError(f"{name} = {getattr(self, name)} must be > 0 (e.g. lr=5e-5, "
                                 f"head_lr=1e-3)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio = {self.warmup_ratio} must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.patience < 1 or self.max_length < 8:
            raise ValueError("patience must be >= 1 and max_length >= 8")
        if not self.aspects or len(set(self.aspects)) != len(self.aspects):
            raise ValueError(f"aspects must be a non-empty list of unique names, got "
                             f"{self.aspects}")
        unknown = sorted(set(self.aspect_weights) - set(self.aspects))
        if unknown:
            raise ValueError(f"aspect_weights names {unknown}, which are not in aspects "
                             f"{self.aspects}")
        if any(w < 0 for w in self.aspect_weights.values()):
            raise ValueError("aspect_weights must be >= 0")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if (len(self.splits) != 3 or any(f < 0 for f in self.splits)
                or abs(sum(self.splits) - 1) > 1e-6):
            raise ValueError(f"splits must be three fractions summing to 1, got {self.splits}")
        if self.splits[1] == 0 or self.splits[2] == 0:
            raise ValueError("splits need a validation and a test fraction > 0")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.data:
            raise ValueError("data must name at least one source, e.g. ['default']")
        if self.onpolicy_labels not in ("hard", "soft"):
            raise ValueError(f"onpolicy_labels must be hard or soft, got {self.onpolicy_labels!r}")
        if self.partition not in ("all", "a", "b"):
            raise ValueError(f"partition must be all, a or b, got {self.partition!r}")
