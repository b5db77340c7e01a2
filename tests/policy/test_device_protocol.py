"""``scripts/device-protocol.sh OUT tiny`` in an interpreter that has only torch, numpy and tqdm.

The accelerator machine has nothing else installed and no package index, so the first command
there must not fail on an import or a path. The interpreter here runs with ``-S`` (no
site-packages) and a folder holding links to exactly torch, numpy, tqdm and what torch itself
requires (its optimizers import sympy lazily, for instance). At exit the interpreter writes the
modules it has loaded, and the test holds that list to the standard library, those packages
and latentsel.
"""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests._policy_util import one_thread  # noqa: F401 - autouse fixture

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "device-protocol.sh"


def _top_levels(dist) -> set[str]:
    names = set()
    for f in dist.files or ():
        top = f.parts[0]
        if top.endswith((".dist-info", ".data")) or top in ("..", "__pycache__") or top.endswith(".pth"):
            continue
        names.add(top[:-3] if top.endswith(".py") else top)
    return names


def _torch_numpy_tqdm() -> set[str]:
    """Top-level names installed by torch, numpy, tqdm and everything torch requires (no extras)."""
    from packaging.requirements import Requirement

    seen, todo, names = set(), ["torch", "numpy", "tqdm"], set()
    while todo:
        name = todo.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional platform dependency (CUDA libraries on a CPU build)
        names |= _top_levels(dist)
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return names


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A ``python3`` that sees the standard library, torch, numpy and tqdm, and nothing else."""
    base = tmp_path_factory.mktemp("bare")
    site, bin_dir = base / "site", base / "bin"
    site.mkdir()
    bin_dir.mkdir()
    allowed = _torch_numpy_tqdm()
    assert {"torch", "numpy", "tqdm"} <= allowed
    packages = Path(importlib.util.find_spec("torch").origin).parents[1]
    for name in allowed:
        entry = next((packages / n for n in (name, f"{name}.py") if (packages / n).exists()), None)
        if entry is not None:  # vendored shared libraries (numpy.libs) are top-level entries too
            (site / entry.name).symlink_to(entry)
    # ``python3 -m MODULE ARGS``, recording the modules loaded by the end of the run
    boot = bin_dir / "boot.py"
    boot.write_text(
        "import atexit, os, runpy, sys\n"
        "if not os.environ.get('PYTHONSAFEPATH'):\n"  # as python -m: the current folder first
        "    sys.path.insert(0, os.getcwd())\n"
        "def dump():\n"
        "    with open(os.environ['LOADED_MODULES'], 'w') as f:\n"
        "        f.write('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
        "atexit.register(dump)\n"
        "assert sys.argv[1] == '-m'\n"
        "module = sys.argv[2]\n"
        "sys.argv = [module] + sys.argv[3:]\n"
        "runpy.run_module(module, run_name='__main__', alter_sys=True)\n")
    python = bin_dir / "python3"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{boot}" "$@"\n')
    python.chmod(0o755)
    return python, site, allowed


def test_tiny_dry_run_imports_nothing_else_and_packs_eight_files(bare_python, tmp_path):
    python, site, allowed = bare_python
    out = tmp_path / "OUT"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    loaded = tmp_path / "loaded.txt"
    env.update(PYTHON=str(python), PYTHONPATH=str(site), BUDGET="240", TMPDIR=str(tmp_path), OMP_NUM_THREADS="1",
               LOADED_MODULES=str(loaded))
    # from the checkout's root, as the accelerator machine starts commands
    run = subprocess.run(["bash", str(SCRIPT), str(out), "tiny"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "device-protocol: done" in run.stdout

    imported = set(loaded.read_text().split())
    assert {"torch", "numpy", "tqdm", "latentsel"} <= imported
    foreign = sorted(n for n in imported
                     if n not in sys.stdlib_module_names and n not in allowed and n != "latentsel"
                     and not n.startswith("_") and n != "cython_runtime")  # Cython extensions make it in memory
    assert not foreign, f"the device run imported {foreign}"

    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert 3 <= len(files) <= 8 and all(p.parent == out for p in files)
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {p.name for p in files} - {"MANIFEST.json"}
    with tarfile.open(out / "protocol.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"protocol.json", "eval/eval.json", "eval/eval.md", "sft/metrics.jsonl"} <= names
    assert sum(n.startswith("corpora/") for n in names) == 9
    assert not any(n.endswith("checkpoint.pt") for n in names)
    parts = sorted(out.glob("policies.tar.part*"))
    whole = b"".join(p.read_bytes() for p in parts)
    assert len(whole) == manifest["weights"]["bytes"]
    joined = tmp_path / "policies.tar"
    joined.write_bytes(whole)
    with tarfile.open(joined) as tar:
        assert sorted(tar.getnames()) == ["policies/sft+rl-atomic.pt.gz", "policies/sft+rl-compound.pt.gz",
                                          "policies/sft.pt.gz"]


def test_a_gpu_run_without_a_gpu_says_so(bare_python, tmp_path):
    python, site, _ = bare_python
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHON=str(python), PYTHONPATH=str(site), CUDA_VISIBLE_DEVICES="", LOADED_MODULES=str(tmp_path / "x"))
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "OUT")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2
    assert "size gpu needs a CUDA device and none is visible" in run.stderr
