"""The identify, analyze and report commands, and error attribution on policy corpora."""
import json
import shutil
from pathlib import Path

import pytest

from latentsel import plots
from latentsel.analysis.attribution import CATEGORIES
from latentsel.cli import main
from latentsel.experiments import sweeps
from latentsel.experiments.designs import IDENTIFY_MODELS, SWEEP_BACKENDS
from latentsel.experiments.policy_fits import find_corpora
from latentsel.models.registry import default_params
from latentsel.traces import write_traces
from latentsel.traces.regimes import generate
from latentsel.traces.simulate import simulate

IDENTIFY_FIELDS = {"regime", "truth", "model", "n_traces", "seed", "map_accuracy", "class_accuracy", "truth_mass",
                   "param_error", "class_param_error", "class_coverage", "kl_reached", "kl_unreached", "heldout_diff",
                   "compound_gap", "kl_outside_max", "nuts_converged"}


def test_command_choices_are_the_design_tables(tmp_path, capsys):
    """The identify command offers exactly the JAX-free tables' entries."""
    for flag, table in (("--models", IDENTIFY_MODELS), ("--backend", SWEEP_BACKENDS)):
        with pytest.raises(SystemExit):
            main(["identify", flag, "bogus", "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert all(name in err for name in table) and flag in err


@pytest.mark.slow  # 30-45 s of JIT compilation; the default suite keeps to 10 minutes
def test_identify_then_report(tmp_path, capsys):
    out = tmp_path / "run" / "identify"
    assert main(["identify", "--regimes", "sft,compressed", "--truths", "modular", "--sizes", "40", "80", "--seeds",
                 "0", "1", "--nuts-max", "0", "--sbc", "3", "--sbc-traces", "20", "--jobs", "1", "--backend",
                 "sequential", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "compressed" in printed and "identify.json" in printed and "C4 (sft, rl, modular truth): " in printed
    doc = json.loads((out / "identify.json").read_text())
    assert len(doc["records"]) == 2 * 2 * 2 * 2
    for rec in doc["records"]:
        assert IDENTIFY_FIELDS <= set(rec)
    assert [v["claim"] for v in doc["verdicts"]] == ["C1", "C2", "C3", "C3", "C4"]
    assert doc["design"]["runs"] and {c["regime"] for c in doc["posterior_checks"]} == {"sft", "compressed"}
    assert len(json.loads((out / "sbc.json").read_text())["sft"]["ranks"][0]) == 3
    section = json.loads((out / "section.json").read_text())
    for fig in section["figures"]:
        assert (out / fig["file"]).stat().st_size > 5000
    assert main(["report", str(tmp_path / "run")]) == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("<img") == len(section["figures"])


# three fits and two SBC replications, of the shapes test_identify_then_report compiles
TINY_IDENTIFY = ["identify", "--regimes", "sft", "--truths", "modular", "--sizes", "40", "--seeds", "0", "1", "2",
                 "--models", "modular", "--nuts-max", "0", "--sbc", "2", "--sbc-traces", "20", "--jobs", "1",
                 "--backend", "sequential"]


def _placeholder_figure(fig, path, dpi=110):
    """Figures drawn but not rendered: rendering is most of a tiny identify run's time."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n")
    return Path(path)


def _identify(mp, out, *extra) -> int:
    mp.setattr(plots, "save_figure", _placeholder_figure)
    return main([*TINY_IDENTIFY, *extra, "--out", str(out)])


def _records(out):
    """identify.json without its wall-clock field, and the fit times apart."""
    doc = json.loads((out / "identify.json").read_text())
    return doc, [r.pop("fit_seconds") for r in doc["records"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("identify") / "uninterrupted"
    with pytest.MonkeyPatch.context() as mp:
        assert _identify(mp, out) == 0
    return out


def _count_fits(monkeypatch, fail_at=None):
    """The (regime, N, seed) of every fit the sweep runs; the ``fail_at``-th raises, as a kill would stop it."""
    calls, real = [], sweeps.run_task

    def counted(regime, n, seed, **kwargs):
        calls.append((regime.name, n, seed))
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(regime, n, seed, **kwargs)

    monkeypatch.setattr(sweeps, "run_task", counted)
    return calls


def test_identify_writes_its_verdicts_as_markdown(uninterrupted):
    text = (uninterrupted / "summary.md").read_text()
    doc = json.loads((uninterrupted / "identify.json").read_text())
    assert text.startswith("# Identifiability experiments") and "## Verdicts" in text
    for v in doc["verdicts"]:  # one row per verdict, none decided by a one-size run
        assert f"| {v['label']} | {v['verdict']} |" in text and v["verdict"] == "undecided at this N"
    assert "| sft | modular | modular | 40 | 3 |" in text


def test_identify_reruns_only_the_missing_task(uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    (out / "identify.json").unlink()
    (lost,) = (out / ".tasks").glob("identify-sft-modular-N40-seed1-*.json")
    lost.unlink()
    fits = _count_fits(monkeypatch)
    assert _identify(monkeypatch, out) == 0
    assert fits == [("sft", 40, 1)]
    printed = capsys.readouterr().out
    assert f"identify: 4 of 5 tasks (fits and SBC replications) already done in {out}, running 1" in printed
    (doc, seconds), (want, want_seconds) = _records(out), _records(uninterrupted)
    assert doc == want
    assert seconds[::2] == want_seconds[::2]  # seeds 0 and 2 were read back, with their fit times
    assert (out / "sbc.json").read_text() == (uninterrupted / "sbc.json").read_text()
    # --fresh runs every task again
    fits.clear()
    assert _identify(monkeypatch, out, "--fresh") == 0
    assert len(fits) == 3 and "already done" not in capsys.readouterr().out
    assert _records(out)[0] == want


def test_a_rerun_stopped_half_way_leaves_no_section_to_report(uninterrupted, tmp_path, monkeypatch):
    """A rerun into a finished folder retracts its section first: stopped half-way, it leaves
    files of two runs and no section vouching for them, so the report refuses the folder."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    for task in (out / ".tasks").glob("identify-*.json"):
        task.unlink()
    _count_fits(monkeypatch, fail_at=2)
    assert _identify(monkeypatch, out) == 130
    assert not (out / "section.json").exists() and (out / "identify.json").exists()
    assert main(["report", str(out)]) == 1


def test_identify_resumes_after_a_kill(uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    fits = _count_fits(monkeypatch, fail_at=3)
    assert _identify(monkeypatch, out) == 130  # interrupted in the third fit
    assert not (out / "identify.json").exists() and len(list((out / ".tasks").glob("*.json"))) == 2
    fits = _count_fits(monkeypatch)
    assert _identify(monkeypatch, out) == 0
    assert fits == [("sft", 40, 2)]
    assert "identify: 2 of 5 tasks (fits and SBC replications) already done" in capsys.readouterr().out
    assert _records(out)[0] == _records(uninterrupted)[0]
    assert (out / "sbc.json").read_text() == (uninterrupted / "sbc.json").read_text()


def test_identify_names_what_the_design_lacks(tmp_path, capsys):
    assert main(["identify", "--regimes", "sft,nope", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "default_design.toml: no regime 'nope'; it has sft, " in err and err.count("\n") == 1
    bad = tmp_path / "design.toml"
    bad.write_text("[regimes]\nsft = {fidelity = 2}\n")
    assert main(["identify", "--design", str(bad), "--out", str(tmp_path / "y")]) == 1
    assert f"{bad}: regimes.sft.fidelity: must lie in (0, 0.98), got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("argv, message", [
    (["identify", "--sizes", "0", "--out", "x"], "expected an integer >= 1"),
    (["identify", "--backend", "spark", "--out", "x"], "invalid choice"),
])
def test_identify_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def _corpora(folder, world):
    params = default_params("modular", world.n_routes, world.n_skills, fidelity=0.7, noise=0.05, off_module=0.05)
    for policy, seed in (("alpha", 0), ("beta", 1)):
        for split in ("seen", "unseen", "ood"):
            prompts = generate(f"eval-{split}", 40, seed, world=world)
            traces = simulate(prompts, params, "modular", world, seed)
            for tr in traces[:5]:  # completions that stopped after their first step
                tr.steps[1:] = [None] * (tr.depth - 1)
                tr.extra["malformed"] = f"1 of {tr.depth} steps"
            write_traces(folder / f"{policy}.eval-{split}.jsonl.gz", traces)
    (folder / "notes.txt").write_text("not a corpus")


@pytest.mark.slow  # 90 s end to end; the demo test (slow) runs analyze too
def test_analyze_writes_attribution_modularity_and_diagnostics(tmp_path, world, capsys):
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    _corpora(corpora, world)
    found = find_corpora(corpora)
    assert sorted(found) == [(p, s) for p in ("alpha", "beta") for s in ("ood", "seen", "unseen")]
    assert sorted(find_corpora(corpora, ["beta"])) == [("beta", s) for s in ("ood", "seen", "unseen")]
    out = tmp_path / "analysis"
    assert main(["analyze", str(corpora), "--draws", "10", "--nuts-traces", "20", "--nuts-draws", "8", "--folds",
                 "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert printed.count("PSIS-LOO") == 6 and printed.count("modularity ") == 2 and "NUTS on 20 traces" in printed
    assert "NOT CONVERGED" in printed or "TOO FEW DRAWS" in printed  # 8 draws a chain cannot pass
    assert captured.err.count("5 of 40 completions malformed") == 6
    rows = json.loads((out / "attribution.json").read_text())["rows"]
    assert [(r["policy"], r["split"]) for r in rows] == [(p, s) for p in ("alpha", "beta")
                                                         for s in ("seen", "unseen", "ood")]
    for r in rows:  # every program step accounted for; the stopped ones counted, not fitted
        assert sum(r[c] for c in CATEGORIES) == pytest.approx(1.0)
        assert r["stopped"] == pytest.approx(5 * (r["steps"] // 40 - 1) / r["steps"])
    loo = json.loads((out / "alpha.seen" / "loo.json").read_text())
    assert {r["model"] for r in loo["compare"]} == {"modular", "entangled"} and "text" in loo["verdict"]
    assert len(json.loads((out / "modularity.json").read_text())["modularity"]) == 2
    for name in ("fit.json", "posterior.jsonl"):
        assert (out / "alpha.seen" / "entangled" / name).exists()
    assert (out / "diagnostics" / "idata.nc").exists()
    assert len(json.loads((out / "diagnostics" / "section.json").read_text())["figures"]) == 4
    assert main(["report", str(out)]) == 0


def test_find_corpora_errors(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        find_corpora(tmp_path / "missing")
    with pytest.raises(ValueError, match="no corpora named"):
        find_corpora(tmp_path)


@pytest.mark.parametrize("command", [["identify", "--regimes", "sft", "--truths", "modular", "--sizes", "20", "--seeds",
                                      "0", "--sbc", "0", "--nuts-max", "0"], ["analyze", "CORPORA"]])
def test_a_second_run_into_one_out_fails_at_once(tmp_path, capsys, command):
    from tests.test_io import another_run_holding

    out = tmp_path / "out"
    out.mkdir()
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    with another_run_holding(out) as pid:
        args = [str(corpora) if a == "CORPORA" else a for a in command]
        assert main(args + ["--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"being written by another latentsel run (pid {pid})" in captured.err and not captured.out
