"""SBC by ECDF: tie-randomized ranks are uniform, the statistic and its band hold their level
under uniform ranks, miscalibrated posteriors fail, and bad input names its argument."""
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import binom, chisquare

from latentsel.analysis import sbc
from latentsel.analysis.sbc import ecdf_band, ecdf_statistic, null_statistics, sbc_test, tie_randomized_rank

L, N = 99, 100  # posterior draws per replication, replications per parameter


def _uniform_ranks(seed, rows, n_reps=N, n_draws=L):
    return np.random.default_rng(seed).integers(0, n_draws + 1, (rows, n_reps))


# -- ranks -------------------------------------------------------------------------------
def test_ties_are_split_uniformly(rng):
    draws = np.broadcast_to(np.array([0, 1, 1, 1, 2])[:, None], (5, 20_000))
    ranks = tie_randomized_rank(draws, np.ones(20_000, dtype=int), rng)
    assert ranks.shape == (20_000,) and ranks.dtype == np.int64
    counts = np.bincount(ranks, minlength=6)
    assert counts[0] == counts[5] == 0  # one draw below, three tied: ranks 1..4
    assert chisquare(counts[1:5]).pvalue > 1e-3


def test_tie_randomization_makes_a_calibrated_discrete_posterior_uniform(rng):
    n_draws, n_reps = 9, 3_000
    truth = rng.poisson(2.0, n_reps)
    draws = rng.poisson(2.0, (n_draws, n_reps))  # the prior as posterior: calibrated
    randomized = np.bincount(tie_randomized_rank(draws, truth, rng), minlength=n_draws + 1)
    plain = np.bincount((draws < truth).sum(axis=0), minlength=n_draws + 1)
    assert chisquare(randomized).pvalue > 1e-3
    assert chisquare(plain).pvalue < 1e-10


def test_continuous_draws_give_the_plain_rank(rng):
    draws, truth = rng.normal(size=(L, 3, 50)), rng.normal(size=50)  # truth broadcasts over the 3
    ranks = tie_randomized_rank(draws, truth, rng)
    assert ranks.shape == (3, 50)
    np.testing.assert_array_equal(ranks, (draws < truth).sum(axis=0))


@pytest.mark.parametrize("draws, truth, rng, argument", [
    (np.array([[0.0], [np.nan]]), np.zeros(1), np.random.default_rng(0), "draws"),
    (np.zeros((2, 1)), np.array([np.nan]), np.random.default_rng(0), "truth"),
    (np.zeros((0, 3)), np.zeros(3), np.random.default_rng(0), "draws"),
    (np.array(["a", "b"]), "a", np.random.default_rng(0), "draws"),
    (np.zeros((2, 3)), np.zeros(4), np.random.default_rng(0), "truth"),
    (np.zeros((2, 3)), np.zeros((2, 3)), np.random.default_rng(0), "truth"),
    (np.zeros((2, 3)), np.zeros(3), 0, "rng"),
])
def test_tie_randomized_rank_rejects_bad_input(draws, truth, rng, argument):
    with pytest.raises(ValueError, match=f"^{argument} "):
        tie_randomized_rank(draws, truth, rng)


# -- the statistic and its null ----------------------------------------------------------
def test_statistic_follows_its_definition(rng):
    n_draws, n_reps = 4, 7
    ranks = rng.integers(0, n_draws + 1, (2, 3, n_reps))
    expected = np.ones((2, 3))
    for index in np.ndindex(2, 3):
        for i in range(1, n_draws + 1):
            k, z = (ranks[index] < i).sum(), i / (n_draws + 1)  # n F(z_i) ~ Binomial(n, z_i)
            tail = min(1.0, 2 * min(binom.cdf(k, n_reps, z), 1 - binom.cdf(k - 1, n_reps, z)))
            expected[index] = min(expected[index], tail)
    np.testing.assert_allclose(ecdf_statistic(ranks, n_draws), expected, rtol=1e-12)
    # each rank once: the ECDF is z itself, as uniform as can be
    assert ecdf_statistic(np.arange(n_draws + 1), n_draws) == 1.0


def test_the_tail_table_in_blocks_gives_the_same_answers(monkeypatch):
    ranks = _uniform_ranks(4, 50, n_reps=30, n_draws=9)
    whole, band = ecdf_statistic(ranks, 9), ecdf_band(30, 9, n_sim=1_000, seed=5)
    monkeypatch.setattr(sbc, "_TABLE_ENTRIES", 3 * 31)  # blocks of three rows of z
    sbc._null_statistics.cache_clear()
    np.testing.assert_array_equal(ecdf_statistic(ranks, 9), whole)
    blocks = ecdf_band(30, 9, n_sim=1_000, seed=5)
    for key in band:
        np.testing.assert_array_equal(blocks[key], band[key])
    sbc._null_statistics.cache_clear()


def test_null_statistics_are_cached_read_only_and_seeded():
    null = null_statistics(N, L)
    assert null.shape == (20_000,) and not null.flags.writeable
    assert null_statistics(N, L, 20_000, 0) is null
    assert ((null > 0) & (null <= 1)).all()
    with pytest.raises(ValueError):
        null[0] = 1.0
    small = null_statistics(N, L, n_sim=500, seed=1)
    np.testing.assert_array_equal(small, null_statistics(N, L, n_sim=500, seed=1).copy())
    assert not np.array_equal(small, null_statistics(N, L, n_sim=500, seed=2))


