"""Fits as values: options NamedTuples that check themselves, and a Fit whose numbers are the
exact posterior's at its estimate."""
import math

import numpy as np
import pytest

from latentsel.analysis.fitting import fit_traces
from latentsel.analysis.results import Fit
from latentsel.analysis.options import METHODS, AmortizedOptions, EMOptions, NUTSOptions, SVIOptions, fit_options
from latentsel.analysis.posterior import posterior_from_data
from latentsel.models.registry import default_params
from latentsel.traces.emission import build_data
from latentsel.traces.regimes import generate
from latentsel.traces.simulate import simulate


def test_every_method_has_checked_options():
    assert {name: cls.method for name, cls in METHODS.items()} == {name: name for name in METHODS}
    for cls in METHODS.values():
        assert fit_options(cls.method) == cls()
        assert cls().check() == cls()


@pytest.mark.parametrize("options, message", [
    (EMOptions(tol=math.nan), "^tol "), (EMOptions(tol=-1.0), "^tol "), (EMOptions(max_iter=-1), "^max_iter "),
    (SVIOptions(guide="laplace"), "^guide: unknown 'laplace'"), (SVIOptions(backend="jax"), "^backend: "),
    (SVIOptions(lr=0.0), "^lr "), (NUTSOptions(samples=2), "^samples "), (NUTSOptions(chains=0), "^chains "),
    (AmortizedOptions(estimator="reinforce"), "^estimator: "), (AmortizedOptions(em=EMOptions(tol=math.nan)), "^tol "),
])
def test_bad_options_name_their_field(options, message):
    with pytest.raises(ValueError, match=message):
        fit_options(options)


def test_a_method_is_named_or_given_as_options():
    with pytest.raises(ValueError, match="unknown method 'gibbs'; choose from em, svi, nuts, amortized"):
        fit_options("gibbs")
    with pytest.raises(TypeError, match="options must be"):
        fit_options({"max_iter": 3})


def test_em_fit_is_a_value_that_matches_the_exact_posterior(world):
    prompts = generate("eval-seen", 60, seed=1, world=world)
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.8)
    traces = simulate(prompts, truth, "modular", world, seed=2)
    fit = fit_traces(traces, world, "modular", EMOptions(max_iter=40), progress=False)
    assert isinstance(fit, Fit) and fit.method == "em" and fit.options.max_iter == 40 and fit.n_traces == 60
    exact = posterior_from_data(build_data(traces, world), fit.params, "modular")
    assert fit.log_evidence == pytest.approx(float(exact.log_evidence.sum()), rel=1e-12)
    np.testing.assert_allclose(fit.posterior.route_probs, exact.route_probs, rtol=1e-12, atol=1e-300)
    record = fit.record()
    assert {"model", "method", "backend", "params", "log_evidence", "n_traces", "iterations"} <= set(record)
    assert record["params"]["route_exec"] == np.asarray(fit.params.route_exec).tolist()
    assert fit.summary["iterations"] == len(fit.result.objective) - 1 <= 40


def test_a_fit_saved_over_another_is_loaded_as_itself(world, tmp_path):
    """A folder that held a nuts fit (its draws in samples.npz) and then an em fit loads as the em
    fit: no stale draws, and the conjugate posterior comes back with its prior (so that its KL to
    the prior works)."""
    import latentsel as ls
    from latentsel.analysis.results import load_fit

    traces = simulate(generate("eval-seen", 30, seed=1, world=world),
                      default_params("modular", world, fidelity=0.8), "modular", world, seed=2)
    em = ls.fit(traces, "modular", "em", max_iter=20, progress=False)
    np.savez(tmp_path / "samples.npz", route_exec=np.zeros((2, 8, 10, 10)))  # what a nuts fit left there
    em.save(tmp_path)
    loaded = load_fit(tmp_path)
    assert loaded.method == "em" and loaded.draws is None and not (tmp_path / "samples.npz").exists()
    for a, b in zip(loaded.conjugate.kl_rows(), em.conjugate.kl_rows()):
        np.testing.assert_array_equal(a, b)


def test_steps_past_a_trace_are_zero_whatever_the_source(world):
    from latentsel.analysis.results import StepPosterior
    from latentsel.inference.exact import ExactPosterior

    n, t, r, k = 2, 3, world.n_routes, world.n_skills
    post = ExactPosterior(np.zeros(n), np.full((n, t, r), 0.1), np.full((n, t, k), 0.2), np.ones((n, t)),
                          np.zeros((n, t), int), np.zeros((n, t), int), None)
    steps = StepPosterior.of(post, np.zeros(n), ["a", "b"], [3, 1], world)
    assert (steps.route_probs[1, 1:] == 0).all() and (steps.p_off[1, 1:] == 0).all()
    assert (steps.map_route[1, 1:] == -1).all() and (steps.route_probs[0] == 0.1).all()


def _small_fit(world, seed: int) -> Fit:
    """An em Fit built by hand, its numbers drawn from ``seed``: a value to save and load, in
    milliseconds (no fitting)."""
    from types import SimpleNamespace

    from latentsel.analysis.results import StepPosterior

    rng = np.random.default_rng(seed)
    route, skill = rng.dirichlet(np.ones(world.n_routes), (3, 2)), rng.dirichlet(np.ones(world.n_skills), (3, 2))
    post = SimpleNamespace(route_probs=route, skill_probs=skill, p_off=rng.uniform(size=(3, 2)),
                           map_route=route.argmax(-1), map_skill=skill.argmax(-1))
    posterior = StepPosterior.of(post, rng.normal(size=3), ["a", "b", "c"], [2, 1, 2], world)
    params = default_params("modular", world, fidelity=0.5 + 0.1 * seed)
    return Fit("modular", EMOptions(), params, posterior, float(posterior.log_evidence.sum()), 3, {}, world)


