"""A user-built world through the whole command line: its traces are generated, validated,
simulated and fitted exactly like the default world's, and a planted confusion is recovered."""
import json

import numpy as np
import pytest

import latentsel as ls
from latentsel.cli import main

WORLD_FILE = '''
from latentsel import Route, Skill, World


def _remove_vowels(s, alphabet):
    return "".join(c for c in s if c not in "aeiou") or s


def _shift1(s, alphabet):
    return "".join(alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in s)


WORLD = World(
    skills=(Skill("reverse", lambda s, a: s[::-1]), Skill("remove_vowels", _remove_vowels),
            Skill("double", lambda s, a: s + s), Skill("rotl", lambda s, a: s[1:] + s[:1]),
            Skill("first_half", lambda s, a: s[: (len(s) + 1) // 2]), Skill("shift1", _shift1)),
    routes=(Route("prev", lambda h: h[-1], reads=lambda t: (t - 1,)),
            Route("input", lambda h: h[0], reads=lambda t: (0,)),
            Route("cat", lambda h: h[-1] + h[0], reads=lambda t: (t - 1, 0))),
    alphabet="abcdefghij", max_len=12)
'''


@pytest.fixture()
def world_file(tmp_path):
    path = tmp_path / "myworld.py"
    path.write_text(WORLD_FILE)
    return f"{path}:WORLD"


def test_a_user_world_runs_through_the_command_line(tmp_path, world_file, capsys):
    prompts, sim, out = tmp_path / "prompts.jsonl.gz", tmp_path / "sim.jsonl.gz", tmp_path / "fit"
    assert main(["world", "--world", world_file]) == 0
    assert "remove_vowels" in capsys.readouterr().out
    assert main(["generate", "--regime", "eval-seen", "--n", "1500", "-o", str(prompts), "--world", world_file]) == 0
    assert main(["validate", str(prompts)]) == 1  # read as the default world: named, with the way out
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown routing 'cat'" in err and "--world" in err
    assert main(["validate", str(prompts), "--world", world_file]) == 0
    # a planted confusion: intended remove_vowels executes as reverse 30% of the time
    skill_exec = np.eye(6)
    skill_exec[1] = 0.0
    skill_exec[1, 1], skill_exec[1, 0] = 0.7, 0.3
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"params": {"route_exec": np.eye(3).tolist(), "skill_exec": skill_exec.tolist(),
                                            "noise": 0.01, "off_module": 0.01}}))
    assert main(["simulate", str(prompts), "--params", str(truth), "-o", str(sim), "--world", world_file]) == 0
    assert main(["fit", str(sim), "--out", str(out), "--world", world_file]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["world"]["skills"][1] == "remove_vowels" and fit["world"]["routes"][2] == "cat"
    assert abs(fit["params"]["skill_exec"][1][0] - 0.3) < 0.05
    # the labelled table answers "what runs instead of remove_vowels?"
    from latentsel.world.loading import load_world

    loaded = ls.load_fit(out, world=load_world(world_file))
    table = loaded.execution_table()
    instead = table[(table.kind == "skill") & (table.intended == "remove_vowels") & (table.executed != "remove_vowels")]
    top = instead.sort_values("prob", ascending=False).iloc[0]
    assert top.executed == "reverse" and top.lower < 0.3 < top.upper
    with pytest.raises(ValueError, match="other routing or skill names"):
        ls.load_fit(out)
    # identify simulates from the world's own modules (each task loads it by name) and reports
    ident = tmp_path / "identify"
    assert main(["identify", "--regimes", "sft", "--truths", "modular", "--sizes", "30", "--seeds", "0", "--nuts-max", "0", "--sbc", "2",
                 "--sbc-traces", "20", "--jobs", "1", "--backend", "sequential", "--world", world_file,
                 "--out", str(ident)]) == 0
    doc = json.loads((ident / "identify.json").read_text())
    assert len(doc["records"]) == 2 and doc["config"]["world"] == world_file
    parameters = json.loads((ident / "sbc.json").read_text())["sft"]["parameters"]
    assert parameters[0] == "route_exec[prev,prev]" and "skill_exec[reverse,reverse]" in parameters
    assert main(["report", str(ident)]) == 0 and (ident / "report.html").exists()


@pytest.mark.parametrize("value, message", [
    ("nocolon", "expected MODULE:ATTR"), ("missing.py:WORLD", "no such file"),
    ("json:__name__", "expected a World"), ("json:dumps", "json:dumps(): TypeError"), ("latentsel.nowhere_at_all:W", "cannot load latentsel.nowhere_at_all"),
])
def test_bad_world_specs_are_usage_errors(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["world", "--world", value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_failing_world_module_is_named_on_one_line(tmp_path):
    from latentsel.world.loading import load_world

    bad = tmp_path / "badw.py"
    bad.write_text('raise ValueError("bad\\nthing")\n')
    with pytest.raises(ValueError, match=r"^cannot load .*badw\.py: ValueError: bad thing$"):
        load_world(f"{bad}:W")
