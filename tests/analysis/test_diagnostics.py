"""ArviZ diagnostics: corpus statistics, InferenceData groups, PSIS-LOO, NetCDF files and plots."""
import json
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from latentsel.analysis import diagnostics as dg
from latentsel.analysis.posterior import posterior_from_data
from latentsel.inference.conjugate import conjugate_posterior
from latentsel.inference.mcmc import fit_nuts
from latentsel.models.params import EntangledParams, ModularParams
from latentsel.models.registry import default_params
from latentsel.traces import Trace
from latentsel.traces.emission import build_data
from latentsel.traces.regimes import generate
from latentsel.traces.simulate import simulate
from tests.inference.test_exact import random_traces, small_world  # noqa: F401

PNG = b"\x89PNG\r\n\x1a\n"
CHAINS, DRAWS = 2, 60


@pytest.fixture(scope="module")
def corpus(world):
    """46 traces of depth 3: 40 fully observed, 6 with step 2 hidden (a block at step 3)."""
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.8, noise=0.05, off_module=0.05)
    traces = simulate(generate("sft", 40, seed=0), truth, "modular", world, seed=1)
    traces += simulate(generate("eval-seen", 6, seed=1), truth, "modular", world, seed=2, hide=(2,))
    return traces, truth


@pytest.fixture(scope="module")
def data(corpus, world):
    return build_data(corpus[0], world)


@pytest.fixture(scope="module")
def theta(corpus, data):
    return conjugate_posterior("modular", corpus[1], data).sample((CHAINS, DRAWS), seed=3)


@pytest.fixture(scope="module")
def fits(corpus, data, theta, world):
    traces, _ = corpus
    ids = [t.id for t in traces]
    pp = dg.posterior_predictive(traces, world, "modular", theta, n_replicates=8, seed=4)
    modular = dg.to_inference_data("modular", data, theta, world, trace_ids=ids, posterior_predictive=pp)
    ent_params = default_params("entangled", world.n_routes, world.n_skills, fidelity=0.8, noise=0.05, off_module=0.05)
    entangled = dg.from_conjugate("entangled", build_data(traces, world, model="entangled"), ent_params, world,
                                  trace_ids=ids, chains=CHAINS, draws=DRAWS, seed=5)
    return {"modular": modular, "entangled": entangled}


@pytest.fixture(scope="module")
def comparison(fits):
    return dg.compare(fits)


