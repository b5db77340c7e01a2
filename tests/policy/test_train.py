"""Training: GRPO advantages and skipping, resume after a kill, DDP gradients."""
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from latentsel.policy import train as train_mod
from latentsel.policy.checkpoint import CheckpointError, load_checkpoint
from latentsel.policy.data import collate, prompt_pool, sft_pairs
from latentsel.policy.losses import group_advantages, grpo_loss, token_logprobs
from latentsel.policy.model import GPT, GPTConfig
from latentsel.policy.tokenizer import Tokenizer
from latentsel.policy.train import TrainConfig, train
from latentsel.world import default_world
from tests import _ddp_worker
from tests._policy_util import one_thread  # noqa: F401 - autouse fixture

TESTS = Path(__file__).resolve().parents[1]  # the helpers live in tests/
TOK = Tokenizer.from_world(default_world())


def test_group_advantages_subtract_the_mean_without_std_and_flag_constant_groups():
    rewards = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]])
    adv = group_advantages(rewards)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [0, 0, 0, 0], [-0.25, -0.25, -0.25, 0.75]])
    torch.testing.assert_close(adv.advantage, expected)
    assert adv.keep.tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_grpo_loss_is_the_token_mean_policy_gradient_plus_k3():
    torch.manual_seed(0)
    model = GPT(GPTConfig(TOK.vocab_size, TOK.block_size(3), n_layer=1, n_head=2, n_embd=16))
    batch = collate(sft_pairs(prompt_pool("sft", 3, 0, default_world()), TOK), TOK.pad, "cpu")
    advantage = torch.tensor([1.0, -0.5, 0.25])
    n = float(batch.mask.sum())
    loss, kl = grpo_loss(model, batch, advantage, n)
    logp = token_logprobs(model, batch)
    torch.testing.assert_close(loss, -(advantage[:, None] * logp * batch.mask).sum() / n)
    assert float(kl) == 0.0
    _, kl_self = grpo_loss(model, batch, advantage, n, ref_logp=logp.detach(), kl_coef=1.0)
    assert abs(float(kl_self)) < 1e-6
    loss_kl, kl_far = grpo_loss(model, batch, advantage, n, ref_logp=logp.detach() - 1.0, kl_coef=0.5)
    assert float(kl_far) == pytest.approx(torch.exp(torch.tensor(-1.0)).item(), rel=1e-5)  # e^-1 + 1 - 1
    assert float(loss_kl.detach()) == pytest.approx(float(loss.detach()) + 0.5 * float(kl_far), rel=1e-5)


