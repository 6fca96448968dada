"""Prompt forms: the same request as an imperative, a question, a first-person ask with
context, or a polite request, so that a prompt's phrasing never tells its kind.

Why (docs/data.md, "Phrasing carries no label"): every AdvBench behaviour is an imperative
("Write ...", "Create ...") and most of mogrpo's benign prompts were questions ("How do
I ...?"). A policy trained on them learned the shortcut "imperative -> refuse, question ->
answer": it refused a soup recipe and explained a pipe bomb when asked as a question. Here
both kinds go through the *same* rewrite rules with the *same* form distribution.

Two pure steps, written for this project:
- `to_phrase(text)`: the request as a bare verb phrase ("cut an onion without crying"),
  from an imperative ("Cut ...", "Explain how to ...") or a how-question ("How do I ...?",
  "What's the best way to ...?", "Can you ...?"); None when no rule applies (the prompt
  then keeps its own wording).
- `render(phrase, family, key, howto)`: the phrase in one of `FAMILIES`, the template picked
  by a hash of `key` (deterministic on every machine) among those that read well for it.
  `restate(text, key, ...)` does both and
  picks the family by hash too.

The templates never say anything about harm, and every one is used for both kinds; a
context sentence is neutral ("A friend asked me about this last night.").
"""

from __future__ import annotations

import hashlib
import re

FAMILIES = ("imperative", "question", "first_person", "request")

# Written for mogrpo. {b} is a lower-case verb phrase, {B} the same with a capital letter, {C}
# a context sentence. "self" templates have the user do the task ("How can I {b}?"), "task"
# templates ask the assistant to do it ("Can you {b}?"): a how-to phrase ("cut an onion",
# from "How do I cut an onion?") only reads well in the first, and a phrase that names "me"
# ("give me five ideas") only in the second. Every family has both, so every phrase can take
# every family.
TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "imperative": (("task", "{B}."), ("self", "Explain how to {b}."), ("self",
                                                                       "Tell me how to {b}."),
                   ("self", "Give me step-by-step instructions to {b}."), ("self",
                                                                           "Describe how to {b}."),
                   ("self", "Show me how to {b}."), ("task", "{C} {B}.")),
    "question": (("self", "How can I {b}?"), ("self", "How would someone {b}?"), ("self",
                                                                                  "What's the "
                                                                                  "best way to "
                                                                                  "{b}?"),
                 ("task", "Can you {b}?"), ("task", "Could you {b}?"), ("self",
                                                                        "Is there a way to {b}?"),
                 ("self", "Do you know how to {b}?"), ("self", "How do I {b}?"),
                 ("task", "Would you {b}?")),
    "first_person": (("self", "I need to {b}. Where do I start?"), ("self",
                                                                    "I've been asked to {b}. What "
                                                                    "should I do first?"),
                     ("self", "I'm trying to {b}. Any advice?"),
                     ("self", "For a project of mine I have to {b}. How should I go about it?"),
                     ("self", "{C} I want to {b}. What could I do?"), ("self",
                                                                       "{C} How would I {b}?"),
                     ("task", "{C} Could you {b}?"), ("task",
                                                      "I'm stuck on something. Can you {b}?")),
    "request": (("task", "Please {b}."), ("task", "I'd like you to {b}."), ("task",
                                                                            "I want you to {b}."),
                ("self", "Help me {b}."), ("task", "{C} Please {b}."), ("task",
                                                                        "Would you {b} for me?"),
                ("self", "Please help me {b}.")),
}
# Written for mogrpo: neutral context sentences (no hint of intent either way).
CONTEXTS: tuple[str, ...] = (
    "A friend asked me about this last night.", "My neighbour and I were talking about this.",
    "I have a free weekend coming up.", "My brother keeps bringing this up.",
    "This came up at work today.",
    "I've been thinking about this for a while.", "My roommate is curious about it too.",
    "I saw something about this online.",
)

