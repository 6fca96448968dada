"""Long prompts for the speed benchmarks: training prompts wrapped in PyRIT's jailbreak templates.

    python benchmarks/attack_prompts.py [--out benchmarks/results/attack_prompts.jsonl]
                                        [--min-tokens 300] [--max-tokens 600] [--n 64]

A benchmark input, not training data: it gives the prompt lengths of attack prompts (the
jailbreak templates of hundreds of tokens that the safety issue trains on) so that a GRPO
step can be timed on them. Each of the first `--n` training prompts (half harmful, half
benign: a template must not mean "refuse") is wrapped in a template drawn with a fixed
seed among PyRIT's single-turn templates whose rendered chat prompt, in the default
policy's tokenizer, has `--min-tokens` to `--max-tokens` tokens. The templates come from
the PyRIT 1.1.0 wheel (MIT), the same wheel mogrpo's `pyrit-data` asset is cut from,
downloaded with pip into mogrpo's cache the first time (PyPI must be reachable once).
Rows: {"id", "text", "kind", "template", "tokens"}.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import zipfile
from pathlib import Path

TEMPLATES = "pyrit/datasets/jailbreak/templates/"
SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")


def templates(cache) -> dict[str, str]:
    """name -> template text with one `{{ prompt }}` slot, from the PyRIT wheel."""
    import yaml

    from mogrpo.assets import ASSETS, _download_wheel, cache_dir

    asset = ASSETS["pyrit-data"]
    folder = cache_dir(cache) / "wheels"
    wheel = folder / asset.wheel
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        wheel = _download_wheel(asset, folder)
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if not (name.startswith(TEMPLATES) and name.endswith(".yaml")) or "/multi_parameter/" in name:
                continue
            doc = yaml.safe_load(z.read(name))
            value = doc.get("value") if isinstance(doc, dict) else None
            if isinstance(value, str) and len(SLOT.findall(value)) == 1 and doc.get("parameters") == ["prompt"]:
                out[name[len(TEMPLATES):-len(".yaml")]] = value
    return out


def build(n: int, min_tokens: int, max_tokens: int, cache=None, seed: int = 0) -> list[dict]:
    import jinja2

    from mogrpo.data.prompts import load_prompt_set
    from mogrpo.models import load_tokenizer, resolve_policy_path
    from mogrpo.rollout import chat_texts

    tok = load_tokenizer(resolve_policy_path("builtin:smollm2-135m-instruct", cache))
    pool = load_prompt_set("default", cache, "train")
    by_kind = {k: [p for p in pool if p.kind == k] for k in ("harmful", "benign")}
    chosen = [p for pair in zip(by_kind["harmful"], by_kind["benign"]) for p in pair][:n]
    names = sorted(templates(cache).items())
    rng = random.Random(seed)
    rows = []
    for p in chosen:
        for name, value in rng.sample(names, len(names)):
            text = jinja2.Template(value).render(prompt=p.text).strip()  # PyRIT's templates are Jinja
            tokens = len(tok(chat_texts(tok, [text])[0], add_special_tokens=False)["input_ids"])
            if min_tokens <= tokens <= max_tokens:
                rows.append({"id": f"{p.id}@{name}", "text": text, "kind": p.kind, "template": name,
                             "tokens": tokens})
                break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attack_prompts.jsonl"))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--min-tokens", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=600)
    a = ap.parse_args()
    rows = build(a.n, a.min_tokens, a.max_tokens)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = sorted(r["tokens"] for r in rows)
    print(f"{len(rows)} prompts ({sum(r['kind'] == 'harmful' for r in rows)} harmful), "
          f"{len({r['template'] for r in rows})} templates, chat tokens min {lengths[0]} "
          f"median {lengths[len(lengths) // 2]} max {lengths[-1]} -> {out}")


if __name__ == "__main__":
    main()
