"""The code's shape, checked as the suite runs: ruff clean (pyproject.toml's [tool.ruff]: line
length 100, pycodestyle, pyflakes, import order, bugbear), no module over 450 lines, and the
policy run (`engine.Run`) at most 250 lines: what does not fit goes to the run infrastructure
(runtime.py, tracking.py, checkpointing.py) or the run's pieces (rl/samples.py, update.py,
run_state.py)."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).is_file():
        pytest.fail("ruff is not installed: pip install -e '.[test]' (scripts/setup.sh does it)")
    done = subprocess.run([ruff, "check", "mogrpo", "tests", "benchmarks", "scripts"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


def test_no_module_over_450_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in (ROOT / "mogrpo").rglob("*.py")}
    assert sizes and {p: n for p, n in sizes.items() if n > 450} == {}


def test_run_is_at_most_250_lines():
    tree = ast.parse((ROOT / "mogrpo" / "rl" / "engine.py").read_text())
    (run,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Run"]
    assert run.end_lineno - run.lineno + 1 <= 250