_LEADS = (  # (pattern, how-to?) turning a question or an indirect imperative into the bare phrase
    (re.compile(r"^how (?:do|can|should|would|could|might) (?:i|we|you|one|someone) (.+?)\?*$",
                re.I), True),
    (re.compile(r"^how to (.+?)\?*$", re.I), True),
    (re.compile(r"^what(?:'s| is) the (?:best|easiest|right|quickest|fastest|simplest) "
                r"way to (.+?)\?*$", re.I), True),
    (re.compile(r"^(?:can|could|would) you (?:please )?(.+?)\?*$", re.I), False),
    (re.compile(r"^(?:please )?(?:explain|tell me|show me|describe) how "
                r"(?:to|i can|i should|i would) (.+?)\.*$",
                re.I), True),
    (re.compile(r"^(?:please )?(?:give me step-by-step instructions|give me instructions) "
                r"(?:to|for how to) (.+?)\.*$",
                re.I), True),
)
# Imperative verbs that start a request in AdvBench, PyRIT objectives and mogrpo's benign set.
_VERBS = frozenset(("write create develop provide give teach explain design generate outline "
                    "instruct produce\n"
                    "publish describe show suggest post make offer hack release build draft "
                    "compose demonstrate program train spread\n"
                    "exploit manipulate conduct plan interfere encourage promote steal list name "
                    "summarize summarise translate solve\n"
                    "rewrite recommend calculate work come conjugate tell find help draw compare "
                    "convert prepare organise organize\n"
                    "share send craft guide detail compile devise invent construct deliver set "
                    "pick choose").split())
# "can you ..." phrases that address the assistant
_BAD_PHRASE = re.compile(r"\b(you|your|yourself)\b", re.I)


def parse(text: str) -> tuple[str, bool] | None:
    """(the request as a lower-case verb phrase, whether it is a how-to the user will do), or
    None when no rule applies (pure)."""
    t = " ".join(text.strip().split())
    if not t or "\n" in text.strip() or len(t) > 300:
        return None
    for pattern, howto in _LEADS:  # noqa: B007 -- howto is read after the loop
        m = pattern.match(t)
        if m:
            phrase = m.group(1).strip().rstrip(".?!")
            break
    else:
        first = t.split()[0].lower()
        if first not in _VERBS or t.endswith("?"):
            return None
        phrase, howto = t.rstrip(".!"), False
    if not phrase or _BAD_PHRASE.search(phrase) or phrase.count("?") or len(phrase.split()) < 2:
        return None
    return phrase[0].lower() + phrase[1:], howto


def to_phrase(text: str) -> str | None:
    """The request as a lower-case verb phrase, or None when no rule applies (pure)."""
    parsed = parse(text)
    return parsed[0] if parsed else None


def _pick(key: str, salt: str, n: int) -> int:
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:8], 16) % n


_NAMES_ME = re.compile(r"\bme\b", re.I)


def render(phrase: str, family: str, key: str, howto: bool = False) -> str:
    """`phrase` in the given form family, its template (and context) chosen by hash of `key`
    among those that read well for it: a how-to phrase takes "self" templates only, a phrase
    that names "me" "task" templates only, any other phrase either."""
    if family not in TEMPLATES:
        raise ValueError(f"unknown prompt form {family!r}; choose one of {FAMILIES}")
    allowed = ("self",) if howto else ("task",) if _NAMES_ME.search(phrase) else ("self", "task")
    options = [t for kind, t in TEMPLATES[family] if kind in allowed]
    template = options[_pick(key, family, len(options))]
    context = CONTEXTS[_pick(key, "context", len(CONTEXTS))]
    return template.format(b=phrase, B=phrase[0].upper() + phrase[1:], C=context)


def family_of(key: str, seed: int = 0) -> str:
    """The form family assigned to `key` (uniform over FAMILIES by hash)."""
    return FAMILIES[_pick(key, f"family{seed}", len(FAMILIES))]


def restate(text: str, key: str, seed: int = 0, family: str | None = None) -> tuple[str, str]:
    """(new text, family): `text` in the family picked for `key` (or the one given), or
    (text, "original") unchanged when `to_phrase` finds no phrase."""
    parsed = parse(text)
    if parsed is None:
        return text, "original"
    fam = family or family_of(key, seed)
    return render(parsed[0], fam, f"{seed}:{key}", howto=parsed[1]), fam


def form_of(text: str) -> str:
    """Coarse surface form of a prompt, for checking that form does not predict kind:
    'question' (ends with '?'), 'first_person' (starts with I/My/I'm/I've), else 'imperative'."""
    t = text.strip()
    if t.endswith("?"):
        return "question"
    if re.match(r"^(i|my|i'm|i've|i'd|for a project)\b", t, re.I):
        return "first_person"
    return "imperative"
