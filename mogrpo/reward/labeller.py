"""The refusal labeller: labels the policy's own completions for on-policy reward data.

What it decides: whether a completion *refuses* the request, meaning it declines and does
not go on to provide what was asked. An answer that opens with a disclaimer or an apology
and then provides the content ("I'm sorry, but I cannot... However, here is how...") is
not a refusal. On a harmful prompt a refusal is safe and anything else is not; on a
benign prompt a refusal costs actionability.

How: a logistic regression over frozen all-MiniLM-L6-v2 sentence embeddings (mean pooled,
L2-normalised) of three views of the completion: the whole text, its first sentence and
the rest. The first-sentence view sees the opener; the rest view sees whether the answer
goes on to comply. It is trained on
- maintainer labels (`mogrpo/data/packaged/maintainer_refusal_labels.jsonl`): completions
  of SmolLM2-135M-Instruct itself on training prompts, half of them guided (started from a
  refusal opener), and completions of GRPO policies trained from it (rows with a `policy`
  field: they write "I'd be happy to help ..." openers and chatbot disclaimers the base
  never does, and a labeller fitted on the base alone called 21 of 90 such compliant answers
  refusals), each read and labelled refusal / not_refusal / unclear by a maintainer
  (unclear rows are left out);
- optionally (`with_pyrit=True`) PyRIT's human refusal labels on harmful prompts
  (`refusal_scorer/*.csv`, other models' answers). Off by default: adding them lowered
  the held-out accuracy on SmolLM2's own completions (0.857 -> 0.810, docs/data.md);
  PyRIT's rows on benign prompts are never used, because there PyRIT also calls an
  off-topic answer a "refusal", which is not the property labelled here.
Its accuracy on held-out maintainer labels (k-fold, `cross_validate`) is reported in
docs/data.md and tested. It is fitted at use (a few seconds on a CPU) rather than loaded
from a pickle, so nothing executable is read from disk.

It is *not* the evaluation's refusal judge (the pattern list in `mogrpo/eval/metrics.py`):
the policy is trained on rewards learned from this labeller's verdicts, and judged by the
patterns, which it never saw, so a policy that games one is caught by the other.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_FIRST_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def maintainer_labels_path() -> Path:
    return (Path(__file__).resolve().parent.parent / "data" / "packaged"
            / "maintainer_refusal_labels.jsonl")


@dataclass
class LabelledText:
    text: str
    refusal: int  # 1 refusal, 0 not
    source: str
    group: str = ""  # rows of one group (prompt) stay in one fold


def read_maintainer_labels(path: str | os.PathLike | None = None) -> list[LabelledText]:
    """The clear (refusal / not_refusal) maintainer labels; unclear rows are skipped."""
    from mogrpo.data.loaders import iter_jsonl
    from mogrpo.data.schema import DataError

    out = []
    for where, row in iter_jsonl(path or maintainer_labels_path()):
        label = row.get("label")
        if label not in ("refusal", "not_refusal", "unclear"):
            raise DataError(f"{where}: label must be refusal, not_refusal or unclear, got "
                            f"{label!r}")
        if label != "unclear":
            out.append(LabelledText(row["response"], int(label == "refusal"), "maintainer",
                                    row["prompt"]))
    return out


def read_pyrit_harmful_refusals(pyrit_dir: str | os.PathLike) -> list[LabelledText]:
    """PyRIT's human refusal labels on harmful prompts only (declined = 1)."""
    from mogrpo.data.default_rm import HARMFUL_MARKERS
    from mogrpo.data.packaged import normalise_text, pyrit_files, read_advbench, read_pyrit_scored

    advbench = {normalise_text(p.text) for p in read_advbench(pyrit_dir)}
    harm_prompts = {normalise_text(r.prompt) for group in ("harm", "objective")
                    for path in pyrit_files(pyrit_dir, group) for r in read_pyrit_scored(path)}
    out = []
    for path in pyrit_files(pyrit_dir, "refusal_scorer"):
        for r in read_pyrit_scored(path):
            p = normalise_text(r.prompt)
            if p in advbench or p in harm_prompts or any(m in p for m in HARMFUL_MARKERS):
                out.append(LabelledText(r.response, int(r.score >= 0.5), "pyrit-refusal", r.prompt))
    return out


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a frozen encoder folder."""

    def __init__(self, model_dir: str | os.PathLike, max_length: int = 128, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()
        self.max_length = max_length
        self.batch_size = batch_size

    def __call__(self, texts: list[str]) -> np.ndarray:  # [N, D]
        import torch

        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), self.batch_size):
                enc = self.tok([t or "." for t in texts[s:s + self.batch_size]], padding=True,
                               truncation=True,
                               max_length=self.max_length, return_tensors="pt")
                h = self.model(**enc).last_hidden_state  # [n, T, D]
                m = enc["attention_mask"][..., None].float()
                e = (h * m).sum(1) / m.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out)


def split_first_sentence(text: str) -> tuple[str, str]:
    parts = _FIRST_SENTENCE.split(text.strip(), maxsplit=1)
    return parts[0], (parts[1] if len(parts) > 1 else "")


class RefusalLabeller:
    """P(refusal) of completions; `fit` on labelled texts, `refusal_prob` on new ones."""

    # C = 10: on the maintainer labels (5 folds by prompt) it held out 0.90 accuracy and 0.74
    # refusal precision on trained policies' completions, against 0.87 and 0.64 at C = 1
    # (docs/data.md); the balanced class weight keeps recall on the rarer refusals.
    def __init__(self, encoder: SentenceEncoder, C: float = 10.0):
        self.encoder = encoder
        self.C = C
        self.clf = None

    def features(self, texts: list[str]) -> np.ndarray:  # [N, 3 D]
        firsts, rests = zip(*(split_first_sentence(t) for t in texts)) if texts else ((), ())
        return np.concatenate([self.encoder(list(texts)), self.encoder(list(firsts)),
                               self.encoder([r or "." for r in rests])], axis=1)

    def fit(self, rows: list[LabelledText],
            features: np.ndarray | None = None) -> "RefusalLabeller":
        from sklearn.linear_model import LogisticRegression

        y = np.array([r.refusal for r in rows])
        if len(set(y.tolist())) < 2:
            raise ValueError("the refusal labeller needs both refusals and non-refusals to learn "
                             "from")
        X = self.features([r.text for r in rows]) if features is None else features
        self.clf = LogisticRegression(C=self.C, max_iter=5000, class_weight="balanced").fit(X, y)
        return self

    def refusal_prob(self, texts: list[str]) -> np.ndarray:  # [N]
        if self.clf is None:
            raise RuntimeError("RefusalLabeller.fit first")
        if not texts:
            return np.zeros(0)
        return self.clf.predict_proba(self.features(list(texts)))[:, 1]

    @classmethod
    def default(cls, cache: str | os.PathLike | None = None,
                with_pyrit: bool = False) -> "RefusalLabeller":
        """Fitted on the maintainer labels (and PyRIT's harmful-prompt refusal labels)."""
        from mogrpo.assets import asset_path, resolve_model_ref

        enc = SentenceEncoder(resolve_model_ref("builtin:all-minilm-l6-v2", cache))
        rows = read_maintainer_labels()
        if with_pyrit:
            rows += read_pyrit_harmful_refusals(asset_path("pyrit-data", cache))
        return cls(enc).fit(rows)


def cross_validate(encoder: SentenceEncoder, held: list[LabelledText],
                   extra: list[LabelledText] = (),
                   folds: int = 5, seed: int = 0) -> dict:
    """Accuracy on `held` rows when each fold is predicted by a labeller fitted on the other
    folds plus `extra` (folds by group, so one prompt's completions share a fold)."""
    import random

    groups = sorted({r.group for r in held})
    random.Random(seed).shuffle(groups)
    fold_of = {g: i % folds for i, g in enumerate(groups)}
    lab = RefusalLabeller(encoder)
    X_held = lab.features([r.text for r in held])
    X_extra = lab.features([r.text for r in extra]) if extra else np.zeros((0, X_held.shape[1]))
    pred = np.zeros(len(held))
    for f in range(folds):
        test = np.array([fold_of[r.group] == f for r in held])
        if not test.any():
            continue
        train_rows = [r for r, t in zip(held, test) if not t] + list(extra)
        X = np.concatenate([X_held[~test], X_extra])
        lab.fit(train_rows, X)
        pred[test] = lab.clf.predict_proba(X_held[test])[:, 1]
    y = np.array([r.refusal for r in held])
    hard = (pred >= 0.5).astype(int)
    tp = int(((hard == 1) & (y == 1)).sum())
    return {"accuracy": float((hard == y).mean()), "n": len(held), "refusals": int(y.sum()),
            "precision_refusal": tp / max(int(hard.sum()), 1),
            "recall_refusal": tp / max(int(y.sum()), 1)}
