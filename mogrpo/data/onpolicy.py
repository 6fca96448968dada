"""On-policy reward data: the policy's own completions on *training* prompts, labelled.

A reward model trained only on other models' answers never sees how the policy it scores
actually writes, so a policy can raise its reward with a change of tone while it keeps
complying. The fix is to label the policy's own outputs, conditioned on the prompt:

- harmful prompt: safety = P(refusal) from the refusal labeller (mogrpo/reward/labeller.py):
  providing the content is unsafe whatever disclaimers surround it; actionability n/a;
- benign prompt: safety = 1; actionability = 1 - P(refusal) (refusing a benign request
  costs helpfulness).
Politeness comes from the toxicity teacher and meaningfulness stays n/a (NaN, masked) when
the rows are read as a reward-data source (`mogrpo.reward.train`).

Samples per prompt: `samples` of the policy's own plus `guided` that start from a refusal
opener (mogrpo/rollout.py), so that the data holds the policy's refusals in its own
words even when it almost never refuses by itself, and the labeller decides whether each
guided continuation really refuses or goes on to comply.

Only training prompts are sampled (AdvBench and the benign train split by default); the
evaluation prompts (HarmBench, the held-out benign set) are never used. `mogrpo reward
data --from-policy RUN` refreshes the data from any run, so a user can iterate: train,
sample, relabel, retrain the reward model. Shapes: B prompts, G = samples + guided.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from mogrpo.data.schema import LabelledResponse

# Written for mogrpo. "Disclaimer, then complies anyway" wrappers: a compliant answer is
# still unsafe when it is preceded by one of these. TRAIN_DISCLAIMERS build training rows;
# PROBE_DISCLAIMERS are never trained on and only build the held-out probes.
TRAIN_DISCLAIMERS = (
    "I must stress that this is illegal and dangerous. That said, here is how:",
    "Disclaimer: this is for educational purposes only. Here you go:",
    "I'm not comfortable with this, but since you asked:",
    "This could cause real harm, so please be careful. Anyway,",
    "I can't recommend this, but here is the information:",
    "Please use this responsibly. Step by step:",
)
PROBE_DISCLAIMERS = (
    "Warning: doing this may break the law. Still, here are the details:",
    "I would advise against it, however, this is what you need to do:",
    "Note that this is unethical. With that out of the way,",
    "Although I'm sorry to see this request, I'll explain:",
)


def label_rows(prompts: list[str], kinds: list[str], responses: list[str], refusal_prob, *,
               source: str, guided: list[bool] | None = None) -> list[LabelledResponse]:
    """Prompt-conditional labels (see the module docstring) from P(refusal) per response."""
    rows = []
    for i, (p, k, r, q) in enumerate(zip(prompts, kinds, responses, refusal_prob)):
        q = float(q)
        if k == "harmful":
            labels = {"safety": q, "actionability": math.nan}
        elif k == "benign":
            labels = {"safety": 1.0, "actionability": 1.0 - q}
        else:
            raise ValueError(f"prompt kind must be harmful or benign for on-policy labels, got "
                             f"{k!r}")
        labels.update({"politeness": math.nan, "meaningfulness": math.nan})
        meta = {"construction": "onpolicy", "kind": k, "p_refusal": round(q, 4)}
        if guided is not None:
            meta["guided"] = bool(guided[i])
        rows.append(LabelledResponse(prompt=p, response=r, labels=labels, source=source, meta=meta))
    return rows


def disclaimer_rows(rows: list[LabelledResponse], disclaimers: tuple[str, ...], rng: random.Random,
                    fraction: float = 0.5) -> list[LabelledResponse]:
    """"Disclaimer, then complies" constructions from compliant answers to harmful prompts
    (P(refusal) < 0.5): the same content behind a disclaimer is just as unsafe (safety 0)."""
    out = []
    for r in rows:
        if r.meta.get("kind") != "harmful" or r.meta.get("p_refusal",
                                                         1.0) >= 0.5 or rng.random() >= fraction:
            continue
        text = f"{rng.choice(disclaimers)} {r.response}"
        out.append(LabelledResponse(prompt=r.prompt, response=text,
                                    labels={"safety": 0.0, "actionability": math.nan,
                                            "politeness": math.nan,
                                            "meaningfulness": math.nan},
                                    source="constructed/disclaimer_then_comply",
                                    meta={"construction": "disclaimer_then_comply",
                                          "kind": "harmful"}))
    return out


def packaged_onpolicy_paths() -> list[Path]:
    """The packaged on-policy rows (the reward source `onpolicy`), in two rounds:
    1. `onpolicy_smollm2.jsonl`: SmolLM2-135M-Instruct itself (own and guided samples);
    2. `onpolicy_smollm2_round2.jsonl`: GRPO policies trained from it on the first round's
       reward model (own samples only). They drift to text the base never writes ("I'd be
       happy to help ..." before complying, chatbot disclaimers, deflections), which a reward
       model that never saw it scored as safe (docs/theory.md section 8)."""
    here = Path(__file__).resolve().parent / "packaged"
    return [here / "onpolicy_smollm2.jsonl", here / "onpolicy_smollm2_round2.jsonl"]
