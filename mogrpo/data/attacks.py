"""Attack prompts: requests wrapped in jailbreak templates, split so that nothing held out
was trained on, neither the request nor the template's family.

The templates are PyRIT 1.1.0's single-prompt jailbreak templates (MIT; the collection
gathers jailbreakchat.com prompts, TrustAIRLab's in-the-wild prompts, Pliny's prompts, the
"Jailbroken" and "Wolf in Sheep's Clothing" papers' attacks and more; each YAML names its
source), read from the `pyrit-data` asset. A template holds one `{{ prompt }}` slot and is
rendered with Jinja in a sandbox.

**Families.** Templates are variants of one another far more often than their names say
(DAN 5, 6, 8, 9, 11 and dozens of in-the-wild copies). A family is the union of:
- a name rule: `dan_1` and `dan_11` are `dan`, `dev_mode_compact` is `dev_mode`, and every
  template of an author's folder (`pliny/...`, `Arth_Singh/...`) is one family;
- near-duplicates: two templates sharing half the word 5-grams of the shorter one are in one
  family (union-find over an inverted index of 5-grams).
Families are split by a hash of their name (`TEMPLATE_SPLIT`), so a held-out template is
never a light edit of a trained one.

**Requests.** The same behaviour partition as the direct prompts (`mogrpo.data.splits`):
AdvBench training behaviours and benign training prompts are wrapped for training; the
held-out AdvBench behaviours and benign validation prompts for validation; HarmBench and the
benign test prompts for test. Benign requests are wrapped in the same templates as harmful
ones, in equal numbers, so that a template never means "refuse".

**Length.** A template costs prefill and training tokens on every sample; `max_chars`
(default 1,200 characters of template, about 300 tokens) keeps the rendered prompts within
what the CPU main job affords (docs/data.md).
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from mogrpo.data.default_rm import split_of
from mogrpo.data.schema import DataError, PromptRecord

TEMPLATE_SPLIT = (0.6, 0.2, 0.2)  # template families: train / validation / test
MAX_CHARS = 1200
PER_REQUEST = {"train": 3, "validation": 1, "test": 1}  # templates per harmful request
# Share of a part's harmful requests that are wrapped (by hash). Validation runs every 10
# steps of every algorithm; all 82 held-out AdvBench behaviours wrapped tripled its time
# (docs/data.md), half of them keeps it within the main job's hour.
REQUEST_SHARE = {"train": 1.0, "validation": 0.5, "test": 1.0}
SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")
_SUFFIX = re.compile(r"(_\d+|_compact|_ranti)+$")
_AUTHOR_FOLDERS = ("pliny", "Arth_Singh")
_WORD = re.compile(r"\w+")
SHINGLE = 5
NEAR_DUPLICATE = 0.5  # shared 5-grams / the shorter template's 5-grams
_COMMON = 40  # a 5-gram in more templates than this is boilerplate, not kinship


@dataclass(frozen=True)
class Template:
    name: str  # path under jailbreak_templates/, without .yaml
    text: str
    source: str
    family: str = ""


def templates_dir(pyrit_dir: str | os.PathLike) -> Path:
    return Path(pyrit_dir) / "jailbreak_templates"


def read_templates(pyrit_dir: str | os.PathLike) -> list[Template]:
    """Every single-prompt template (one `{{ prompt }}` slot, parameters [prompt]), sorted by
    name."""
    root = templates_dir(pyrit_dir)
    files = sorted(root.rglob("*.yaml"))
    if not files:
        raise DataError(f"{root}: no jailbreak templates; the pyrit-data asset predates them. "
                        "Run `mogrpo assets` (it unpacks them again from the cached wheel)")
    out = []
    for path in files:
        name = path.relative_to(root).with_suffix("").as_posix()
        if name.startswith("multi_parameter/"):
            continue
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise DataError(f"{path}: cannot read the template ({exc})") from exc
        value = doc.get("value") if isinstance(doc, dict) else None
        if (not isinstance(value, str) or len(SLOT.findall(value)) != 1
                or doc.get("parameters") != ["prompt"]):
            continue
        out.append(Template(name=name, text=value, source=str(doc.get("source") or "")))
    return out


def _name_family(name: str) -> str:
    head = name.split("/")[0]
    if head in _AUTHOR_FOLDERS:
        return head
    return _SUFFIX.sub("", name)


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = _WORD.findall(SLOT.sub(" ", text.lower()))
    return {tuple(words[i:i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}


def assign_families(templates: list[Template]) -> list[Template]:
    """Each template with its family: name rule + near-duplicate union (module docstring).
    The family's name is its alphabetically first member's name rule, so it is stable."""
    parent = list(range(len(templates)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first: dict[str, int] = {}
    for i, t in enumerate(templates):
        union(first.setdefault(_name_family(t.name), i), i)
    grams = [_shingles(t.text) for t in templates]
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, g in enumerate(grams):
        for s in g:
            index[s].append(i)
    shared: Counter = Counter()
    for members in index.values():
        if len(members) <= _COMMON:
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    shared[members[a], members[b]] += 1
    for (i, j), n in shared.items():
        if n >= NEAR_DUPLICATE * min(len(grams[i]), len(grams[j])):
            union(i, j)
    names: dict[int, str] = {}
    for i in sorted(range(len(templates)), key=lambda k: templates[k].name):
        names.setdefault(find(i), _name_family(templates[i].name))
    return [replace(t, family=names[find(i)]) for i, t in enumerate(templates)]


def render(template: Template, request: str) -> str:
    """The template with `request` in its slot (PyRIT's templates are Jinja; rendered in a
    sandbox)."""
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment().from_string(template.text).render(prompt=request).strip()


@dataclass
class AttackSet:
    train: list[PromptRecord]
    validation: list[PromptRecord]
    test: list[PromptRecord]
    templates: dict[str, list[Template]]  # part -> the templates it draws from
    skipped: dict[str, int]  # why templates were left out -> how many


def wrap(requests: list[PromptRecord], templates: list[Template], per_request: int, key: str,
         source: str) -> list[PromptRecord]:
    """Each request in `per_request` distinct templates chosen by hash (deterministic).
    The record keeps the bare request in `request` (judges and reward models compare the
    answer with it) and names the template in its id: `{request id}@{template}`."""
    chosen = [random.Random(f"{key}:{p.id}").sample(templates, min(per_request, len(templates)))
              for p in requests]
    # rank-major order: every request's first template, then every second one, ... so that a
    # caller who keeps a prefix keeps each request about equally often
    return [PromptRecord(id=f"{p.id}@{ts[k].name}", text=render(ts[k], p.text), kind=p.kind,
                         source=f"{source}-{p.kind}", category=p.category, request=p.text)
            for k in range(per_request) for p, ts in zip(requests, chosen) if k < len(ts)]


def attack_set(pyrit_dir: str | os.PathLike, requests: dict[str, list[PromptRecord]], *,
               seed: int = 0,
               max_chars: int = MAX_CHARS, per_request: dict[str, int] | None = None,
               benign_share: dict[str, float] | None = None,
               request_share: dict[str, float] | None = None) -> AttackSet:
    """Wrap each part's requests (`requests[part]`, part = train | validation | test, each
    holding harmful and benign records as written) in templates of that part's families.
    Harmful requests get `per_request[part]` templates each. The benign requests of a part
    are wrapped `benign_share[part]` times as often in all as its harmful ones (default 1:
    equal numbers); the training split sets it so that each kind's pool holds the same share
    of attack prompts, because training samples the kinds evenly. Only `request_share[part]`
    of a part's harmful requests are wrapped, chosen by a hash of their id (REQUEST_SHARE)."""
    per = {**PER_REQUEST, **(per_request or {})}
    share = {**REQUEST_SHARE, **(request_share or {})}
    skipped: Counter = Counter()
    usable = []
    for t in assign_families(read_templates(pyrit_dir)):
        if len(t.text) > max_chars:
            skipped[f"longer than {max_chars} characters"] += 1
            continue
        try:
            render(t, "x")
        except Exception:  # noqa: BLE001 - jinja's errors vary; a template that cannot render is left out
            skipped["does not render"] += 1
            continue
        usable.append(t)
    by_part: dict[str, list[Template]] = {"train": [], "validation": [], "test": []}
    for t in usable:
        by_part[split_of(f"family:{t.family}", seed, TEMPLATE_SPLIT)].append(t)
    out: dict[str, list[PromptRecord]] = {}
    for part, temps in by_part.items():
        harmful = [p for p in requests.get(part, []) if p.kind == "harmful"
                   and split_of(f"wrap:{p.id}", seed, (share[part], 1.0 - share[part],
                                                       0.0)) == "train"]
        benign = [p for p in requests.get(part, []) if p.kind == "benign"]
        wrapped = wrap(harmful, temps, per[part], f"{seed}:{part}", "attack")
        n_benign = round(per[part] * len(harmful) * (benign_share or {}).get(part, 1.0))
        k = -(-n_benign // len(benign)) if benign else 0  # ceil: templates per benign request
        wrapped += wrap(benign, temps, k, f"{seed}:{part}", "attack")[:n_benign] if k else []
        out[part] = wrapped
    return AttackSet(train=out["train"], validation=out["validation"], test=out["test"],
                     templates=by_part,
                     skipped=dict(skipped))
