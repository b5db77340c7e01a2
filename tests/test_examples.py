"""Every example runs with tiny arguments."""
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY_ARGS = {
    "aliasing.py": ["--regime", "eval-ood", "--n", "20"],
    "train_toy_policy.py": ["--steps", "3", "--n-eval", "8", "--no-progress"],
}


def test_every_example_has_tiny_args():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(TINY_ARGS)


@pytest.mark.parametrize("name", sorted(TINY_ARGS))
def test_example_runs(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, *TINY_ARGS[name]])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert capsys.readouterr().out
