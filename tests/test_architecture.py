"""The package's shape: no import circles (between modules, or between the layers), no
block of six lines repeated across the algorithm files, and every YAML key a config key."""

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mogrpo"
# Lower layers never import higher ones (docs/architecture.md). The root package (the public
# API) and the CLI sit on top.
LAYERS = [["_version", "config", "assets", "gguf", "runfolder", "memory", "runtime", "tracking",
           "checkpointing"], ["data"],
          ["models", "generation", "sampling", "packing", "rollout"], ["reward"], ["eval"], ["rl"],
          ["pipeline", "stages", "sweep", "report", "export", "trainers"],
          ["__init__", "cli", "helptext", "summaries"]]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every mogrpo module a file imports, at any depth (lazy imports inside functions count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mogrpo")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mogrpo"):
            for a in node.names:  # `from mogrpo.rl import grpo` imports the module mogrpo.rl.grpo
                sub = f"{node.module}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).is_file()
                        else node.module)
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in imports_of(p) if i in files and i != m} for m, p in files.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_between_modules():
    assert find_cycle(graph()) is None


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module != "mogrpo" else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer; add it to LAYERS and docs/architecture.md")


def test_layers_only_import_downwards():
    """data -> models -> reward -> eval -> rl -> pipeline/sweep/report -> API/CLI: no upward
    import, so no circle between layers either (e.g. rl <-> eval)."""
    up = [(m, i) for m, deps in graph().items() for i in deps if layer_of(i) > layer_of(m)]
    assert up == []


ALGORITHM_FILES = sorted((PKG / "rl").glob("*.py"))


def normalised_lines(path: Path) -> list[tuple[int, str]]:
    """Code lines with names replaced by a placeholder (same shape, other names, counts as the
    same), comments, docstrings-only lines and blank lines dropped."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        s = line.split("#", 1)[0].strip()
        if not s or s.startswith(('"""', "'''", "import ", "from ")):
            # blank lines, docstring edges, imports (every file imports the same libraries)
            continue
        s = re.sub(r"\"[^\"]*\"|'[^']*'", "S", s)
        s = re.sub(r"\b(?!(?:if|for|in|with|return|def|class|not|and|or|else|elif|import|from|as|"
                   r"None|True|False|lambda|raise|try|except|while|yield|is)\b)[A-Za-z_][A-Za-z0-9_]*\b",
                   "N", s)
        out.append((n, s))
    return out


def test_no_six_line_block_repeated_across_algorithm_files():
    seen: dict[tuple, tuple[str, int]] = {}
    repeats = []
    for path in ALGORITHM_FILES:
        lines = normalised_lines(path)
        for k in range(len(lines) - 5):
            block = tuple(s for _, s in lines[k:k + 6])
            if len(set(block)) < 3:  # a run of trivial lines ("N,", ")") is no code
                continue
            where = seen.setdefault(block, (path.name, lines[k][0]))
            if where[0] != path.name:
                repeats.append(f"{path.name}:{lines[k][0]} repeats {where[0]}:{where[1]}")
    assert repeats == []


def test_repeat_detector_sees_renamed_copies(tmp_path):
    code = ("def f(a, b):\n    x = a + b\n    y = x * 2\n    if y > 3:\n        return y\n"
            "    z = g(x)\n    return z\n")
    (tmp_path / "one.py").write_text(code)
    (tmp_path / "two.py").write_text(code.replace("x", "q").replace("y", "w"))
    a, b = (tuple(s for _, s in normalised_lines(tmp_path / f)) for f in ("one.py", "two.py"))
    assert a == b


# ----------------------------------------------------------------------------- configs


