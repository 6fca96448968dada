"""Checkpoint selection on the validation split, by a criterion fixed before training (pure).

The run engine validates the base policy (step 0) and the policy every `validate_every`
steps and at the last step with the one evaluator (greedy, on the validation prompts:
the training distribution's validation split, never trained on, never a test set), and
keeps the weights of the step `select_step` picks; `final/` is that step. A record is
{"step", "compliance" (harmful prompts answered), "over_refusal" (benign prompts refused),
"degenerate" (completions that stall or collapse, both kinds)}, each a rate in [0, 1].
"""

from __future__ import annotations

# rates are rounded to 5 decimals; a sum such as 0.1 + 0.02 must not flip a constraint
TOLERANCE = 1e-9

CRITERION = ("among the validated steps (step 0 = the base) with validation over-refusal <= "
             "max(max_over_refusal, "
             "the base's over-refusal) and degenerate rate <= the base's + max_degenerate_rise, "
             "the lowest "
             "validation harmful compliance, ties to the earliest step; if no step meets both, "
             "the lowest "
             "over-refusal, ties by compliance, then the earliest step")


def select_step(records: list[dict], base: dict, max_over_refusal: float,
                max_degenerate_rise: float) -> tuple[int, str]:
    """The selected step and one line saying why (pure). Fixed in advance:

    - limits: over_refusal <= max(max_over_refusal, base["over_refusal"]) (a base that
      already over-refuses more than allowed is not made worse), and degenerate <=
      base["degenerate"] + max_degenerate_rise (each within TOLERANCE);
    - among the `records` that meet both limits, the lowest compliance; ties go to the
      earliest step (the one closest to the base);
    - if none meets both, the lowest over_refusal, ties by compliance, then the earliest step.

    `records` are the candidates (the engine passes every validated step, the base's record,
    step 0, among them; the base always meets both limits, so there the fallback never
    applies); `base` only sets the limits.
    """
    if not records:
        raise ValueError("select_step needs at least one validated step")
    over_limit = max(max_over_refusal, base["over_refusal"])
    degenerate_limit = base["degenerate"] + max_degenerate_rise
    feasible = [r for r in records if r["over_refusal"] <= over_limit + TOLERANCE
                and r["degenerate"] <= degenerate_limit + TOLERANCE]
    limits = f"over-refusal <= {over_limit:.4g} and degenerate <= {degenerate_limit:.4g}"
    if feasible:
        best = min(feasible, key=lambda r: (r["compliance"], r["step"]))
        return best["step"], (f"step {best['step']}: the lowest validation compliance "
                              f"({best['compliance']:.4g}) "
                              f"of the {len(feasible)} validated steps with {limits}")
    best = min(records, key=lambda r: (r["over_refusal"], r["compliance"], r["step"]))
    return best["step"], (f"step {best['step']}: no validated step has {limits}; it has the "
                          f"lowest over-refusal "
                          f"({best['over_refusal']:.4g}, compliance {best['compliance']:.4g})")


TUNING_CRITERION = ("each setting's run selects its own checkpoint (the rule above); among the "
                    "settings, the "
                    "one whose selected checkpoint has the lowest validation compliance within "
                    "the same "
                    "over-refusal and degenerate limits, ties to the earlier setting in the list; "
                    "if none is "
                    "within them, the lowest over-refusal")


def select_setting(selected: list[dict], base: dict, max_over_refusal: float,
                   max_degenerate_rise: float) -> tuple[int, str]:
    """Which of an algorithm's tuning runs (e.g. three learning rates) the study keeps (pure).

    `selected[i]` is setting i's selected-checkpoint validation record ({"compliance",
    "over_refusal", "degenerate"}, cost.json's `selection`); `base` is the base policy's
    record. The rule is `select_step`'s, over settings instead of steps, so every algorithm
    is tuned by the same rule and budget and no test set is read. Returns (index, reason)."""
    records = [{**r, "step": i} for i, r in enumerate(selected)]
    i, why = select_step(records, base, max_over_refusal, max_degenerate_rise)
    return i, why.replace(f"step {i}:", f"setting {i}:", 1).replace("validated steps", "settings")
