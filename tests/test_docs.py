"""The commands the docs show exist: every `mogrpo ...` command in README.md and docs/*.md
(shell code blocks, and inline code spans) names a subcommand of mogrpo.cli.build_parser,
only flags of that subcommand, and `key=value` overrides that name fields (or TRL aliases) of
that command's config class; YAML files given to --config exist. A code block's command must
also parse as a whole (required flags included). The README's time estimates are the code's.

Placeholders are allowed: `...`, UPPER-CASE words (DIR, RUN, FILE.jsonl), `<name>`, optional
groups in brackets (`[key=value ...]`, `[--prompts P.jsonl]`: a group that starts with a
flag is checked as if given), alternatives `ppo|dpo|rloo` and `configs/{ppo,dpo}/x.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from mogrpo.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console"}
# a fenced code block (indented ones inside list items too): its language, its text
FENCE = re.compile(r"^[ \t]*```([\w-]*)[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
# The config class of each command that takes key=value overrides ("module:name"; `train ALGO`
# comes from the registry, `run` from pipeline.run_config_class)
CONFIGS = {("reward", "train"): "mogrpo.reward.train:RewardTrainConfig",
           ("eval",): "mogrpo.eval.harness:EvalConfig",
           ("sweep",): "mogrpo.rl.grpo:GRPOConfig"}
EVAL_CONFIG = "mogrpo.eval.harness:EvalConfig"


@dataclass
class Command:
    where: str  # file:line
    text: str  # as written
    argv: list[str]  # the tokens after `mogrpo` (or `-m mogrpo.cli`)
    block: bool  # from a shell code block (parsed as a whole too)


def _blocks(text: str):
    """(line number, shell code) of each fenced shell block, continuation lines joined."""
    for m in re.finditer(FENCE, text):
        if m.group(1).lower() not in SHELL:
            continue
        first = text.count("\n", 0, m.start(2)) + 1
        lines, start = [], None
        for i, line in enumerate(m.group(2).splitlines()):
            start = first + i if start is None else start
            if line.rstrip().endswith("\\"):
                lines.append(line.rstrip()[:-1])
                continue
            yield start, " ".join([*lines, line])
            lines, start = [], None


def _start(tokens: list[str]) -> int | None:
    """The index after `mogrpo` / `-m mogrpo.cli` in a shell line's tokens, or None."""
    for i, tok in enumerate(tokens):
        if tok == "mogrpo" and (i == 0 or tokens[i - 1] in ("&&", ";", "|", "time")):
            return i + 1
        if tok == "mogrpo.cli" and i > 0 and tokens[i - 1] == "-m":
            return i + 1
    return None


def _cut(tokens: list[str]) -> list[str]:
    """Up to the end of the command (a pipe, a redirection, the next command)."""
    for i, tok in enumerate(tokens):
        if tok in ("|", "&&", ";", "||") or tok.startswith((">", "2>")):
            return tokens[:i]
    return tokens


def _unbracket(text: str) -> str:
    """Optional groups: `[--flag VALUE]` becomes `--flag VALUE`, `[key=value ...]` and the like
    go; values in brackets (`seeds=[0,1,2]`, `'data=[a, b]'`) stay."""
    def repl(m: re.Match) -> str:
        inner = m.group(1).strip()
        return " " + inner if inner.startswith("-") and "..." not in inner else " "
    return re.sub(r"(?:^|(?<=\s))\[([^\[\]]*)\]", repl, text)


def _commands() -> list[Command]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT).as_posix()
        spans = set()
        for line_no, line in _blocks(text):
            tokens = shlex.split(line, comments=True)
            i = _start(tokens)
            if i is not None:
                found.append(Command(f"{name}:{line_no}", line.strip(), _cut(tokens[i:]), True))
        # inline code spans outside fenced blocks
        prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for m in re.finditer(r"`(mogrpo (?:[^`]|\n)+?)`", prose):
            line_no = prose.count("\n", 0, m.start()) + 1
            span = " ".join(m.group(1).split())
            if (line_no, span) in spans:
                continue
            spans.add((line_no, span))
            found.append(Command(f"{name}:{line_no}", span,
                                 shlex.split(_unbracket(span))[1:], False))
    return found