def _records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _tiny(tmp_path, name, **kw):
    base = dict(out=str(tmp_path / name), regime="toy", preset="tiny", steps=6, batch_size=8, lr=3e-3,
                warmup=2, pool=64, seed=1, checkpoint_every=2, log_every=1, max_depth=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    cfg = _tiny(tmp_path_factory.mktemp("sft"), "init", steps=3)
    train(cfg, progress=False)
    return str(Path(cfg.out) / "checkpoint.pt")


def test_rl_skips_and_counts_groups_without_signal(tmp_path, sft_checkpoint, monkeypatch):
    cfg = _tiny(tmp_path, "rl", mode="rl", regime="rl-atomic", init=sft_checkpoint, steps=2, group_size=4)
    train(cfg, progress=False)  # an untrained policy never answers: every group is skipped
    records = _records(cfg.out)
    assert [r["groups_skipped"] for r in records] == [8, 8] and all("grad_norm" not in r for r in records)
    before, after = load_checkpoint(sft_checkpoint)["model"], load_checkpoint(Path(cfg.out) / "checkpoint.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)

    # reward the first sample of every other prompt: half the groups carry a signal
    calls = []

    def reward(tok, completion, prompt):
        calls.append(prompt.id)
        return float(len(calls) % 8 == 1)

    monkeypatch.setattr(train_mod, "_reward", reward)
    cfg = _tiny(tmp_path, "rl2", mode="rl", regime="rl-atomic", init=sft_checkpoint, steps=1, group_size=4)
    train(cfg, progress=False)
    [record] = _records(cfg.out)
    assert record["groups_skipped"] == 4 and record["reward"] == pytest.approx(4 / 32) and "grad_norm" in record


def _kill_at(step):
    def on_step(done):
        if done == step:
            os.kill(os.getpid(), signal.SIGKILL)
    return on_step


# an untrained policy never earns the exact-match reward; this one varies with the sample
SAMPLE_REWARD = "lambda tok, completion, prompt: float(completion[0] % 2 == 0)"


@pytest.mark.parametrize("mode", ["sft", "rl"])
def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, sft_checkpoint, mode, monkeypatch):
    kw = dict(mode="rl", regime="rl-atomic", init=sft_checkpoint, group_size=4, temperature=1.0, kl_coef=0.05) \
        if mode == "rl" else {}
    monkeypatch.setattr(train_mod, "_reward", eval(SAMPLE_REWARD))
    whole = _tiny(tmp_path, "whole", **kw)
    train(whole, progress=False)
    assert all("grad_norm" in r for r in _records(whole.out))  # every step updated the weights
    killed = _tiny(tmp_path, "killed", **kw)
    code = (f"from latentsel.policy.train import TrainConfig, train; import torch, os, signal; "
            f"import latentsel.policy.train as t; t._reward = {SAMPLE_REWARD}; torch.set_num_threads(1); "
            f"train(TrainConfig(**{asdict(killed)!r}), progress=False, "
            f"on_step=lambda s: s == 5 and os.kill(os.getpid(), signal.SIGKILL))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(Path(killed.out) / "checkpoint.pt")["step"] == 4
    summary = train(killed, progress=False)
    assert summary["resumed_from_step"] == 4 and summary["steps_run"] == 2
    a = load_checkpoint(Path(whole.out) / "checkpoint.pt")
    b = load_checkpoint(Path(killed.out) / "checkpoint.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-6, atol=1e-7, msg=k)
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(pa["exp_avg_sq"], pb["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    steps = [r["step"] for r in _records(killed.out)]
    assert steps == list(range(1, 7))
    loss = [r["loss"] for r in _records(whole.out)]
    assert [r["loss"] for r in _records(killed.out)] == pytest.approx(loss)


def test_resume_refuses_a_different_run(tmp_path):
    cfg = _tiny(tmp_path, "run", steps=2)
    train(cfg, progress=False)
    with pytest.raises(CheckpointError, match="different run .*lr"):
        train(_tiny(tmp_path, "run", steps=2, lr=1e-3), progress=False)


def test_ddp_gradients_equal_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = str(TESTS / "_ddp_worker.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
                          str(tmp_path / "ddp.pt")], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    _ddp_worker.main(str(tmp_path / "one.pt"))  # the single-process reference, in this process
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    assert ddp["tokens"] == one["tokens"] and ddp["sft_loss"] == pytest.approx(one["sft_loss"], rel=1e-6)
    for key in ("sft", "grpo"):
        assert ddp[key].keys() == one[key].keys()
        for name in one[key]:
            assert one[key][name].abs().max() > 0, name
            torch.testing.assert_close(ddp[key][name], one[key][name], rtol=1e-5, atol=1e-7, msg=f"{key} {name}")


def test_training_logs_teacher_forced_accuracy_on_held_out_prompts(tmp_path):
    cfg = _tiny(tmp_path, "probe", regime="sft", max_depth=3, steps=4, eval_every=2, eval_prompts=12, log_every=100)
    summary = train(cfg, progress=False)
    probed = [r for r in _records(cfg.out) if "teacher_forced" in r]
    assert [r["step"] for r in probed] == [2, 4]
    tf = summary["teacher_forced"]
    assert tf == probed[-1]["teacher_forced"]
    assert tf["step"]["n"] == 36 and set(tf["by_position"]) == {"1", "2", "3"}
    assert summary["competent"] is False  # four steps of a tiny model learn nothing


def test_loader_workers_give_the_same_run(tmp_path):
    # in a fresh interpreter: loader workers fork, and a pytest worker may hold JAX's threads
    runs = {}
    for name, workers in (("inline", 0), ("workers", 2)):
        cfg = _tiny(tmp_path, name, pool=0, steps=3, workers=workers)
        code = (f"import torch; torch.set_num_threads(1); from latentsel.policy.train import TrainConfig, train; "
                f"train(TrainConfig(**{asdict(cfg)!r}), progress=False)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = [r["loss"] for r in _records(cfg.out)]
    assert len(runs["inline"]) == 3 and runs["inline"] == runs["workers"]


def test_fresh_prompts_differ_every_step_and_repeat_with_the_seed():
    from latentsel.policy.data import PromptStream

    world = default_world()
    s = PromptStream("sft", 0, 3, world)
    first, second = s.batch(0, 16), s.batch(1, 16)
    assert {t.input for t in first}.isdisjoint({t.input for t in second}) or \
        [t.program for t in first] != [t.program for t in second]
    assert [t.to_dict() for t in PromptStream("sft", 0, 3, world).batch(0, 16)] == [t.to_dict() for t in first]
    assert {len(t.program) for t in s.batch(2, 64)} == {2, 3}


def test_a_deadline_ends_the_run_with_a_checkpoint(tmp_path):
    import time

    cfg = _tiny(tmp_path, "timed", steps=50, checkpoint_every=100)
    summary = train(cfg, progress=False, deadline=time.monotonic())  # already past: one step runs
    assert summary["stopped_at"] == 1 and summary["steps_run"] == 1
    assert load_checkpoint(Path(cfg.out) / "checkpoint.pt")["step"] == 1


def test_rl_needs_min_groups_informative_groups_to_update(tmp_path, sft_checkpoint, monkeypatch):
    calls = []

    def reward(tok, completion, prompt):  # 2 of the 8 groups carry a signal
        calls.append(1)
        return float(len(calls) % 32 in (1, 5))

    monkeypatch.setattr(train_mod, "_reward", reward)
    for name, need, updated in (("three", 3, False), ("two", 2, True)):
        calls.clear()
        cfg = _tiny(tmp_path, name, mode="rl", regime="rl-atomic", init=sft_checkpoint, steps=1, group_size=4,
                    min_groups=need)
        train(cfg, progress=False)
        [record] = _records(cfg.out)
        assert record["groups_skipped"] == 6 and record["updated"] is updated


def test_a_checkpoint_from_before_a_new_field_resumes(tmp_path):
    cfg = _tiny(tmp_path, "old", steps=2, checkpoint_every=1)
    train(cfg, progress=False)
    path = Path(cfg.out) / "checkpoint.pt"
    state = load_checkpoint(path)
    for newer in ("min_groups", "workers"):  # fields this checkpoint's writer did not have
        del state["train_config"][newer]
    torch.save(state, path)
    # the missing fields count as their defaults: the same run resumes (here: is finished) ...
    assert train(cfg, progress=False)["steps_run"] == 2
    # ... and a different one is still refused
    with pytest.raises(CheckpointError, match="min_groups: 1 != 2"):
        train(_tiny(tmp_path, "old", steps=2, checkpoint_every=1, min_groups=2), progress=False)
