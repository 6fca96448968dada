"""Reward functions for the example task, in TRL's signature: f(prompts, completions,
**columns) -> one float (or None: not applicable) per completion. `columns` holds the prompt
rows' other columns, one list per name: here `keywords`."""

import re


def _text(completion) -> str:
    # plain prompts give strings; conversational prompts give [{"role": "assistant", ...}]
    return completion if isinstance(completion, str) else completion[0]["content"]


def on_topic(prompts, completions, keywords, **columns):
    """Share of the row's keywords the reply mentions (None for a row without keywords)."""
    out = []
    for completion, words in zip(completions, keywords):
        if not words:
            out.append(None)
            continue
        text = _text(completion).lower()
        out.append(sum(w.lower() in text for w in words) / len(words))
    return out


def brief(prompts, completions, **columns):
    """1 up to 60 words, then falling linearly to 0 at 120 words."""
    return [max(0.0, min(1.0, (120 - len(_text(c).split())) / 60)) for c in completions]


def no_shouting(prompts, completions, **columns):
    """0 when the reply has a run of three upper-case words or '!!', else 1."""
    loud = re.compile(r"(\b[A-Z]{2,}\b\W+){2}\b[A-Z]{2,}\b|!!")
    return [0.0 if loud.search(_text(c)) else 1.0 for c in completions]