COMMANDS = _commands()


def _param(cmd: Command):
    return pytest.param(cmd, id=f"{cmd.where} mogrpo {' '.join(cmd.argv)}"[:120])


def _placeholder(tok: str) -> bool:
    return (tok in ("...", "…") or tok.startswith("<") or bool(re.search(r"[A-Z]{2,}", tok))
            or tok.endswith("..."))


def _subparsers(parser: argparse.ArgumentParser):
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _class(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _keys(cls) -> set[str]:
    """A config class's field names and alias names."""
    return {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "ALIASES", {}))


def _check_key(key: str, path: tuple[str, ...], run_algorithms: list[str]) -> str | None:
    """What is wrong with override `key` (dotted: its first part) for the command `path`."""
    from mogrpo.rl.registry import ALGORITHMS, algorithm

    if path[:1] == ("train",):
        cls = algorithm(path[1]).config_class()
    elif path == ("run",):
        from mogrpo.eval.harness import EvalConfig
        from mogrpo.pipeline import run_config_class
        from mogrpo.reward.train import RewardTrainConfig

        head, _, rest = key.partition(".")
        if head not in _keys(run_config_class()):
            return f"{head!r} is not a key of `mogrpo run` ({sorted(_keys(run_config_class()))})"
        if not rest:
            return None
        inner = rest.partition(".")[0]
        if head in ("reward", "evaluator_reward"):
            classes = [RewardTrainConfig]
        elif head == "eval":
            classes = [EvalConfig]
        elif head == "common":
            classes = [algorithm(a).config_class() for a in run_algorithms]
        elif head == "tune":  # tune.ALGO or tune.ALGO.KEY
            if inner not in ALGORITHMS:
                return f"tune.{inner}: {inner!r} is not an algorithm"
            classes, inner = [algorithm(inner).config_class()], rest.partition(".")[2]
            if not inner:
                return None
            inner = inner.partition(".")[0]
        elif head in ALGORITHMS:
            classes = [algorithm(head).config_class()]
        else:
            return f"{head!r} takes no dotted keys"
        bad = [c.__name__ for c in classes if inner not in _keys(c)]
        return f"{key}: {inner!r} is not a key of {', '.join(bad)}" if bad else None
    elif path in CONFIGS:
        cls = _class(CONFIGS[path])
    else:
        return f"`mogrpo {' '.join(path)}` takes no key=value overrides"
    head = key.partition(".")[0]
    return None if head in _keys(cls) else f"{head!r} is not a key of {cls.__name__}"


