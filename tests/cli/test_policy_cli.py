"""``latentsel train``, ``sample``, ``evaluate`` and ``protocol`` end to end at tiny size."""
import json

import pytest

from latentsel.cli import main
from latentsel.traces import read_traces
from tests._policy_util import one_thread  # noqa: F401 - autouse fixture

TINY = ["--preset", "tiny", "--regime", "toy", "--batch-size", "4", "--pool", "16", "--max-depth", "4",
        "--log-every", "1", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "sft"
    assert main(["train", "sft", "--out", str(out), "--steps", "2", "--warmup", "1", *TINY]) == 0
    return out / "checkpoint.pt"


def test_train_sft_writes_checkpoint_metrics_and_summary(checkpoint, capsys):
    out = checkpoint.parent
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
    summary = json.loads((out / "train.json").read_text())
    assert summary["device"] == "cpu" and summary["config"]["preset"] == "tiny"
    # a finished run started again changes nothing and reports its own summary
    assert main(["train", "sft", "--out", str(out), "--steps", "2", "--warmup", "1", *TINY]) == 0
    assert "2 steps on cpu" in capsys.readouterr().out


def test_train_rl_from_the_sft_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "rl"
    assert main(["train", "rl", "--init", str(checkpoint), "--out", str(out), "--regime", "rl-atomic",
                 "--steps", "1", "--batch-size", "2", "--group-size", "2", "--pool", "8", "--kl-coef", "0.1",
                 "--no-progress"]) == 0
    [record] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["groups"] == 2 and 0 <= record["groups_skipped"] <= 2
    assert "reward" in capsys.readouterr().out


def test_sample_writes_policy_traces(checkpoint, tmp_path, capsys):
    prompts, traces = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl.gz"
    assert main(["generate", "--regime", "eval-ood", "--n", "5", "-o", str(prompts)]) == 0
    assert main(["sample", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "-o", str(traces),
                 "--temperature", "1", "--samples", "2", "--seed", "4", "--no-progress"]) == 0
    back = read_traces(traces)
    assert len(back) == 10 and all(len(t.steps) == 4 for t in back)
    assert back[0].source == {"kind": "policy", "policy": "sft", "checkpoint": str(checkpoint), "seed": 4,
                              "device": "cpu", "temperature": 1.0}
    assert "wrote 10 traces" in capsys.readouterr().out


def test_evaluate_writes_json_and_markdown(checkpoint, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--policy", f"a={checkpoint}", "--policy", f"b={checkpoint}", "--n", "3",
                 "--out", str(out), "--save-traces", "--no-progress", "--title", "Tiny run"]) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["device"] == "cpu" and list(record["policies"]) == ["a", "b"]
    cell = record["policies"]["a"]["splits"]["eval-ood"]
    assert cell["n"] == 3 and cell["depth"] == 4 and len(cell["by_depth"]) == 4
    assert record["policies"]["a"]["splits"] == record["policies"]["b"]["splits"]
    table = (out / "eval.md").read_text()
    assert table.startswith("# Tiny run") and "| a | " in table and "eval-ood (depth 4)" in table
    assert len(read_traces(out / "traces" / "b.eval-seen.jsonl.gz")) == 3


def test_protocol_runs_every_stage(tmp_path):
    out = tmp_path / "protocol"
    assert main(["protocol", "--out", str(out), "--size", "tiny", "--eval-n", "3", "--corpus-n", "3",
                 "--no-progress"]) == 0
    record = json.loads((out / "protocol.json").read_text())
    assert record["device"] == "cpu" and set(record["stages"]) == {"sft", "rl-atomic", "rl-compound"}
    assert set(record["evaluation"]) == {"sft", "sft+rl-atomic", "sft+rl-compound"}
    assert len(record["corpora"]) == 9
    assert len(read_traces(out / "corpora" / "sft+rl-compound.eval-ood.jsonl.gz")) == 3


def test_a_budgeted_protocol_is_sized_by_calibration_and_reruns_on_its_folder(tmp_path):
    out = tmp_path / "protocol"
    argv = ["protocol", "--out", str(out), "--size", "tiny", "--eval-n", "2", "--corpus-n", "2", "--budget", "120",
            "--no-progress"]
    assert main(argv) == 0
    record = json.loads((out / "protocol.json").read_text())
    sizing = record["sizing"]["sft"]
    assert sizing["calibration_steps"] == 13 and sizing["s_per_step"] > 0 and sizing["steps"] >= 1
    assert record["stages"]["sft"]["steps"] == sizing["steps"]
    assert not (out / ".calibration" / "sft").exists()
    # started again, every stage is finished: nothing is recalibrated and nothing refuses to resume
    assert main(argv) == 0
    again = json.loads((out / "protocol.json").read_text())
    assert again["sizing"]["sft"] is None and again["stages"]["sft"]["steps"] == sizing["steps"]