def test_trace_statistics_hand_checked(world):
    """Trace a: a correct step, a step another module (rotr) explains, an unexplained step
    ('q' is in no module's output on these histories). Trace b: hidden step 1, so step 2 is a
    block and neither counts. Trace c: correct, then a trailing hidden step that does not count."""
    traces = [
        Trace("a", "abcd", [("prev", "reverse"), ("prev", "rotl"), ("prev", "shift1")], ["dcba", "adcb", "qq"]),
        Trace("b", "abcd", [("prev", "reverse"), ("prev", "reverse")], [None, "abcd"]),
        Trace("c", "abcd", [("input", "reverse"), ("prev", "shift1")], ["dcba", None]),
    ]
    d = build_data(traces, world)
    s = dg.trace_statistics(d)
    np.testing.assert_array_equal(s["step_correct"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(s["step_explained"], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(s["error_type"], [0.5, 0.25, 0.25])
    mask = np.ones((3, 3), bool)
    mask[0, 2] = False
    s = dg.trace_statistics(d, mask)
    assert np.isnan(s["step_correct"][2]) and np.isnan(s["step_explained"][2])
    np.testing.assert_array_equal(s["error_type"], [2 / 3, 1 / 3, 0.0])
    assert set(dg.trace_statistics(d, intended=False)) == {"step_explained", "error_type"}
    np.testing.assert_array_equal(dg.trace_statistics(d, intended=False)["error_type"], [0.75, 0.25])
    with pytest.raises(ValueError, match=r"mask must be bool\[3, 3\]"):
        dg.trace_statistics(d, np.ones((3, 2), bool))


def test_posterior_group_holds_the_draws_with_named_dims(fits, theta, world):
    post = fits["modular"].posterior
    for name in ModularParams._fields:
        np.testing.assert_array_equal(post[name].values, np.asarray(getattr(theta, name)))
    assert post["route_exec"].dims == ("chain", "draw", "intended_route", "executed_route")
    assert list(post["skill_exec"]["executed_skill"].values) == world.skill_names
    ctx = fits["entangled"].posterior["route_exec_ctx"]
    assert ctx.dims == ("chain", "draw", "context_route", "intended_route", "executed_route")
    assert list(ctx["context_route"].values) == world.route_names + ["start"]


def test_log_likelihood_is_the_exact_evidence_of_every_draw(fits, corpus, data):
    ll = fits["modular"].log_likelihood["trace"]
    assert ll.dims == ("chain", "draw", "trace_id") and list(ll["trace_id"].values) == [t.id for t in corpus[0]]
    post = fits["modular"].posterior
    for c in range(CHAINS):
        for d in range(0, DRAWS, 9):
            params = ModularParams(*(post[f].values[c, d] for f in ModularParams._fields))
            np.testing.assert_allclose(ll.values[c, d], posterior_from_data(data, params, "modular").log_evidence, rtol=1e-10)


def test_summary_has_convergence_columns(fits, world):
    s = dg.summary(fits["modular"], ["noise", "off_module", "route_exec"])
    assert {"mean", "sd", "hdi_3%", "hdi_97%", "ess_bulk", "ess_tail", "r_hat"} <= set(s.columns)
    assert len(s) == 2 + world.n_routes ** 2 and "route_exec[prev, prev]" in s.index
    # independent conjugate draws: chains agree, and the ESS is about the number of draws
    assert (s.loc[["noise", "off_module"], "r_hat"] < 1.05).all()
    assert (s.loc[["noise", "off_module"], "ess_bulk"] > CHAINS * DRAWS / 2).all()


def test_netcdf_round_trip_is_atomic(fits, tmp_path):
    path = tmp_path / "out" / "fit.nc"
    dg.save(fits["modular"], path)
    dg.save(fits["modular"], path)  # replaces the file in place
    assert os.listdir(path.parent) == ["fit.nc"]
    back = dg.load(path)
    assert set(back.groups()) == set(fits["modular"].groups())
    for group in fits["modular"].groups():
        xr.testing.assert_equal(back[group], fits["modular"][group])


def test_load_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(ValueError, match="missing.nc: no such InferenceData file"):
        dg.load(tmp_path / "missing.nc")
    (tmp_path / "notes.nc").write_text("not netcdf\n")
    with pytest.raises(ValueError, match="notes.nc: not an InferenceData NetCDF file"):
        dg.load(tmp_path / "notes.nc")


def test_loo_and_compare_modular_against_entangled(fits, comparison):
    elpd = dg.loo(fits["modular"])
    assert np.isfinite(elpd["elpd_loo"])
    assert elpd["n_bad_k"] == int((np.asarray(elpd["pareto_k"]) > dg.BAD_KHAT).sum())
    df = comparison
    assert set(df.index) == {"modular", "entangled"}
    assert np.isfinite(df["elpd_loo"]).all() and df["elpd_diff"].iloc[0] == 0
    np.testing.assert_allclose(df["weight"].sum(), 1.0)
    records = dg.compare_records(df)
    json.dumps(records, allow_nan=False)
    assert [r["model"] for r in records] == list(df.index)
    assert set(records[0]) == {"model", "elpd_loo", "se", "p_loo", "elpd_diff", "dse", "weight", "n_bad_k"}
    assert records[[r["model"] for r in records].index("modular")]["n_bad_k"] == elpd["n_bad_k"]


def test_posterior_predictive_shapes_draws_and_seeds(fits, corpus, data, theta, world):
    pp = fits["modular"].posterior_predictive
    assert pp["step_correct"].shape == (1, 8, 3) and pp["error_type"].shape == (1, 8, 3)
    np.testing.assert_allclose(pp["error_type"].sum("step_type"), 1.0)
    obs = fits["modular"].observed_data
    for name, value in dg.trace_statistics(data).items():
        np.testing.assert_array_equal(obs[name].values, value)
    # replicate s: the draw taken evenly (here the first and the last), simulated with seed + s
    traces = corpus[0]
    got = dg.posterior_predictive(traces, world, "modular", theta, n_replicates=2, seed=7)
    for s, (c, d) in enumerate([(0, 0), (CHAINS - 1, DRAWS - 1)]):
        params = ModularParams(*(np.asarray(f)[c, d] for f in theta))
        want = dg.trace_statistics(build_data(simulate(traces, params, "modular", world, seed=7 + s), world),
                                   data.emit)
        for name, value in want.items():
            np.testing.assert_array_equal(got[name][0, s], value)


def test_posterior_predictive_leaves_out_what_the_corpus_hides(corpus, theta, world):
    hidden = [t for t in corpus[0] if None in t.steps]  # step 2 hidden, step 3 in its block
    pp = dg.posterior_predictive(hidden, world, "modular", theta, n_replicates=3)
    assert np.isfinite(pp["step_correct"][..., 0]).all()
    assert np.isnan(pp["step_correct"][..., 1:]).all() and np.isnan(pp["step_explained"][..., 1:]).all()


def test_grammar_statistics_need_no_program(corpus, world):
    traces = [Trace(t.id, t.input, None, t.steps) for t in corpus[0][:10]]
    d = build_data(traces, world, model="grammar")
    theta = conjugate_posterior("grammar", default_params("grammar", world.n_routes, world.n_skills), d).sample((1, 4))
    pp = dg.posterior_predictive(traces, world, "grammar", theta, n_replicates=3)
    assert set(pp) == {"step_explained", "error_type"} and pp["error_type"].shape == (1, 3, 2)
    idata = dg.to_inference_data("grammar", d, theta, world, trace_ids=[t.id for t in traces],
                                 posterior_predictive=pp, log_likelihood=False)
    assert list(idata.observed_data["step_type"].values) == list(dg.EXPLAINED_TYPES)
    assert list(idata.posterior["route_trans"]["previous_route"].values)[-1] == "start"
    plt.close(dg.plot_ppc(idata))


def test_default_selection_picks_the_rows_the_data_inform(data, world):
    """Diagonal entries as Beta posteriors: route row 3 has 300 steps, half of them executed as
    intended (mean 0.5, sd 0.03); row 6 has 60 steps, none as intended (mean 0.03, a smaller
    sd of 0.02); every other row is at the prior. The selection takes row 3, the sd alone would
    take row 6."""
    rng = np.random.default_rng(0)

    def rows(n, counts):
        alpha = np.full((n, n), 0.5) + 1.5 * np.eye(n)  # the prior
        for (i, j), c in counts.items():
            alpha[i, j] += c
        return np.stack([rng.dirichlet(a, size=(2, 100)) for a in alpha], axis=2)

    draws = ModularParams(rows(world.n_routes, {(3, 3): 150, (3, 4): 150, (6, 7): 60}),
                          rows(world.n_skills, {(5, 5): 300}), rng.beta(1, 9, (2, 100)), rng.beta(1, 9, (2, 100)))
    idata = dg.to_inference_data("modular", data, draws, world, trace_ids=[str(i) for i in range(data.n_traces)],
                                 log_likelihood=False)
    names, coords = dg.default_selection(idata, n_entries=1)
    assert names == ["noise", "off_module", "route_exec", "skill_exec"]
    assert list(coords["intended_route"].values) == list(coords["executed_route"].values) == [world.route_names[3]]
    assert list(coords["intended_skill"].values) == list(coords["executed_skill"].values) == [world.skill_names[5]]


def test_every_plot_writes_a_png_and_closes_its_figure(fits, comparison, tmp_path):
    open_before = plt.get_fignums()
    calls = {
        "trace.png": lambda p: dg.plot_trace(fits["modular"], path=p),
        "rank.png": lambda p: dg.plot_rank(fits["entangled"], path=p),
        "rank_noise.png": lambda p: dg.plot_rank(fits["modular"], ["noise"], path=p),
        "ppc.png": lambda p: dg.plot_ppc(fits["modular"], path=p),
        "loo.png": lambda p: dg.plot_loo(comparison, path=p),
        "khat.png": lambda p: dg.plot_khat(fits["modular"], path=p),
    }
    for name, call in calls.items():
        fig = call(tmp_path / name)
        assert fig is not None
        content = (tmp_path / name).read_bytes()
        assert content.startswith(PNG) and len(content) > 5000, name
    assert plt.get_fignums() == open_before
    assert sorted(os.listdir(tmp_path)) == sorted(calls)


def test_bad_inputs_are_one_line_errors(corpus, data, theta, world):
    traces, truth = corpus
    ids = [t.id for t in traces]
    with pytest.raises(ValueError, match="model: unknown model 'hmm'"):
        dg.posterior_predictive(traces, world, "hmm", theta)
    with pytest.raises(ValueError, match=r"leading \[chains, draws\] dimensions"):
        dg.to_inference_data("modular", data, truth, world, trace_ids=ids)
    with pytest.raises(ValueError, match=r"draws.route_exec must have shape \[2, 60, 10, 10\]"):
        dg.to_inference_data("modular", data, theta._replace(route_exec=theta.route_exec[..., :9]), world,
                             trace_ids=ids)
    entangled = EntangledParams(*(np.zeros((1, 1)),) * 4)
    with pytest.raises(ValueError, match="takes ModularParams draws, got EntangledParams"):
        dg.to_inference_data("modular", data, entangled, world, trace_ids=ids)
    with pytest.raises(ValueError, match="trace_ids must be 46 distinct ids, got 45"):
        dg.to_inference_data("modular", data, theta, world, trace_ids=ids[:-1])
    with pytest.raises(ValueError, match=r"posterior_predictive\['error_type'\] has shape \[1, 4, 2\]"):
        dg.to_inference_data("modular", data, theta, world, trace_ids=ids, log_likelihood=False,
                             posterior_predictive={"error_type": np.full((1, 4, 2), 0.5)})
    with pytest.raises(ValueError, match="n_replicates must be at least 1"):
        dg.posterior_predictive(traces, world, "modular", theta, n_replicates=0)
    bare = dg.to_inference_data("modular", data, theta, world, trace_ids=ids, log_likelihood=False)
    with pytest.raises(ValueError, match="no log_likelihood group"):
        dg.loo(bare)
    with pytest.raises(ValueError, match="at least two fits"):
        dg.compare({"modular": bare})
    with pytest.raises(ValueError, match="not a compare"):
        dg.compare_records(pd.DataFrame({"elpd_loo": [1.0]}))
    with pytest.raises(ValueError, match="posterior_predictive and observed_data"):
        dg.plot_ppc(bare)


def test_from_nuts_names_sampler_statistics_as_arviz_does(small_world):  # noqa: F811
    traces = random_traces(np.random.default_rng(0), small_world, 8)
    d = build_data(traces, small_world)
    res = fit_nuts("modular", d, num_warmup=20, num_samples=20, num_chains=2, seed=0, max_tree_depth=3)
    idata = dg.from_nuts("modular", d, res, small_world, trace_ids=[t.id for t in traces])
    stats = idata.sample_stats
    assert set(stats.data_vars) == {"diverging", "acceptance_rate", "n_steps", "tree_depth", "lp", "step_size"}
    assert stats["diverging"].dtype == bool and stats["lp"].shape == (2, 20)
    np.testing.assert_array_equal(stats["lp"].values, -res.potential_energy)
    np.testing.assert_array_equal(stats["step_size"].values[:, -1], res.step_size)
    np.testing.assert_array_equal(idata.posterior["skill_exec"].values, res.samples["skill_exec"])
    params = ModularParams(*(res.samples[f][1, 7] for f in ModularParams._fields))
    np.testing.assert_allclose(idata.log_likelihood["trace"].values[1, 7], posterior_from_data(d, params, "modular").log_evidence,
                               rtol=1e-10)
    assert "r_hat" in dg.summary(idata, ["noise"]).columns