def config_files():  # configs/accelerate/ holds accelerate's own files (tests/test_scale.py)
    return sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_key_is_a_config_key(path):
    """Each YAML under configs/ loads into its dataclass (unknown keys are errors), and holds
    only what it changes from the dataclass defaults (one source of defaults)."""
    import dataclasses

    from mogrpo.config import from_dict, load_config, resolve_aliases
    from mogrpo.eval.harness import EvalConfig
    from mogrpo.pipeline import RunConfig, algo_stage, build_stages
    from mogrpo.reward.train import RewardTrainConfig
    from mogrpo.rl.registry import trainer

    rel = path.relative_to(ROOT / "configs")
    data = yaml.safe_load(path.read_text()) or {}
    if len(rel.parts) == 1:  # a whole job: every section goes through its stage's config class
        cfg = load_config(RunConfig, path)
        stages = build_stages(cfg, Path("runs/x"))
        names = {algo_stage(a, seed, cfg.seeds) for a in cfg.algorithms for seed in cfg.seeds}
        assert {s.name for s in stages} >= names
        sections = {"reward": RewardTrainConfig, "evaluator_reward": RewardTrainConfig,
                    "eval": EvalConfig, **{a: trainer(a)[0] for a in cfg.algorithms}}
        pairs = [(sections[k], v) for k, v in data.items() if k in sections and v]
        pairs += [(trainer(a)[0], data.get("common") or {}) for a in cfg.algorithms]
    else:
        # scale/grpo-qwen2.5-7b.yaml
        kind = rel.parts[0] if rel.parts[0] != "scale" else path.stem.split("-")[0]
        cls = RewardTrainConfig if kind == "reward" else trainer(kind)[0]
        load_config(cls, path)
        pairs = [(cls, data)]
    for cls, section in pairs:
        resolved = resolve_aliases(cls, section, {f.name for f in dataclasses.fields(cls)})
        defaults = from_dict(cls, {})
        same = [k for k, v in resolved.items() if k not in ("reward_model",)
                and getattr(defaults, k) == v
                and len(rel.parts) > 1]
        assert same == [], f"{path.name}: {same} repeat the {cls.__name__} defaults; drop them"


def test_trl_names_are_aliases():
    from mogrpo.config import ConfigError, load_config
    from mogrpo.rl.grpo import GRPOConfig
    from mogrpo.rl.ppo import PPOConfig

    cfg = load_config(GRPOConfig, None, ["learning_rate=1e-5", "num_generations=8", "batch_size=32",
                                         "epsilon=0.1", "epsilon_high=0.28", "num_iterations=2",
                                         "max_completion_length=32", "loss_type=dapo",
                                         "max_steps=10", "lr_scheduler_type=cosine"])
    assert (cfg.lr, cfg.group_size, cfg.eps_low, cfg.eps_high, cfg.num_iterations,
            cfg.max_new_tokens, cfg.loss_aggregation, cfg.steps, cfg.lr_schedule) == \
        (1e-5, 8, 0.1, 0.28, 2, 32, "dapo", 5, "cosine")
    ppo = load_config(PPOConfig, None, ["kl_coef=0.1", "cliprange=0.3", "num_ppo_epochs=2",
                                        "samples_per_prompt=2"])
    assert (ppo.beta, ppo.eps_low, ppo.eps_high, ppo.num_iterations, ppo.group_size) == \
        (0.1, 0.3, 0.3, 2, 2)
    with pytest.raises(ConfigError, match="another name for 'lr'"):
        load_config(GRPOConfig, None, ["lr=1e-4", "learning_rate=1e-5"])


def test_one_name_per_idea_across_algorithms():
    """The ideas every algorithm has carry the same name and the same help everywhere."""
    import dataclasses

    from mogrpo.rl.config import PolicyRunConfig
    from mogrpo.rl.registry import TRAINERS, trainer

    shared = {f.name for f in dataclasses.fields(PolicyRunConfig)}
    for algo in TRAINERS:
        names = {f.name for f in dataclasses.fields(trainer(algo)[0])}
        assert shared <= names
        assert not names & {"samples_per_prompt", "mu", "ppo_epochs", "kl_coef", "cliprange"}, algo