def test_uniform_ranks_fail_at_the_nominal_rate():
    rows = 2_000
    p = np.array([r["p"] for r in sbc_test(_uniform_ranks(1, rows), L)])
    tolerance = 4 * np.sqrt(0.05 * 0.95 / rows)
    assert abs((p < 0.05).mean() - 0.05) < tolerance
    assert abs((p < 0.5).mean() - 0.5) < 4 * np.sqrt(0.25 / rows)


def test_band_covers_a_uniform_ecdf_at_its_level():
    band = ecdf_band(N, L, level=0.95)
    assert set(band) == {"z", "lower", "upper", "gamma"}
    np.testing.assert_allclose(band["z"], np.arange(1, L + 1) / (L + 1))
    assert (band["lower"] <= 0).all() and (band["upper"] >= 0).all()
    assert 0 < band["gamma"] < 0.05
    rows = 4_000
    ranks = _uniform_ranks(2, rows)
    difference = (ranks[:, :, None] < np.arange(1, L + 1)).mean(axis=1) - band["z"]
    inside = ((difference >= band["lower"] - 1e-9) & (difference <= band["upper"] + 1e-9)).all(axis=1)
    # inside the band exactly when the statistic reaches gamma
    np.testing.assert_array_equal(inside, ecdf_statistic(ranks, L) >= band["gamma"])
    assert abs(inside.mean() - 0.95) < 4 * np.sqrt(0.95 * 0.05 / rows)


def test_a_wider_level_gives_a_wider_band():
    narrow, wide = ecdf_band(N, L, level=0.5), ecdf_band(N, L, level=0.99)
    assert narrow["gamma"] > wide["gamma"]
    assert (wide["lower"] <= narrow["lower"]).all() and (wide["upper"] >= narrow["upper"]).all()


# -- power -------------------------------------------------------------------------------
@pytest.mark.parametrize("posterior", ["overconfident", "shifted"])
def test_a_miscalibrated_posterior_fails(rng, posterior):
    truth = rng.normal(size=(3, N))
    if posterior == "overconfident":  # too narrow: the truth falls at either end
        draws = rng.normal(0.0, 0.4, (L, 3, N))
    else:  # biased upwards: low ranks
        draws = rng.normal(1.0, 1.0, (L, 3, N))
    ranks = tie_randomized_rank(draws, truth, rng)
    ranks[0] = _uniform_ranks(3, 1)[0]  # one calibrated parameter passes
    result = sbc_test(ranks, L)
    assert result[0]["p"] > 1e-2 and not result[0]["failed"]
    for r in result[1:]:
        assert r["p"] < 1e-3 and r["failed"] and set(r) == {"p", "statistic", "failed"}


def test_failure_is_bonferroni_over_the_parameters():
    ranks = np.zeros((1, 20), dtype=int)
    ranks[0, :8] = 3  # far from uniform: p is about 1 / (1 + n_sim)
    p = sbc_test(ranks, 3, n_sim=2_000)[0]["p"]
    assert sbc_test(ranks, 3, alpha=1.01 * p, n_sim=2_000)[0]["failed"]
    many = np.repeat(ranks, 2, axis=0)
    assert not any(r["failed"] for r in sbc_test(many, 3, alpha=1.01 * p, n_sim=2_000))
    assert all(r["failed"] for r in sbc_test(many, 3, alpha=2.1 * p, n_sim=2_000))


# -- input -------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks, n_draws, kwargs, argument", [
    (np.zeros((2, 5)), 3, {}, "ranks"),
    (np.zeros(5, dtype=int), 3, {}, "ranks"),
    (np.zeros((2, 0), dtype=int), 3, {}, "ranks"),
    (np.zeros((2, 5), dtype=bool), 3, {}, "ranks"),
    (np.full((2, 5), 4), 3, {}, "ranks"),
    (np.full((2, 5), -1), 3, {}, "ranks"),
    (np.zeros((2, 5), dtype=int), 0, {}, "n_draws"),
    (np.zeros((2, 5), dtype=int), 3.0, {}, "n_draws"),
    (np.zeros((2, 5), dtype=int), 3, {"alpha": 0.0}, "alpha"),
    (np.zeros((2, 5), dtype=int), 3, {"n_sim": 0}, "n_sim"),
    (np.zeros((2, 5), dtype=int), 3, {"seed": None}, "seed"),
])
def test_sbc_test_rejects_bad_input(ranks, n_draws, kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument} "):
        sbc_test(ranks, n_draws, **kwargs)


@pytest.mark.parametrize("call, argument", [
    (lambda: ecdf_statistic(np.zeros(0, dtype=int), 3), "ranks"),
    (lambda: ecdf_statistic(np.array(2), 3), "ranks"),
    (lambda: ecdf_statistic([[1, 5]], 3), "ranks"),
    (lambda: ecdf_statistic([[1, 2]], -1), "n_draws"),
    (lambda: null_statistics(0, 3), "n_reps"),
    (lambda: null_statistics(5, True), "n_draws"),
    (lambda: null_statistics(5, 3, n_sim=2.5), "n_sim"),
    (lambda: null_statistics(5, 3, seed=-1), "seed"),
    (lambda: ecdf_band(5, 3, level=1.0), "level"),
    (lambda: ecdf_band(0, 3), "n_reps"),
    (lambda: ecdf_band(5, 3, level="0.9"), "level"),
])
def test_statistic_null_and_band_reject_bad_input(call, argument):
    with pytest.raises(ValueError, match=f"^{argument} "):
        call()


def test_the_module_does_not_load_jax():
    code = "import sys, latentsel.analysis.sbc; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
