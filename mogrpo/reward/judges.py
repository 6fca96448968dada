"""Judges that do not come from the training reward model.

`ToxicityJudge` wraps alt-profanity-check's scikit-learn model (TF-IDF features and a
calibrated linear SVM), read from the cached asset's joblib files rather than by importing
the package, so its own pins never enter our environment. It serves twice: as the teacher
for the politeness labels of the default reward data, and later as an independent judge.

joblib files are pickles, and unpickling runs code. The default asset's two files are
checked against their pinned sha256 before they are unpickled (`from_cache`); a folder a
user names is loaded only with `trusted=True` (`trust_toxicity_model: true` in the eval
config), with a warning.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np

# sha256 of the alt-profanity-check 1.9.1 files (the pinned wheel's), checked before unpickling.
ASSET_SHA256 = {
    "vectorizer.joblib": "19c5200dc6a41f026e0558e2f164f5fe8d8f58e502b46b37e4385037fcfa4831",
    "model.joblib": "aeafc04849d4d93db4721cf30a86ebf22085595294b8a07d51918e7fa98f538b"}


class UntrustedModelError(ValueError):
    """A pickled model was not loaded because nothing vouches for it."""


# Sentence ends (., !, ? followed by space) and line breaks.
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


class ToxicityJudge:
    def __init__(self, data_dir: str | os.PathLike, *, sha256: dict[str, str] | None = None,
                 trusted: bool = False):
        """Load vectorizer.joblib + model.joblib from `data_dir`: only when each file's digest
        equals `sha256`'s, or when the caller vouches for the folder (`trusted`)."""
        import hashlib

        import joblib

        data_dir = Path(data_dir)
        files = ("vectorizer.joblib", "model.joblib")
        missing = [f for f in files if not (data_dir / f).is_file()]
        if missing:
            fix = ("run `mogrpo assets`" if sha256
                   else "point toxicity_model at a folder holding both, or drop it")
            raise FileNotFoundError(f"{data_dir}: the toxicity judge needs {' and '.join(files)}; "
                                    f"missing "
                                    f"{', '.join(missing)} ({fix})")
        if sha256:
            for f in files:
                digest = hashlib.sha256((data_dir / f).read_bytes()).hexdigest()
                if digest != sha256[f]:
                    raise UntrustedModelError(f"{data_dir / f}: sha256 {digest[:16]}... is not "
                                              f"the pinned "
                                              f"{sha256[f][:16]}...; the cached file was changed, "
                                              f"so it is not "
                                              f"unpickled. Delete {data_dir.parent} and run "
                                              f"`mogrpo assets`")
        elif not trusted:
            raise UntrustedModelError(f"toxicity_model {data_dir}: its .joblib files are pickles, "
                                      f"and loading a "
                                      f"pickle runs any code it holds. Set "
                                      f"trust_toxicity_model=true if you made "
                                      f"or trust this folder (or drop toxicity_model to use the "
                                      f"verified default)")
        else:
            print(f"warning: loading pickled toxicity model files from {data_dir} "
                  f"(trust_toxicity_model=true): "
                  f"they can run code; use only folders you trust", file=sys.stderr)
        with warnings.catch_warnings():
            # The pickles were written by a nearby scikit-learn release; the pinned one loads them.
            warnings.simplefilter("ignore")
            self.vectorizer = joblib.load(data_dir / "vectorizer.joblib")
            self.model = joblib.load(data_dir / "model.joblib")

    @classmethod
    def from_cache(cls, cache: str | os.PathLike | None = None) -> "ToxicityJudge":
        """The default judge: the alt-profanity-check asset, verified by its pinned digests."""
        from mogrpo.assets import asset_path

        return cls(asset_path("profanity-check", cache) / "data", sha256=ASSET_SHA256)

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