def test_a_saved_fit_lists_its_files_and_loads_as_itself(world, tmp_path):
    import hashlib
    import json

    from latentsel.analysis.results import load_fit

    fit = _small_fit(world, 0)
    fit.save(tmp_path)
    files = json.loads((tmp_path / "fit.json").read_text())["files"]
    body = (tmp_path / "posterior.jsonl").read_bytes()
    assert files == {"posterior.jsonl": {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}}
    loaded = load_fit(tmp_path)
    assert loaded.summary == {} and loaded.posterior.trace_ids == fit.posterior.trace_ids
    np.testing.assert_array_equal(loaded.posterior.route_probs, fit.posterior.route_probs)


def test_a_save_killed_between_its_files_is_refused_not_mixed(world, tmp_path, monkeypatch):
    """The folder held a fit; a second save was killed after replacing posterior.jsonl and
    before fit.json: the folder is refused, not read as the old fit with the new posterior."""
    import re
    from pathlib import Path

    from latentsel.analysis import results

    results.Fit.save(_small_fit(world, 0), tmp_path)
    before = (tmp_path / "posterior.jsonl").read_bytes()
    real = results.atomic_open

    def killed_before_fit_json(path, *args, **kwargs):
        if Path(path).name == "fit.json":
            raise KeyboardInterrupt  # the kill
        return real(path, *args, **kwargs)

    monkeypatch.setattr(results, "atomic_open", killed_before_fit_json)
    with pytest.raises(KeyboardInterrupt):
        _small_fit(world, 1).save(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "posterior.jsonl").read_bytes() != before
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))}: posterior.jsonl does not belong to fit.json: "
                                         "written by another run, or the run was killed$"):
        results.load_fit(tmp_path)
    (tmp_path / "posterior.jsonl").unlink()
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))}: posterior.jsonl is missing"):
        results.load_fit(tmp_path)


def test_a_fit_is_not_saved_into_a_folder_another_run_is_writing(world, tmp_path):
    import re

    from tests.test_io import another_run_holding

    with another_run_holding(tmp_path) as pid:
        with pytest.raises(BlockingIOError, match=f"^{re.escape(str(tmp_path))} is being written by another "
                                                  rf"latentsel run \(pid {pid}\)$"):
            _small_fit(world, 0).save(tmp_path)
    assert not (tmp_path / "posterior.jsonl").exists() and not (tmp_path / "fit.json").exists()
    _small_fit(world, 0).save(tmp_path)  # the lock went with its holder


@pytest.mark.parametrize("out, problem", [("file", "a file, not a folder"), ("file/sub", "is a file, not a folder"),
                                          ("ro/sub", "is not writable")])
def test_fit_refuses_an_unusable_out_before_fitting(tmp_path, capsys, monkeypatch, out, problem):
    """The check of --out comes before the fit (belongs in tests/cli/test_cli.py, with the fit command)."""
    import json
    import os

    from latentsel.cli import main

    corpus = tmp_path / "t.jsonl"
    corpus.write_text(json.dumps({"id": "a", "input": "abc", "program": None, "steps": ["cba"]}) + "\n")
    (tmp_path / "file").write_text("")
    (tmp_path / "ro").mkdir()
    access = os.access
    # root writes anywhere: the read-only folder is the answer os.access gives for it
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) != str(tmp_path / "ro") and access(p, mode, **kw))
    assert main(["fit", str(corpus), "--model", "grammar", "--out", str(tmp_path / out)]) == 1
    captured = capsys.readouterr()
    assert "fitting" not in captured.out
    assert captured.err.startswith(f"latentsel fit: error: --out {tmp_path / out}: ") and problem in captured.err
    assert captured.err.count("\n") == 1


def test_malformed_completions_are_fitted_on_their_read_prefix_only():
    from latentsel.analysis.fitting import fit_traces
    from latentsel.traces.regimes import generate
    from latentsel.world import default_world

    world = default_world()
    traces = generate("eval-ood", 8, 0)
    traces[0].steps[1:] = [None, None, None]  # stopped after one step: three Nones fit would refuse as hidden
    traces[0].extra["malformed"] = "1 of 4 steps"
    traces[1].steps[0] = None
    traces[1].extra["malformed"] = "step 1 holds a non-character token"
    fit = fit_traces(traces, world, "modular", "em", progress=False)
    assert fit.n_traces == 7 and fit.posterior.trace_ids[0] == traces[0].id
    assert int(fit.posterior.depth[0]) == 1  # its read step only, not a perfect execution of the rest
    for tr in traces:
        tr.steps[0] = None
        tr.extra["malformed"] = "step 1 holds a non-character token"
    with pytest.raises(ValueError, match="no step of any trace was read"):
        fit_traces(traces, world, "modular", "em", progress=False)


def test_fit_on_an_out_another_run_holds_fails_before_fitting(tmp_path, capsys):
    """``latentsel fit`` takes --out's lock before it fits, not at save (belongs with the fit command)."""
    import json

    from latentsel.cli import main
    from tests.test_io import another_run_holding

    corpus = tmp_path / "t.jsonl"
    corpus.write_text(json.dumps({"id": "a", "input": "abc", "program": None, "steps": ["cba"]}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    with another_run_holding(out) as pid:
        assert main(["fit", str(corpus), "--model", "grammar", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "fitting" not in captured.out and f"being written by another latentsel run (pid {pid})" in captured.err
