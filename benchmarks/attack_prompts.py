"""Long prompts for the speed benchmarks: training prompts wrapped in PyRIT's jailbreak templates.

    python benchmarks/attack_prompts.py [--out benchmarks/results/attack_prompts.jsonl]
                                        [--min-tokens 300] [--max-tokens 600] [--n 64]

A benchmark input, not training data: it gives the prompt lengths of attack prompts (the
jailbreak templates of hundreds of tokens that the safety issue trains on) so that a GRPO
step can be timed on them. Each of the first `--n` training prompts (half harmful, half
benign: a template must not mean "refuse") is wrapped in a template drawn with a fixed
seed among PyRIT's single-turn templates whose rendered chat prompt, in the default
policy's tokenizer, has `--min-tokens` to `--max-tokens` tokens. The templates come from
the PyRIT 1.1.0 wheel (MIT) through mogrpo's `pyrit-data` asset (mogrpo/data/attacks.py),
all families (the training set keeps families apart; this input does not need to).
Rows: {"id", "text", "kind", "template", "tokens"}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def build(n: int, min_tokens: int, max_tokens: int, cache=None, seed: int = 0) -> list[dict]:
    from mogrpo.assets import asset_path
    from mogrpo.data.attacks import read_templates, render
    from mogrpo.data.prompts import load_prompt_set
    from mogrpo.models import load_tokenizer, resolve_policy_path
    from mogrpo.rollout import chat_texts

    tok = load_tokenizer(resolve_policy_path("builtin:smollm2-135m-instruct", cache))
    # direct prompts
    pool = [p for p in load_prompt_set("default", cache, "train") if p.request is None]
    by_kind = {k: [p for p in pool if p.kind == k] for k in ("harmful", "benign")}
    chosen = [p for pair in zip(by_kind["harmful"], by_kind["benign"]) for p in pair][:n]
    names = [(t.name, t) for t in read_templates(asset_path("pyrit-data", cache))]
    rng = random.Random(seed)
    rows = []
    for p in chosen:
        for name, template in rng.sample(names, len(names)):
            text = render(template, p.text)
            tokens = len(tok(chat_texts(tok, [text])[0], add_special_tokens=False)["input_ids"])
            if min_tokens <= tokens <= max_tokens:
                rows.append({"id": f"{p.id}@{name}", "text": text, "kind": p.kind, "template": name,
                             "tokens": tokens})
                break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out",
                    default=str(Path(__file__).parent / "results" / "attack_prompts.jsonl"))
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
