"""Verdicts come out either way, and only where their diagnostics carry them."""
import numpy as np

from latentsel.analysis.verdicts import compare_verdict, loo_verdict, mcmc_flags, ppc_flags


def _records(diff, dse, bad=(0, 0)):
    return [{"model": "modular", "elpd_diff": 0.0, "dse": 0.0, "n_bad_k": bad[0]},
            {"model": "entangled", "elpd_diff": diff, "dse": dse, "n_bad_k": bad[1]}]


def test_compare_verdict_both_ways_and_undecided():
    assert compare_verdict(3.0, 1.0, "a", "b")["preferred"] == "a"
    assert compare_verdict(-3.0, 1.0, "a", "b")["preferred"] == "b"
    v = compare_verdict(1.9, 1.0, "a", "b")
    assert v["preferred"] is None and v.text.startswith("no preference")
    assert compare_verdict(float("nan"), 1.0, "a", "b")["reliable"] is False


def test_loo_prefers_only_with_clean_k_and_two_dse():
    assert loo_verdict(_records(65.6, 20.0), threshold=0.7)["preferred"] == "modular"
    v = loo_verdict(_records(65.6, 55.0), threshold=0.7)  # the case seen on a shipped corpus
    assert v["preferred"] is None and "no preference" in v.text
    v = loo_verdict(_records(65.6, 20.0, bad=(3, 91)), threshold=0.7)
    assert v["preferred"] is None and v["bad_k"] == {"modular": 3, "entangled": 91} and "entangled 91" in v.text


def test_mcmc_flags():
    assert mcmc_flags([1.0, 1.005], [900, 450]) == []
    flags = mcmc_flags([1.0, 1.06], [900, 12])
    assert len(flags) == 2 and "1.060" in flags[0] and "12" in flags[1]
    assert mcmc_flags([float("nan")], [500])  # a NaN R-hat is not a pass


def test_ppc_flags():
    rng = np.random.default_rng(0)
    rep = {"depth1": rng.normal(0.03, 0.01, 400), "depth2": rng.normal(0.4, 0.05, 400)}
    out = {r["statistic"]: r for r in ppc_flags({"depth1": 0.40, "depth2": 0.41}, rep)}
    assert out["depth1"]["failed"] and out["depth1"]["p"] == 0.0
    assert not out["depth2"]["failed"] and out["depth2"]["p"] > 0.5


def test_sbc_flags_are_bonferroni_corrected():
    from latentsel.analysis.verdicts import sbc_failed, sbc_flags

    assert sbc_failed([0.001, 0.004, 0.02, float("nan")]) == [True, False, False, True]  # cut 0.01 / 4
    lines = sbc_flags(["a", "b"], [0.004, 0.3])
    assert len(lines) == 1 and lines[0].startswith("SBC FAILED: a ")
    assert sbc_flags(["a", "b"], [0.006, 0.3]) == []  # 0.006 > 0.01 / 2
