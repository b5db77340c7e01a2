"""Designs as data: the shipped default, TOML files with errors that name the file and the
entry, and the command line's overrides."""
import pytest

from latentsel.experiments.designs import DEFAULT_DESIGN, Design, DesignError, Regime, Truth, load_design

BASE = """
[base]
source = "sft"
traces_per_prompt = 1
fidelity = 0.95

[regimes]
sft = {}
rl = {source = "rl-compound", traces_per_prompt = 4, fidelity = 0.8}

[truths]
modular = {kind = "modular"}
tangled = {kind = "entangled", strength = 0.5, contexts = "all"}

[[runs]]
regimes = ["sft", "rl"]
truths = ["modular", "tangled"]
sizes = [20, 40]
seeds = [0]
"""


def _write(tmp_path, text, name="design.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_default_design_holds_every_claim_and_one_factor_designs():
    design = load_design()
    assert design.source == "latentsel/experiments/default_design.toml" and DEFAULT_DESIGN.is_file()
    assert set(design.claims) == {"C1", "C2", "C3", "C4"}
    base = design.regimes["sft"]
    # every sft+X regime differs from the base in exactly one factor
    for name, regime in design.regimes.items():
        if name.startswith("sft+"):
            changed = [f for f in Regime._fields if f != "name" and getattr(regime, f) != getattr(base, f)]
            assert len(changed) == 1, (name, changed)
    assert design.regimes["compressed+rl"].hide == (2,) and design.regimes["compressed+rl"].varied == 4
    assert design.truths["entangled"] == Truth("entangled", "entangled", 1.0, "beyond-sft")
    cells = design.cells()
    assert len(cells) == len(set(cells)) and ("rl", "entangled", 1000, 1) in cells
    assert design.test_traces_of("compressed", "modular") == 0 and design.test_traces_of("rl", "entangled") == 1000


def test_a_design_file_inherits_the_base_and_round_trips(tmp_path):
    design = load_design(_write(tmp_path, BASE))
    assert design.regimes["sft"] == Regime("sft", "sft", 1, 0.95, (), 0, None)
    assert design.regimes["rl"].per_prompt == 4 and design.regimes["rl"].declared_support == "rl-compound"
    assert design.truths["tangled"].contexts == "all"
    assert len(design.cells()) == 2 * 2 * 2
    assert design.to_json()["runs"][0]["sizes"] == [20, 40]


def test_overrides_restrict_the_runs_and_replace_sizes_and_seeds(tmp_path):
    design = load_design(_write(tmp_path, BASE))
    small = design.restrict(regimes=["rl"], truths=["modular"], sizes=[10], seeds=[3, 4])
    assert small.cells() == [("rl", "modular", 10, 3), ("rl", "modular", 10, 4)]
    with pytest.raises(ValueError, match="no regime 'nope'; it has sft, rl"):
        design.restrict(regimes=["nope"])
    with pytest.raises(ValueError, match="unknown model"):
        design.restrict(models=["grammar"])


@pytest.mark.parametrize("change, message", [
    ('[regimes]\nx = {fidelty = 0.9}\n', r"regimes\.x: unknown field 'fidelty'"),
    ('[regimes]\nx = {source = "sfx"}\n', r"regimes\.x\.source: unknown prompt regime 'sfx'"),
    ('[regimes]\nx = {fidelity = 1.5}\n', r"regimes\.x\.fidelity: must lie in"),
    ('[regimes]\nx = {hide = [0]}\n', r"regimes\.x\.hide: expected 1-based"),
    ('[truths]\nt = {kind = "tangled"}\n', r"truths\.t\.kind: unknown truth 'tangled'"),
    ('[truths]\nt = {kind = "entangled", strength = 2}\n', r"truths\.t\.strength"),
    ('[[runs]]\nregimes = ["nope"]\nsizes = [1]\nseeds = [0]\n', r"runs #1\.regimes: no regime 'nope'"),
    ('[[runs]]\nregimes = ["sft"]\nsizes = [0]\nseeds = [0]\n', r"runs #1\.sizes: expected integers >= 1"),
    ('[[runs]]\nregimes = ["sft"]\nseeds = [0]\n', r"runs #1: missing field 'sizes'"),
    ('[claims]\nC2 = {truth = "tangled", golden = "sft", varied = "nope"}\n', r"claims\.C2\.varied: no regime"),
    ('[claims]\nC2 = {truth = "modular", golden = "sft", varied = "rl"}\n', r"claims\.C2\.truth: C2 is about an "
                                                                            r"entangled truth; 'modular' is modular"),
    ('[claims]\nC4 = {regimes = ["sft"]}\n', r"claims\.C4: missing field 'truth'"),
    ('[claims]\nC9 = {}\n', r"\[claims\]: unknown field 'C9'"),
    ('bogus = 1\n', r"unknown field 'bogus'"),
    ('[regimes]\nx = {\n', r"not a TOML design: .*at line 8"),
])
def test_a_bad_design_is_one_line_naming_the_file_and_entry(tmp_path, change, message):
    if change.startswith("[regimes]\n"):
        doc = BASE.replace("[regimes]\n", change)
    elif change.startswith("[truths]\n"):
        doc = BASE.replace("[truths]\n", change)
    elif change.startswith("[[runs]]\n"):
        doc = BASE.split("[[runs]]")[0] + change
    else:
        doc = BASE + change
    path = _write(tmp_path, doc)
    with pytest.raises(DesignError, match=message) as info:
        load_design(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_missing_design_file_is_named(tmp_path):
    with pytest.raises(DesignError, match=f"{tmp_path / 'none.toml'}: cannot read the design"):
        load_design(tmp_path / "none.toml")
    assert isinstance(load_design(), Design)


def test_sbc_runs_once_per_data_layout():
    """Regimes that differ only in fidelity share an SBC (its truths come from the prior)."""
    groups = dict(load_design().sbc_groups())
    assert groups["sft"] == ("sft", "sft+errors") and groups["compressed"] == ("compressed", "compressed+errors")
    assert groups["compressed+rl"] == ("compressed+rl", "compressed+errors+rl") and "rl" in groups
    assert sum(len(v) for v in groups.values()) == len({r for run in load_design().runs for r in run.regimes})
    assert load_design()._replace(sbc_reps=0).sbc_groups() == []
    assert dict(load_design().restrict(regimes=["rl"]).sbc_groups()) == {"rl": ("rl",)}
