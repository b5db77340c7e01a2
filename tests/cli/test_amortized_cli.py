"""``latentsel fit --backend pyro``: the amortized method's files, and the backend/method checks."""
import json

import numpy as np
import pytest

from latentsel.cli import main
from latentsel.models.registry import default_params
from latentsel.traces import write_traces
from latentsel.traces.regimes import generate
from latentsel.traces.simulate import simulate
from latentsel.world import default_world

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    world = default_world()
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.85, noise=0.03, off_module=0.03)
    traces = simulate(generate("eval-ood", 60, seed=0, world=world), truth, "modular", world, seed=0)
    path = tmp_path_factory.mktemp("corpus") / "traces.jsonl"
    write_traces(path, traces, world=world)
    return path, traces


def test_fit_amortized_writes_the_design_files(trace_file, tmp_path, capsys):
    path, traces = trace_file
    out = tmp_path / "fit"
    assert main(["fit", str(path), "--backend", "pyro", "--method", "amortized", "--steps", "4", "--batch", "16",
                 "--amortized-em-traces", "40", "--max-iter", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "θ by EM on 40 traces" in printed and "6 held-out traces" in printed
    rec = json.loads((out / "fit.json").read_text())
    assert rec["model"] == "modular" and rec["method"] == "amortized" and rec["backend"] == "pyro"
    assert rec["estimator"] == "enum"
    assert np.isfinite(rec["log_evidence"]) and rec["n_traces"] == 60 and len(rec["params"]["route_exec"]) == 10
    assert rec["em"]["traces"] == 40 and rec["train_traces"] == 54 and len(rec["losses"]) == 4
    ev = rec["evaluation"]
    assert ev["held_out_traces"] == 6 and ev["n_steps"] > 0 and ev["kl_exact_q"] >= 0
    assert 0 <= ev["map_agreement"] <= 1
    lines = (out / "posterior.jsonl").read_text().splitlines()
    assert len(lines) == 60
    first = json.loads(lines[0])
    assert first["id"] == traces[0].id and len(first["steps"]) == traces[0].depth
    step = first["steps"][0]
    assert set(step) == {"map_route", "map_skill", "p_off", "route_probs", "skill_probs"}
    assert len(step["route_probs"]) == 10 and len(step["skill_probs"]) == 24
    assert abs(sum(step["route_probs"]) - 1) < 1e-6 and 0 <= step["p_off"] <= 1


def test_fit_svi_on_the_pyro_backend(trace_file, tmp_path):
    path, _ = trace_file
    out = tmp_path / "svi"
    assert main(["fit", str(path), "--backend", "pyro", "--method", "svi", "--steps", "3", "--out", str(out)]) == 0
    rec = json.loads((out / "fit.json").read_text())
    assert rec["method"] == "svi" and rec["backend"] == "pyro" and len(rec["losses"]) == 3


@pytest.mark.parametrize("argv, message", [
    (["--backend", "pyro", "--method", "em"], "method em runs on the numpyro backend; the pyro backend fits by svi or "
                                              "amortized"),
    (["--backend", "pyro", "--method", "nuts"], "method nuts runs on the numpyro backend"),
    (["--method", "amortized"], "method amortized runs on the pyro backend (--backend pyro)"),
    (["--backend", "pyro", "--method", "amortized", "--model", "grammar"],
     "amortized inference covers the modular and entangled models, not 'grammar'"),
])
def test_backend_errors_are_one_line(trace_file, tmp_path, capsys, argv, message):
    path, _ = trace_file
    assert main(["fit", str(path), *argv, "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
