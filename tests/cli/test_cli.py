import json
import subprocess
import sys

import numpy as np
import pytest

from latentsel.cli import main
from latentsel.traces import read_traces


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "world", "generate", "validate"):
        assert cmd in out


def test_world_table(capsys):
    assert main(["world"]) == 0
    out = capsys.readouterr().out
    assert "zip_prev_input" in out and "paqbrcsdtu" in out
    assert "mirror" in out and "abcdeedcba" in out


def test_generate_and_validate(tmp_path, capsys):
    path = tmp_path / "sft.jsonl.gz"
    assert main(["generate", "--regime", "sft", "--n", "40", "--seed", "2", "-o", str(path)]) == 0
    traces = read_traces(path)
    assert len(traces) == 40 and traces[0].source["regime"] == "sft"
    assert main(["validate", str(path)]) == 0
    assert "40 valid traces" in capsys.readouterr().out


def test_validate_skip_invalid_reports_count(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    good = {"id": "a", "input": "abc", "program": None, "steps": ["cba"]}
    path.write_text(json.dumps(good) + "\n{bad\n" + json.dumps(dict(good, id="b", input="ABC")) + "\n")
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:2: invalid JSON" in err
    assert main(["validate", str(path), "--skip-invalid"]) == 0
    captured = capsys.readouterr()
    assert "1 valid traces" in captured.out and "2 invalid records skipped" in captured.out
    assert f"{path}:3:" in captured.err


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--regime", "nope", "--n", "3", "-o", "x.jsonl"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'nope'" in err


def test_debug_shows_traceback(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    plain = subprocess.run([sys.executable, "-m", "latentsel", "validate", missing], capture_output=True, text=True)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == f"latentsel validate: error: {missing}: no such file"
    debug = subprocess.run([sys.executable, "-m", "latentsel", "--debug", "validate", missing],
                           capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.slow  # its stages have their own tests; run it with -m slow
def test_demo_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--n", "30", "--sizes", "30", "--seeds", "0", "--nuts-max", "0", "--sbc", "2",
                 "--policy-traces", "30", "--nuts-traces", "0", "--jobs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "eval-ood" not in printed and "report.html" in printed
    # the shipped corpora and policies: attribution, LOO verdicts, the modularity test, fidelity
    assert "PSIS-LOO sft.seen:" in printed and "modularity sft (" in printed and "fidelity sft " in printed
    assert len(read_traces(out / "regimes" / "sft.jsonl.gz")) == 30
    records = json.loads((out / "identify" / "identify.json").read_text())["records"]
    from latentsel.experiments.designs import default_design

    cells = {(r, t) for r, t, _, _ in default_design().cells()}
    assert {(r["regime"], r["truth"], r["model"]) for r in records} == {(r, t, m) for r, t in cells
                                                                        for m in ("modular", "entangled")}
    assert (out / "policies" / "attribution.json").exists()
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 10 and "Identifiability experiments" in html


def test_simulate_then_fit_writes_design_files(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    assert main(["generate", "--regime", "eval-seen", "--n", "60", "-o", str(prompts)]) == 0
    sim = tmp_path / "sim.jsonl.gz"
    assert main(["simulate", str(prompts), "--model", "modular", "--seed", "1", "-o", str(sim)]) == 0
    traces = read_traces(sim)
    assert all(t.truth is not None and t.source["kind"] == "simulated" for t in traces)
    out = tmp_path / "fit"
    assert main(["fit", str(sim), "--model", "modular", "--method", "em", "--out", str(out)]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["model"] == "modular" and fit["method"] == "em"
    assert set(fit["params"]) == {"route_exec", "skill_exec", "noise", "off_module"}
    assert len(fit["params"]["route_exec"]) == 10 and isinstance(fit["log_evidence"], float)
    rows = [json.loads(line) for line in (out / "posterior.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [t.id for t in traces]
    step = rows[0]["steps"][0]
    assert set(step) == {"map_route", "map_skill", "p_off", "route_probs", "skill_probs"}
    assert len(step["route_probs"]) == 10 and len(step["skill_probs"]) == 24
    assert abs(sum(step["skill_probs"]) - 1) < 1e-9
    # simulate again from the fitted parameters
    assert main(["simulate", str(prompts), "--params", str(out / "fit.json"), "-o", str(tmp_path / "s2.jsonl")]) == 0


def test_fit_bad_input_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["fit", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "corpus is empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    free = tmp_path / "free.jsonl"
    free.write_text(json.dumps({"id": "a", "input": "abc", "program": None, "steps": ["cba"]}) + "\n")
    assert main(["fit", str(free), "--model", "modular", "--out", str(tmp_path / "o")]) == 1
    assert "states no program: only the grammar model applies" in capsys.readouterr().err
    assert main(["fit", str(free), "--model", "grammar", "--out", str(tmp_path / "g")]) == 0


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sim")
    prompts, sim = folder / "p.jsonl", folder / "sim.jsonl"
    assert main(["generate", "--regime", "eval-seen", "--n", "40", "-o", str(prompts)]) == 0
    assert main(["simulate", str(prompts), "--seed", "1", "-o", str(sim)]) == 0
    return sim


def _check_design_files(out, n_traces):
    fit = json.loads((out / "fit.json").read_text())
    assert set(fit["params"]) == {"route_exec", "skill_exec", "noise", "off_module"}
    assert isinstance(fit["log_evidence"], float) and fit["n_traces"] == n_traces
    rows = [json.loads(line) for line in (out / "posterior.jsonl").read_text().splitlines()]
    assert len(rows) == n_traces
    assert set(rows[0]["steps"][0]) == {"map_route", "map_skill", "p_off", "route_probs", "skill_probs"}
    return fit


@pytest.mark.slow  # 30-45 s of JIT compilation; the default suite keeps to 10 minutes
def test_fit_svi_writes_design_files(simulated, tmp_path, capsys):
    out = tmp_path / "svi"
    args = ["fit", str(simulated), "--method", "svi", "--guide", "normal", "--steps", "40", "--out", str(out)]
    assert main(args) == 0
    fit = _check_design_files(out, 40)
    assert fit["method"] == "svi" and fit["guide"] == "normal" and len(fit["losses"]) == 40
    assert set(fit["posterior_std"]) == set(fit["params"]) == set(fit["guide_scale"])
    assert "normal guide, 40 steps" in capsys.readouterr().out


@pytest.mark.slow  # 30-45 s of JIT compilation; the default suite keeps to 10 minutes
def test_fit_nuts_writes_draws_and_diagnostics(simulated, tmp_path, capsys):
    out = tmp_path / "nuts"
    args = ["fit", str(simulated), "--method", "nuts", "--warmup", "10", "--samples", "8", "--seed", "3",
            "--out", str(out)]
    assert main(args) == 0
    fit = _check_design_files(out, 40)
    assert fit["method"] == "nuts" and fit["nuts"]["chains"] == 2 and fit["nuts"]["draws"] == 8
    assert set(fit["nuts"]["sites"]["skill_exec"]) == {"r_hat_max", "ess_min", "ess_median"}
    with np.load(out / "samples.npz") as draws:
        assert draws["skill_exec"].shape == (2, 8, 24, 24) and draws["diverging"].shape == (2, 8)
        np.testing.assert_allclose(draws["skill_exec"].mean(axis=(0, 1)), fit["params"]["skill_exec"], rtol=1e-9)
    out_text = capsys.readouterr().out
    assert "max R-hat" in out_text and "samples.npz" in out_text
    # the files load back as the Fit they came from: draws, estimate and their table
    import latentsel as ls

    loaded = ls.load_fit(out)
    assert loaded.method == "nuts" and loaded.options.samples == 8 and loaded.conjugate is None
    with np.load(out / "samples.npz") as draws:
        np.testing.assert_array_equal(loaded.draws.skill_exec, draws["skill_exec"])
    np.testing.assert_array_equal(loaded.params.skill_exec, np.asarray(fit["params"]["skill_exec"]))
    table = loaded.execution_table()
    row = table[(table.kind == "skill") & (table.intended == "reverse") & (table.executed == "reverse")].iloc[0]
    assert row.lower <= np.quantile(loaded.draws.skill_exec[..., 0, 0], 0.5) <= row.upper


@pytest.mark.parametrize("option, message", [
    (["--method", "mcmc"], "invalid choice: 'mcmc'"),
    (["--method", "nuts", "--chains", "0"], "--chains: expected an integer >= 1, got 0"),
    (["--method", "nuts", "--samples", "2"], "--samples: expected an integer >= 4, got 2"),
    (["--method", "svi", "--lr", "-1"], "--lr: expected a positive number, got -1"),
    (["--method", "svi", "--guide", "laplace"], "invalid choice: 'laplace'"),
])
def test_fit_bad_options_are_one_line(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as info:
        main(["fit", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o"), *option])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_every_option_has_help_and_shows_its_default():
    """--help is the reference: no option without a sentence, and the defaults printed."""
    import argparse

    from latentsel.cli import build_parser

    missing, parsers = [], [("latentsel", build_parser())]
    while parsers:
        name, parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["simulate"].format_help().split())
    assert "(default: 0.02)" in text and "(default: 0)" in text


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err[:2000]
    return err


def test_validate_refuses_the_hidden_steps_fit_refuses(tmp_path, capsys):
    path = tmp_path / "three.jsonl"
    record = {"id": "a", "input": "abc", "program": [["prev", "reverse"]] * 4, "steps": [None, None, None, "cba"]}
    path.write_text(json.dumps(record) + "\n")
    assert main(["validate", str(path)]) == 1
    assert f"{path}:1: steps 1-3 are hidden; at most 2" in _one_error_line(capsys)


@pytest.mark.parametrize("hide, message", [
    (["1", "2", "3"], "--hide 1 2 3: trace 'eval-ood-000000': steps 1-3 are hidden; at most 2"),
    (["2", "9"], "--hide 9: trace 'eval-ood-000000' has 4 steps"),
])
def test_simulate_refuses_a_hide_fit_cannot_read(tmp_path, capsys, hide, message):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "s.jsonl"
    assert main(["generate", "--regime", "eval-ood", "--n", "3", "-o", str(prompts)]) == 0
    capsys.readouterr()
    assert main(["simulate", str(prompts), "--hide", *hide, "-o", str(out)]) == 1
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_an_error_message_is_capped(monkeypatch, capsys):
    import latentsel.cli.traces as cli_traces

    def huge(*args, **kwargs):
        raise ValueError("x" * 2_000_000 + "\nsecond line")

    monkeypatch.setattr(cli_traces, "read_traces", huge)
    assert main(["validate", "t.jsonl"]) == 1
    err = _one_error_line(capsys)
    assert len(err) < 1200 and err.rstrip().endswith("… (1999000 more characters)")
