"""`mogrpo reward score`: score the (prompt, response) pairs of a JSONL file with a reward
model and write each line back with its scores."""

from __future__ import annotations

import json
import os

from mogrpo.config import atomic_write_text
from mogrpo.data.loaders import iter_jsonl
from mogrpo.data.schema import DataError


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL file, each a mapping with string fields 'prompt' and 'response'
    (a DataError naming the line otherwise); other fields are kept."""
    rows = []
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("response"), str):
            raise DataError(f"{where}: each line needs string fields 'prompt' and 'response'")
        rows.append(row)
    return rows


def score_file(model: str | os.PathLike, source: str | os.PathLike, output: str | os.PathLike, *,
               batch_size: int = 64, device: str = "auto", threads: int = 0) -> dict:
    """Score every (prompt, response) line of `source` with the reward model folder `model` and
    write `output`: each input line plus 'scores': {aspect: value}. `device` is auto (cuda when
    there is one), cpu or cuda; `threads` sets torch's CPU threads (0 = its default). The
    output path and `source` are checked before the model is loaded. Returns {rows, aspects,
    truncated (pairs cut to max_length tokens), max_length}."""
    from mogrpo.runfolder import check_output_file

    check_output_file(output)  # before any work
    rows = read_pairs(source)
    import torch

    from mogrpo.reward.model import MultiAspectRewardModel

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rm = MultiAspectRewardModel.load(model, device=device)
    if threads:
        torch.set_num_threads(threads)
    scores, n_trunc = rm.score([r["prompt"] for r in rows], [r["response"] for r in rows],
                               batch_size=batch_size, return_truncated=True)
    lines = []
    for row, s in zip(rows, scores.tolist(), strict=True):
        scored = {**row, "scores": {a: round(v, 6) for a, v in zip(rm.aspects, s, strict=True)}}
        lines.append(json.dumps(scored, ensure_ascii=False) + "\n")
    atomic_write_text(output, "".join(lines))
    return {"rows": len(rows), "aspects": list(rm.aspects), "truncated": n_trunc,
            "max_length": rm.spec.max_length}
