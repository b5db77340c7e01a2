"""The transformer, the KV-cache sampler and checkpoints."""
import subprocess
import sys

import pytest
import torch

from latentsel.policy.checkpoint import CheckpointError, export_policy, load_checkpoint, load_policy, save_checkpoint
from latentsel.policy.model import GPT, GPTConfig
from latentsel.policy.sampling import derive_seed, generate, sample_traces
from latentsel.policy.tokenizer import Tokenizer
from latentsel.traces import read_traces, write_traces
from latentsel.traces.regimes import generate as prompts_of
from latentsel.world import default_world
from tests._policy_util import one_thread  # noqa: F401 - autouse fixture

WORLD = default_world()
TOK = Tokenizer.from_world(WORLD)


@pytest.fixture(scope="module", params=["slots", "segment"])
def model(request):
    torch.manual_seed(0)
    layout = {"slot_layout" if request.param == "slots" else "segment_tokens": TOK.segment_tokens}
    return GPT(GPTConfig(TOK.vocab_size, TOK.block_size(4), n_layer=2, n_head=2, n_embd=32, **layout)).eval()


def _slot_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(TOK.vocab_size, TOK.block_size(4), n_layer=2, n_head=2, n_embd=32,
                         slot_layout=TOK.segment_tokens)).eval()


def test_slot_positions_by_hand():
    ids = TOK.encode_prompt("abc", [("prev", "reverse"), ("input", "sort")]) + TOK.encode_completion(["cba", "abc"])
    got = _slot_model().slot_positions(torch.tensor([[TOK.pad, TOK.pad] + ids]))[0].tolist()
    # role 0 input, 1 program, 2 completion; slot; offset from the segment's opening token
    want = ([[0, 0, 1], [0, 0, 2]]                                   # left padding
            + [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3]]            # <bos> a b c
            + [[1, 0, 0], [1, 1, 1], [1, 1, 2], [1, 2, 1], [1, 2, 2]]  # <prog> r1 k1 r2 k2
            + [[2, 1, 0], [2, 1, 1], [2, 1, 2], [2, 1, 3]]            # <out> c b a
            + [[2, 2, 0], [2, 2, 1], [2, 2, 2], [2, 2, 3], [2, 2, 4]])  # <sep> a b c <eos>
    assert got == want


def test_a_deeper_program_moves_nothing_a_step_reads():
    # the input and step 1 of a depth-2 and a depth-4 prompt sit at the same (role, slot, offset)
    m = _slot_model()
    steps = ["cba"]
    short = TOK.encode_prompt("abc", [("prev", "reverse")] * 2) + TOK.encode_completion(steps)[:-1]
    deep = TOK.encode_prompt("abc", [("prev", "reverse")] * 4) + TOK.encode_completion(steps)[:-1]
    a, b = m.slot_positions(torch.tensor([short]))[0], m.slot_positions(torch.tensor([deep]))[0]
    n_in = 1 + 3  # <bos> abc
    assert a[:n_in].tolist() == b[:n_in].tolist()
    assert a[-4:].tolist() == b[-4:].tolist()  # <out> c b a
    assert m.pos is None  # no absolute position anywhere


@pytest.fixture(scope="module")
def prompts():
    return prompts_of("eval-ood", 4, seed=0) + prompts_of("rl-atomic", 3, seed=0) + prompts_of("sft", 3, seed=0)


def _encode(prompts):
    return ([TOK.encode_prompt(p.input, p.program) for p in prompts],
            [TOK.completion_budget(len(p.program)) for p in prompts])


def test_cached_greedy_equals_uncached_and_is_batch_invariant(model, prompts):
    ids, budgets = _encode(prompts)
    cached = generate(model, ids, budgets, eos=TOK.eos, pad=TOK.pad)
    full = generate(model, ids, budgets, eos=TOK.eos, pad=TOK.pad, use_cache=False)
    alone = [generate(model, [p], [b], eos=TOK.eos, pad=TOK.pad)[0] for p, b in zip(ids, budgets)]
    assert cached == full == alone
    assert [len(c) for c in cached] == budgets  # an untrained model never stops early here


def test_cached_logits_equal_full_recomputation(model, prompts):
    # the sampled tokens could agree by luck; the logits of a fixed continuation cannot
    ids, _ = _encode(prompts[:3])
    steps = [TOK.first_char + i for i in range(5)]
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(1)
        outs.append(generate(model, ids, [5] * 3, eos=TOK.eos, pad=TOK.pad, temperature=1.0, generator=gen,
                             use_cache=use_cache))
    assert outs[0] == outs[1]
    seq = [p + steps for p in ids]
    width = max(map(len, seq))
    x = torch.tensor([[TOK.pad] * (width - len(s)) + s for s in seq])
    valid = x != TOK.pad
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    from latentsel.policy.sampling import _mask

    full = model(x, pos, _mask(valid, width))
    for i, s in enumerate(seq):
        alone = model(torch.tensor([s]))[0]
        torch.testing.assert_close(full[i, width - len(s):], alone, atol=1e-5, rtol=1e-4)


