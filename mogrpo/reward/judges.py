"""Judges that do not come from the training reward model.

`ToxicityJudge` wraps alt-profanity-check's scikit-learn model (TF-IDF features and a
calibrated linear SVM), read from the cached asset's joblib files rather than by importing
the package, so its own pins never enter our environment. It serves twice: as the teacher
for the politeness labels of the default reward data, and later as an independent judge.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

# Sentence ends (., !, ? followed by space) and line breaks.
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


class ToxicityJudge:
    def __init__(self, data_dir: str | os.PathLike):
        import joblib

        data_dir = Path(data_dir)
        try:
            with warnings.catch_warnings():
                # The pickles were written by a nearby scikit-learn release; the pinned one loads them.
                warnings.simplefilter("ignore")
                self.vectorizer = joblib.load(data_dir / "vectorizer.joblib")
                self.model = joblib.load(data_dir / "model.joblib")
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc.filename}: the toxicity judge's files are missing; run `mogrpo assets`") from exc

    @classmethod
    def from_cache(cls, cache: str | os.PathLike | None = None) -> "ToxicityJudge":
        from mogrpo.assets import asset_path

        return cls(asset_path("profanity-check", cache) / "data")

    def toxicity(self, texts: list[str]) -> np.ndarray:
        """Probability in [0, 1] that each whole text is offensive. [N]"""
        if not texts:
            return np.zeros(0)
        return self.model.predict_proba(self.vectorizer.transform(list(texts)))[:, 1]

    def max_sentence_toxicity(self, texts: list[str]) -> np.ndarray:
        """The toxicity of each text's most offensive sentence. [N]

        The classifier is a bag of words, so one insult inside a long, otherwise civil
        answer is diluted to a low whole-text score; judging sentence by sentence and
        keeping the worst makes "an insult anywhere is impolite" hold at any length.
        """
        if not texts:
            return np.zeros(0)
        pieces, owner = [], []
        for i, text in enumerate(texts):
            sentences = [s for s in _SENTENCE_SPLIT.split(text) if s.strip()] or [text]
            pieces += sentences
            owner += [i] * len(sentences)
        scores = self.toxicity(pieces)
        out = np.zeros(len(texts))
        np.maximum.at(out, np.asarray(owner), scores)
        return out

    def politeness(self, texts: list[str]) -> np.ndarray:
        """1 - the toxicity of the most offensive sentence. [N]"""
        return 1.0 - self.max_sentence_toxicity(texts)
