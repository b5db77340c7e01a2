"""The README runs: its Python blocks in order, in one namespace, and the shell blocks marked
``<!-- test -->`` before them, in a fresh folder. A block that should not run here says why in
a ``<!-- no-test: reason -->`` comment above it. Every "DESIGN §N" points at a section of
docs/DESIGN.md."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- (test|no-test: [^>]*) -->\n)?```(\w*)\n(.*?)```", re.S)


def readme_blocks():
    """``(marker, language, code, line)`` of every fenced block of the README."""
    text = (ROOT / "README.md").read_text()
    return [(m.group(1), m.group(2), m.group(3), text[: m.start()].count("\n") + 1) for m in BLOCK.finditer(text)]


def test_the_readme_blocks_are_found():
    blocks = readme_blocks()
    assert sum(lang == "python" for _, lang, _, _ in blocks) >= 5
    assert any(marker == "test" and lang == "bash" for marker, lang, _, _ in blocks)


def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    bin_dir = Path(sys.executable).parent
    namespace = {"__name__": "__readme__"}
    for marker, lang, code, line in readme_blocks():
        if marker and marker.startswith("no-test"):
            continue
        if lang == "bash" and marker == "test":
            for command in (c for c in code.splitlines() if c.strip() and not c.lstrip().startswith("#")):
                argv = shlex.split(command, comments=True)
                argv[0] = str(bin_dir / argv[0]) if (bin_dir / argv[0]).exists() else argv[0]
                done = subprocess.run(argv, capture_output=True, text=True)
                assert done.returncode == 0, f"README.md:{line}: {command}\n{done.stderr[-2000:]}"
        elif lang == "python":
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            except Exception as e:  # noqa: BLE001 - name the block that broke
                pytest.fail(f"README.md:{line}: {type(e).__name__}: {e}")


def test_design_references_point_at_sections():
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "DESIGN.md").read_text(), re.M))
    cited = {}
    for folder in ("latentsel", "models", "inference", "tests", "examples", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for n in re.findall(r"DESIGN §(\d+)", path.read_text()):
                cited.setdefault(n, path)
    for n in re.findall(r"DESIGN §(\d+)", (ROOT / "README.md").read_text()):
        cited.setdefault(n, ROOT / "README.md")
    assert cited and {n: str(p) for n, p in cited.items() if n not in sections} == {}
