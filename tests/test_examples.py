"""Every example runs with tiny arguments."""
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY_ARGS = {
    "aliasing.py": ["--regime", "eval-ood", "--n", "20"],
    "compare_policies.py": ["--max-traces", "30", "--no-progress"],
    "fit_end_to_end.py": ["--n", "60", "--nuts-draws", "6", "--no-progress"],
    "own_world.py": ["--n", "100", "--no-progress"],
    "train_toy_policy.py": ["--steps", "3", "--n-eval", "8", "--no-progress"],
}


def test_every_example_has_tiny_args():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(TINY_ARGS)


# NUTS compiles for about 40 s even at tiny sizes
SLOW = {"fit_end_to_end.py"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(TINY_ARGS)])
def test_example_runs(name, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # what an example writes stays in the test's folder
    monkeypatch.setattr(sys, "argv", [name, *TINY_ARGS[name]])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert capsys.readouterr().out