def test_temperature_sampling_is_seeded(model, prompts):
    ids, budgets = _encode(prompts)
    runs = [generate(model, ids, budgets, eos=TOK.eos, pad=TOK.pad, temperature=1.0,
                     generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]


def test_sampled_traces_are_valid_records(model, prompts, tmp_path):
    traces = sample_traces(model, TOK, prompts, policy="sft", checkpoint="ckpt.pt", seed=3, temperature=1.0,
                           samples=2, batch_size=4)
    assert len(traces) == 2 * len(prompts) and traces[1].id == f"{prompts[0].id}-s1"
    assert traces[0].source == {"kind": "policy", "policy": "sft", "checkpoint": "ckpt.pt", "seed": 3,
                                "device": "cpu", "temperature": 1.0}
    assert all(t.extra["malformed"] for t in traces)  # an untrained model writes nonsense
    write_traces(tmp_path / "t.jsonl", traces)
    assert [t.steps for t in read_traces(tmp_path / "t.jsonl")] == [t.steps for t in traces]


def test_prompts_deeper_than_the_context_are_named(prompts):
    torch.manual_seed(0)
    short = GPT(GPTConfig(TOK.vocab_size, TOK.block_size(3), n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match=r"prompt 'eval-ood-000000' \(depth 4\) needs \d+ positions"):
        sample_traces(short, TOK, prompts, policy="p", checkpoint="c")


def test_derive_seed_separates_streams():
    seeds = {derive_seed(s, step, r) for s in range(3) for step in range(50) for r in range(4)}
    assert len(seeds) == 600 and all(0 <= s < 2**63 for s in seeds)


def test_checkpoint_round_trip_loads_with_weights_only(model, tmp_path):
    path = tmp_path / "ckpt.pt"
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    save_checkpoint(path, model, TOK, step=7, policy="sft", train_config={"seed": 0, "init": None}, optimizer=opt)
    state = torch.load(path, weights_only=True)
    assert state["step"] == 7 and state["model_config"] == model.config.to_dict()
    back, tok, _ = load_policy(path)
    assert tok == TOK and back.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert back.head.weight.data_ptr() == back.tok.weight.data_ptr()
    opt2 = torch.optim.AdamW(back.parameters())
    opt2.load_state_dict(load_checkpoint(path)["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == 1
    export_policy(path, tmp_path / "weights.pt")
    small = load_checkpoint(tmp_path / "weights.pt")
    assert small["optimizer"] is None and small["train_config"] == {"seed": 0, "init": None}
    assert all(torch.equal(small["model"][k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "weights.pt").stat().st_size < path.stat().st_size / 2
    export_policy(path, tmp_path / "weights.pt.gz")
    packed = load_checkpoint(tmp_path / "weights.pt.gz")
    assert all(torch.equal(packed["model"][k], v) for k, v in small["model"].items())


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable"):
        load_checkpoint(junk)
    torn = tmp_path / "torn.pt.gz"
    torn.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(CheckpointError, match="torn.pt.gz: not a readable"):
        load_checkpoint(torn)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="other.pt: not a latentsel policy checkpoint"):
        load_checkpoint(other)


def test_policy_package_needs_no_jax():
    code = ("import sys, latentsel.policy.train, latentsel.policy.evaluate, latentsel.cli.policy; "
            "bad = [m for m in ('jax', 'numpyro', 'pyro', 'arviz', 'funsor') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


class _RunsCode:
    """Unpickled, this runs a shell command: what a checkpoint from a stranger may hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", ["os.system", "a class"])
def test_a_checkpoint_holding_pickled_objects_is_refused_in_one_plain_line(tmp_path, payload):
    from fractions import Fraction

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    obj = _RunsCode(marker) if payload == "os.system" else Fraction(1, 3)
    torch.save({"format": "latentsel-policy/1", "model": obj}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable policy checkpoint")
    assert "\x1b[" not in message and "weights_only" not in message and "arbitrary code" not in message
    assert len(message.splitlines()) == 1 and len(message) < len(str(path)) + 300
    assert ("posix.system" if payload == "os.system" else "fractions.Fraction") in message
    assert not marker.exists()
