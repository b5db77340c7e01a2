"""The layout of DESIGN §1: models/ and inference/ live in the latentsel namespace only."""
import importlib.util
import subprocess
import sys
from pathlib import Path


def test_models_and_inference_are_namespaced():
    import latentsel.inference
    import latentsel.models

    assert Path(latentsel.models.__file__).parent.name == "models"
    assert Path(latentsel.inference.__file__).parent.name == "inference"


def test_nothing_named_models_or_inference_at_top_level(tmp_path):
    # run from an empty folder so the checkout itself is not on sys.path
    code = "import importlib.util as u; print(u.find_spec('models'), u.find_spec('inference'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None None"


def test_console_script_is_installed():
    assert importlib.util.find_spec("latentsel.cli") is not None
    exe = Path(sys.executable).parent / "latentsel"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("latentsel ")


def test_every_subpackage_is_listed_for_installation():
    """A wheel holds only the packages setup.cfg names: each folder with an ``__init__.py``."""
    import configparser

    root = Path(__file__).resolve().parents[1]
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    folders = {".".join(("latentsel", *p.parent.relative_to(root / "latentsel").parts))
               for p in (root / "latentsel").rglob("__init__.py")}
    assert folders | {"latentsel.models", "latentsel.inference"} == listed


def test_the_package_data_holds_the_default_design():
    """Data files the package reads at import (the default identify design) are declared as
    package data, so a wheel carries them (read from setup.cfg as setuptools reads it)."""
    import fnmatch

    from setuptools.config.setupcfg import read_configuration

    root = Path(__file__).resolve().parents[1]
    options = read_configuration(root / "setup.cfg")["options"]
    patterns = options.get("package_data", {}).get("latentsel.experiments", [])
    data = [p.name for p in (root / "latentsel" / "experiments").iterdir() if not p.name.endswith((".py", ".pyc"))
            and p.is_file()]
    assert "default_design.toml" in data
    for name in data:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
