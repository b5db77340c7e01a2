"""Each claim's verdict comes out either way on simulated data: a truth and a design built to
support it support it, and one built to refute it refutes it (DESIGN §6). C1 and C3 are shown
both ways on constructed records (tests/analysis/test_claims.py): C1 holds by construction for
the conjugate posterior, and no simulated design tried separates hidden compound steps (C3)."""
import pytest

from latentsel.analysis.claims import REFUTED, SUPPORTED, UNDECIDED, claim_verdicts
from latentsel.experiments.designs import Regime, Truth
from latentsel.experiments.identify import run_task

MODULAR = Truth("modular", "modular")
# execution depends on the previous skill at every step after the first: no modular row to contract on
EVERYWHERE = Truth("everywhere", "entangled", 1.0, "all")
ENTANGLED = Truth("entangled", "entangled", 1.0)


def _run(regime, truth, sizes, models, **kw):
    return [r for n in sizes for r in run_task(regime, n, 0, truth=truth, models=models, **kw)]


def _verdict(records, claim, spec):
    (v,) = claim_verdicts(records, {claim: spec})
    return v


def test_c1_rows_outside_the_support_stay_and_a_wrong_support_is_named(world):
    """C1 holds by construction for the conjugate posterior (a row without steps gets no counts):
    on simulated data it is supported, and a design whose data reach rows outside the support it
    declares is named as wrong, not taken as evidence. Its refutation, by a posterior that moves
    rows no step reaches, is in tests/analysis/test_claims.py."""
    honest = Regime("rl", "rl-compound", 1, 0.95)
    narrow = Regime("rl-declared-sft", "rl-compound", 1, 0.95, support="sft")
    records = _run(honest, MODULAR, (30, 60), ("entangled",), world=world)
    assert _verdict(records, "C1", {})["verdict"] == SUPPORTED
    records += _run(narrow, MODULAR, (30,), ("entangled",), world=world)
    v = _verdict(records, "C1", {})
    assert v["verdict"] == UNDECIDED and v["details"]["regime"] == "rl-declared-sft"


@pytest.mark.slow  # 4 fits up to N = 2000, about 16 s; the verdict's rules are in tests/analysis/test_claims.py
def test_c4_contracts_on_a_modular_truth_and_away_from_an_entangled_one(world):
    sft = Regime("sft", "sft", 1, 0.95)
    records = _run(sft, MODULAR, (300, 2000), ("modular",), world=world)
    records += _run(sft, EVERYWHERE, (300, 2000), ("modular",), world=world)
    good = _verdict(records, "C4", {"truth": "modular"})
    assert good["verdict"] == SUPPORTED, good["text"]
    bad = _verdict(records, "C4", {"truth": "everywhere"})
    assert bad["verdict"] == REFUTED and bad["details"]["sft"]["away"] == ["skill"], bad["text"]


@pytest.mark.slow  # 8 fits with 500 held-out traces each, about 30 s
def test_c2_varied_support_separates_and_golden_data_do_not(world):
    golden = Regime("sft", "sft", 1, 0.95)
    varied = Regime("sft+support", "rl-compound", 1, 0.95)
    records = [r for reg in (golden, varied) for r in _run(reg, ENTANGLED, (300, 3000), ("modular", "entangled"),
                                                           test_traces=500, world=world)]
    v = _verdict(records, "C2", {"truth": "entangled", "golden": "sft", "varied": "sft+support"})
    assert v["verdict"] == SUPPORTED and v["n"] == 3000, v["text"]
    # built to refute: the roles swapped, the "golden" data separate first
    v = _verdict(records, "C2", {"truth": "entangled", "golden": "sft+support", "varied": "sft"})
    assert v["verdict"] == REFUTED, v["text"]