def _expand(value: str) -> list[str]:
    """Shell brace expansion of one `{a,b}` group (configs/{ppo,dpo}/default.yaml)."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", value)
    if not m:
        return [value]
    return [x for alt in m.group(1).split(",")
            for x in _expand(value[:m.start()] + alt + value[m.end():])]


def _walk(cmd: Command) -> list[str]:
    """Problems of one command (empty: it is fine)."""
    problems = []
    argv = cmd.argv
    run_algos = ["grpo", "ppo", "dpo"]  # `mogrpo run`'s default algorithms
    for tok in argv:
        if tok.startswith("algorithms="):
            run_algos = [a.strip() for a in tok.split("=", 1)[1].strip("[]").split(",")]
    # the subcommand path; alternatives (train ppo|dpo) are each checked
    paths: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = [((), build_parser())]
    i, name_at = 0, []  # name_at: where each subcommand name stands in argv
    while True:
        sub = _subparsers(paths[0][1])
        if sub is None:
            break
        while i < len(argv) and argv[i].startswith("-"):  # options before the subcommand
            if argv[i].split("=")[0] not in paths[0][1]._option_string_actions:
                problems.append(f"{argv[i]}: not an option of `mogrpo {' '.join(paths[0][0])}`")
            i += 1
        if i == len(argv) or argv[i].startswith("<") or argv[i] in ("...", "…"):
            return problems  # `mogrpo --debug ...`, `mogrpo train <name>`, `mogrpo train ...`
        names = argv[i].split("|")
        unknown = [n for n in names if n not in sub.choices]
        if unknown:
            where = " ".join(("mogrpo", *paths[0][0], "|".join(unknown)))
            return problems + [f"`{where}`: no such command (known after "
                               f"`{' '.join(('mogrpo', *paths[0][0]))}`: "
                               f"{', '.join(sub.choices)})"]
        paths = [(p + (n,), sub.choices[n]) for (p, _), n in itertools.product(paths, names)]
        name_at.append(i)
        i += 1
    for path, parser in paths:
        options = parser._option_string_actions
        rest = [t for t in argv[i:] if t not in ("...", "…")]
        j = 0
        while j < len(rest):
            tok = rest[j]
            j += 1
            if tok.startswith("-"):
                flag, eq, inline = tok.partition("=")
                action = options.get(flag)
                if action is None:
                    problems.append(f"{flag}: not an option of `mogrpo {' '.join(path)}`")
                    continue
                if action.nargs == 0:
                    continue
                values = [inline] if eq else []
                if not eq and j < len(rest):
                    if action.nargs in (None, 1):
                        values, j = [rest[j]], j + 1
                    else:  # + / *: up to the next option, as argparse takes them
                        while j < len(rest) and not rest[j].startswith("-"):
                            values.append(rest[j])
                            j += 1
                if flag == "--config":
                    for v in values:
                        for f in ([] if _placeholder(v) else _expand(v)):
                            if not (ROOT / f).is_file():
                                problems.append(f"--config {f}: no such file")
                if flag == "--eval" and path == ("sweep",):
                    for v in values:
                        key = v.split("=", 1)[0]
                        if "=" in v and key not in _keys(_class(EVAL_CONFIG)):
                            problems.append(f"--eval {v}: {key!r} is not an EvalConfig key")
                continue
            if "=" in tok and not _placeholder(tok.split("=", 1)[0]):
                problem = _check_key(tok.split("=", 1)[0], path, run_algos)
                if problem:
                    problems.append(problem)
        if cmd.block and not {"-h", "--help", "...", "…"} & set(argv):  # a whole command
            one = list(argv)  # this alternative's names in place of `ppo|dpo`
            for k, at in enumerate(name_at):
                one[at] = path[k]
            problems += _parses(one)
    return problems


def _parses(argv: list[str]) -> list[str]:
    """The whole command through mogrpo's own argument parsing (required flags included)."""
    import contextlib
    import io

    from mogrpo.cli import _parse

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            _parse(build_parser(), argv)
    except SystemExit:
        return [f"`mogrpo {' '.join(argv)}` does not parse: {err.getvalue().strip()[-300:]}"]
    return []


def test_the_docs_show_commands():
    """The collection below finds the commands (a change in the docs' format would otherwise
    pass silently)."""
    blocks = [c for c in COMMANDS if c.block]
    assert len(blocks) >= 10 and len(COMMANDS) >= 40, [c.where for c in COMMANDS]
    assert {c.argv[0] for c in blocks if c.argv} >= {"run", "train", "eval", "reward", "sweep"}


@pytest.mark.parametrize("cmd", [_param(c) for c in COMMANDS])
def test_documented_command_exists(cmd: Command):
    problems = _walk(cmd)
    assert not problems, f"{cmd.where}: {cmd.text}\n  " + "\n  ".join(problems)


def test_readme_time_estimates_are_the_runs_own():
    """README's "How long" gives what `mogrpo run` prints at its start: the sum of its stages'
    estimates, for configs/default.yaml, configs/quick.yaml and configs/study.yaml."""
    from mogrpo.config import load_config
    from mogrpo.pipeline import build_stages, run_config_class
    from mogrpo.stages import _fmt

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("default", "quick", "study"):
        cfg = load_config(run_config_class(), ROOT / "configs" / f"{name}.yaml", [])
        total = _fmt(sum(s.estimate for s in build_stages(cfg, ROOT / "runs" / "x")))
        assert total in readme, (f"configs/{name}.yaml: the run estimates {total} at its start; "
                                 "say so in README.md's \"How long\"")


def test_config_files_the_docs_name_exist():
    """Every configs/...yaml path in README.md and docs/*.md (prose, --config, --config_file)."""
    missing = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"configs/[\w./{},-]+\.yaml", text):
            missing += [f"{path.name}: {f}" for f in _expand(m.group(0))
                        if not (ROOT / f).is_file()]
    assert not missing, missing