@pytest.mark.parametrize("argv, code, message", [
    (["sample", "--checkpoint", "missing.pt", "--prompts", "p.jsonl", "-o", "o.jsonl"], 1, "p.jsonl: no such file"),
    (["evaluate", "--policy", "a=missing.pt", "--out", "x", "--n", "1"], 1, "missing.pt: no such checkpoint file"),
    (["evaluate", "--policy", "missing.pt", "--out", "x"], 2, "expected NAME=CHECKPOINT"),
    (["train", "rl", "--out", "x"], 2, "--init"),
    (["train", "sft", "--out", "x", "--steps", "0"], 2, "expected an integer >= 1"),
    (["train", "sft", "--out", "x", "--preset", "huge"], 2, "invalid choice"),
])
def test_bad_input_is_one_line(argv, code, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if code == 2:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    else:
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_sample_names_a_bad_checkpoint(tmp_path, capsys):
    prompts, bad = tmp_path / "p.jsonl", tmp_path / "bad.pt"
    assert main(["generate", "--regime", "sft", "--n", "2", "-o", str(prompts)]) == 0
    bad.write_text("garbage")
    assert main(["sample", "--checkpoint", str(bad), "--prompts", str(prompts), "-o", str(tmp_path / "o.jsonl")]) == 1
    assert f"{bad}: not a readable policy checkpoint" in capsys.readouterr().err


def test_help_lists_the_policy_commands_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from latentsel.cli import build_parser; p = build_parser(); "
            "h = p.format_help(); assert all(c in h for c in ('train', 'sample', 'evaluate', 'protocol')), h; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", ".hidden", "x" * 65])
def test_evaluate_refuses_a_policy_name_that_is_a_path(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--policy", f"{name}=ckpt.pt", "--out", "evout", "--save-traces"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "policy name" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def _checkpoint_of(tmp_path, tok, max_depth=4):
    import torch

    from latentsel.policy.checkpoint import save_checkpoint
    from latentsel.policy.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(tok.vocab_size, tok.block_size(max_depth), 1, 1, 8, slot_layout=tok.segment_tokens))
    path = tmp_path / "other.pt"
    save_checkpoint(path, model, tok, step=0, policy="other")
    return path


def test_a_checkpoint_of_another_world_is_named(tmp_path, capsys):
    from latentsel.policy.tokenizer import Tokenizer
    from latentsel.world import default_world

    tok = Tokenizer.from_world(default_world())
    other = Tokenizer(tok.alphabet, tok.routes, tok.skills[:-1] + ("remove_vowels",), tok.max_len)
    ckpt = _checkpoint_of(tmp_path, other)
    prompts = tmp_path / "p.jsonl"
    assert main(["generate", "--regime", "eval-seen", "--n", "2", "-o", str(prompts)]) == 0
    assert main(["sample", "--checkpoint", str(ckpt), "--prompts", str(prompts), "-o", str(tmp_path / "o.jsonl"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{ckpt}: a policy of another world" in err and "remove_vowels" in err and len(err.splitlines()) == 1
    assert main(["evaluate", "--policy", f"x={ckpt}", "--out", str(tmp_path / "ev"), "--n", "1",
                 "--no-progress"]) == 1
    assert "a policy of another world" in capsys.readouterr().err


def test_prompts_deeper_than_the_context_name_the_file(tmp_path, capsys):
    from latentsel.policy.tokenizer import Tokenizer
    from latentsel.world import default_world

    ckpt = _checkpoint_of(tmp_path, Tokenizer.from_world(default_world()), max_depth=2)
    prompts = tmp_path / "deep.jsonl"
    assert main(["generate", "--regime", "eval-ood", "--n", "2", "-o", str(prompts)]) == 0
    assert main(["sample", "--checkpoint", str(ckpt), "--prompts", str(prompts), "-o", str(tmp_path / "o.jsonl"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{prompts}: prompt" in err and "(depth 4)" in err and "programs up to depth 2" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o.jsonl").exists()


def test_resume_drops_a_torn_last_metrics_line_and_names_a_bad_one(tmp_path, capsys):
    from latentsel.policy.train import TrainConfig, train

    cfg = TrainConfig(out=str(tmp_path / "run"), regime="toy", preset="tiny", steps=4, batch_size=4, warmup=1,
                      checkpoint_every=1, log_every=1, eval_prompts=2, max_depth=4)

    def kill_after(n):
        def on_step(step):
            if step == n:
                raise KeyboardInterrupt
        return on_step

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_step=kill_after(2))
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"loss": 1.2, "tok')  # killed mid-append
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_step=kill_after(3))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    err = capsys.readouterr().err
    assert f"warning: {metrics}:3: dropped a torn last line" in err and len(err.strip().splitlines()) == 1
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=f"{metrics}:2: not a metrics record"):
        train(cfg, progress=False)
