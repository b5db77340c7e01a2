"""The claim verdicts on records built to come out each way: supported, refuted and undecided."""
import pytest

from latentsel.analysis.claims import REFUTED, SUPPORTED, UNDECIDED, claim_verdicts, pooled, verdict_c1, verdict_c2, \
    verdict_c3, verdict_c4


def rec(regime, n, seed=0, truth="t", model="modular", **values):
    return {"regime": regime, "n_traces": n, "seed": seed, "truth": truth, "model": model, **values}


def test_pooled_means_over_seeds_with_their_standard_errors():
    rs = [rec("a", 10, 0, x=1.0, x_se=0.3), rec("a", 10, 1, x=3.0, x_se=0.4), rec("a", 20, 0, x=5.0, x_se=None)]
    out = pooled(rs, "x", "x_se")
    # the seeds disagree by more than their own errors: the spread between them is the se
    assert out[10] == pytest.approx((2.0, 1.0, 2)) and out[20] == (5.0, None, 1)
    close = [rec("a", 10, 0, x=1.0, x_se=0.3), rec("a", 10, 1, x=1.1, x_se=0.4)]
    assert pooled(close, "x", "x_se")[10] == pytest.approx((1.05, 0.25, 2))  # sqrt(0.09 + 0.16) / 2
    assert pooled(rs[:2], "x")[10][1] == pytest.approx(1.0)  # sd 1.414 / sqrt(2)


def test_c1_each_way():
    still = [rec("a", n, model="entangled", rows_outside=5, kl_outside_max=0.0) for n in (10, 100)]
    assert verdict_c1(still)["verdict"] == SUPPORTED
    moved = still + [rec("b", 100, model="entangled", rows_outside=5, kl_outside_max=0.2)]
    v = verdict_c1(moved)
    assert v["verdict"] == REFUTED and v["details"] == {"regime": "b"}
    assert verdict_c1([rec("a", 10, rows_outside=0, kl_outside_max=None)])["verdict"] == UNDECIDED
    assert verdict_c1(moved, {"regimes": ["a"]})["verdict"] == SUPPORTED
    # data beyond the support they declare: a wrong declaration, not evidence either way
    wrong = verdict_c1(still + [rec("c", 10, model="entangled", rows_outside=3, kl_outside_max=0.0,
                                    rows_outside_reached=2)])
    assert wrong["verdict"] == UNDECIDED and "declared support is wrong" in wrong["text"]


def c2_records(golden, varied, sizes=(100, 300, 1000)):
    rs = []
    for name, deltas in (("g", golden), ("v", varied)):
        for n, d in zip(sizes, deltas):
            rs.append(rec(name, n, model="entangled", heldout_diff=d, heldout_diff_se=0.05))
    return rs


@pytest.mark.parametrize("golden, varied, verdict, n", [
    ((-2, -1, -0.5), (-1, 0.5, 1.5), SUPPORTED, 300),        # varied separates, golden never
    ((-1, 0.5, 1.0), (-1, -0.5, 1.0), REFUTED, 300),         # golden separates first
    ((-2, -1, -0.5), (-1, -0.5, 0.05), UNDECIDED, 1000),     # nothing separates at this N
    ((-1, 0.5, 1.0), (-1, 0.5, 1.0), UNDECIDED, 1000),       # together: not sooner at this grid
    ((-2, -1, -0.5), (0.5, -0.1, 1.0), SUPPORTED, 1000),     # a separation must hold at every larger N
])
def test_c2_each_way(golden, varied, verdict, n):
    v = verdict_c2(c2_records(golden, varied), {"truth": "t", "golden": "g", "varied": "v"})
    assert v["verdict"] == verdict and v["n"] == n
    assert v["interval"] == pytest.approx([varied[-1] - 0.1, varied[-1] + 0.1])


def test_c2_not_measured_is_undecided():
    assert verdict_c2([], {"truth": "t", "golden": "g", "varied": "v"})["verdict"] == UNDECIDED


@pytest.mark.parametrize("gaps, verdict", [
    ((0.20, 0.05), SUPPORTED),
    ((0.05, 0.20), REFUTED),       # varied data leave more unresolved
    ((0.050, 0.047), UNDECIDED),   # within the interval (as the default design measures)
])
def test_c3_each_way(gaps, verdict):
    rs = [rec(name, 300, compound_gap=g, compound_gap_se=0.01) for name, g in zip(("c", "s"), gaps)]
    v = verdict_c3(rs, {"truth": "t", "compressed": "c", "separated": "s"})
    assert v["verdict"] == verdict and v["n"] == 300
    assert v["value"] == pytest.approx(gaps[0] - gaps[1])


def test_c3_equivalence_refutes_with_a_tight_interval():
    rs = [rec(name, 300, compound_gap=0.05, compound_gap_se=0.001) for name in ("c", "s")]
    assert verdict_c3(rs, {"truth": "t", "compressed": "c", "separated": "s"})["verdict"] == REFUTED


@pytest.mark.parametrize("errors, log_z, verdict", [
    ((0.40, 0.10), (1.0, 0.5), SUPPORTED),
    ((0.40, 0.38), (1.0, 1.0), UNDECIDED),
    ((0.20, 0.30), (1.0, 1.0), REFUTED),   # error grows
    ((0.40, 0.30), (0.5, 1.5), REFUTED),   # contracts away from the truth
])
def test_c4_each_way(errors, log_z, verdict):
    rs = [rec("a", n, class_param_error=e, class_param_error_se=0.01, skill_log_z=z, skill_log_z_se=0.1,
              route_log_z=0.5, route_log_z_se=0.1) for n, e, z in zip((100, 1000), errors, log_z)]
    v = verdict_c4(rs, {"truth": "t"})
    assert v["verdict"] == verdict and v["details"]["a"]["n_max"] == 1000


def test_claim_verdicts_in_claim_order():
    out = claim_verdicts([], {"C4": {"truth": "t"}, "C1": {}})
    assert [v["claim"] for v in out] == ["C1", "C4"] and all(v["verdict"] == UNDECIDED for v in out)
