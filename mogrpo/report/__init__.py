"""The comparison report of a `mogrpo run` folder: report.md, report.json and plots/*.png
(write_report); the same report of any set of standalone policy runs (write_runs_report,
`mogrpo report RUN [RUN ...] --output DIR`: a row per run, named by its folder, from its
eval_after.json, cost.json and metrics.jsonl, and the first run's eval_before.json as the base).

Reads RUN/eval/<model>/eval.json (+ generations.jsonl) for base and each algorithm,
RUN/<algo>/cost.json and RUN/<algo>/metrics.jsonl. Writes one table (a row per model,
a column per metric, the best value of each column in bold), a verdict per algorithm
against the base policy stated plainly, the cost comparison, example completions side by
side, and five plots.

With several seeds (`seeds`; folders `<algo>-s<seed>`, see algo_stage) each
algorithm's headline figure reads `mean (min–max, n seeds)` over its seeds, report.json holds
every seed's values (`per_seed`, `spread`), and a ranking between two algorithms on harmful
compliance or over-refusal is stated only where their min–max ranges do not overlap
(`rank_by_ranges`). The base policy is one evaluation, shared by every seed. Sections that
show one number per algorithm (all metrics, reward-hacking check, verdicts, cost) use the
seed-wise means and say so; the examples are the first seed's.

The package: rows.py (columns, a model's row, best values, verdicts, the reward-hacking check),
seeds.py (means, spreads and rankings over seeds), sections.py (the markdown sections),
plots.py (the plots) and write.py (write_report, which puts them together). Every public name
is importable from `mogrpo.report`.
"""

from mogrpo.report.plots import make_plots
from mogrpo.report.rows import (
    ALARM_CHECKS,
    COST,
    COST_KEYS,
    HEADLINE,
    INDEPENDENT,
    RANKED,
    SET_RATES,
    SHAPE,
    algo_stage,
    best_per_column,
    columns_for,
    hacking_alarm,
    headline_for,
    model_row,
    set_columns,
    verdict,
)
from mogrpo.report.sections import judge_agreement, spread_cell
from mogrpo.report.seeds import mean_row, rank_by_ranges, spread_of
from mogrpo.report.write import run_evaluation, write_report, write_runs_report

__all__ = ["ALARM_CHECKS", "COST", "COST_KEYS", "HEADLINE", "INDEPENDENT", "RANKED", "SET_RATES",
           "SHAPE", "algo_stage", "best_per_column", "columns_for", "hacking_alarm", "headline_for",
           "judge_agreement", "make_plots", "mean_row", "model_row", "rank_by_ranges",
           "run_evaluation",
           "set_columns", "spread_cell", "spread_of", "verdict", "write_report",
           "write_runs_report"]
