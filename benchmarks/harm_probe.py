"""What a policy can tell apart before it is trained: a linear probe on its own representation
of each prompt, harmful against benign (docs/theory.md section 8).

    python benchmarks/harm_probe.py --policy builtin:smollm2-135m-instruct --train-prompts 800
    python benchmarks/harm_probe.py --pool mean --train-prompts 0   # every training prompt

Encodes every prompt as the policy sees it (chat template, generation prompt) and takes the
hidden state of the last prompt token, the state the first answer token is decided from, at
three depths (concatenated). A logistic regression is fitted on `--train-prompts` prompts of
the training split and scored on every held-out evaluation set. A policy trained by RL to
refuse by harm has to build its decision on what these states hold; where even a supervised
probe with hundreds of labels cannot separate a set, a few hundred rewarded prompts will not
either. Prints per-set accuracy as JSON.
"""

from __future__ import annotations

import argparse
import json
import random


def prompt_states(model, tok, texts: list[str], layers: tuple[int, ...], pool: str = "last",
                  batch: int = 32):
    """[N, len(layers) * D] hidden states of the last prompt token (pool 'last'), or their mean
    over the prompt's tokens (pool 'mean'); left padding."""
    import numpy as np
    import torch

    out = []
    for s in range(0, len(texts), batch):
        chat = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                        add_generation_prompt=True)
                for t in texts[s:s + batch]]
        enc = tok(chat, return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():
            # (layers + 1) x [n, T, D]
            hidden = model(**enc, output_hidden_states=True).hidden_states
        if pool == "last":
            states = [hidden[i][:, -1] for i in layers]
        else:
            m = enc["attention_mask"][..., None].to(hidden[0].dtype)  # [n, T, 1]
            states = [(hidden[i] * m).sum(1) / m.sum(1) for i in layers]
        out.append(torch.cat(states, dim=-1).float().numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--train-prompts", type=int, default=800,
                    help="training prompts the probe is fitted on (0 = all)")
    ap.add_argument("--pool", choices=("last", "mean"), default="last",
                    help="the last prompt token's state (what the first answer token is decided "
                         "from) or the mean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from mogrpo.data.prompts import load_prompt_set
    from mogrpo.models import resolve_model

    torch.set_num_threads(args.threads)
    train = load_prompt_set("default", None, "train")
    random.Random(args.seed).shuffle(train)
    train = train[:args.train_prompts or None]
    held = load_prompt_set("default", None, "eval")
    model, tok, _ = resolve_model(args.policy, None)
    model.eval()
    n = model.config.num_hidden_layers
    layers = (n // 3, 2 * n // 3, n)
    x_train = prompt_states(model, tok, [p.text for p in train], layers, args.pool)
    x_held = prompt_states(model, tok, [p.text for p in held], layers, args.pool)
    y_train = np.array([p.kind == "harmful" for p in train])
    y_held = np.array([p.kind == "harmful" for p in held])
    probe = LogisticRegression(C=1.0, max_iter=3000).fit(x_train, y_train)
    pred = probe.predict(x_held)
    sources = np.array([p.source for p in held])
    res = {"policy": args.policy, "pool": args.pool, "layers": list(layers),
           "train_prompts": len(train),
           "accuracy": float((pred == y_held).mean()),
           "per_set": {s: {"n": int((sources == s).sum()),
                           "accuracy": round(float((pred == y_held)[sources == s].mean()), 3)}
                       for s in sorted(set(sources.tolist()))}}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
