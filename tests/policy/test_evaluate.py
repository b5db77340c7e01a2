"""Scoring, Wilson intervals and the markdown table."""
import pytest

from latentsel.policy.evaluate import markdown_table, score, wilson
from latentsel.traces import Trace
from latentsel.traces.regimes import generate


@pytest.mark.parametrize("k, n, lo, hi", [
    (0, 10, 0.0, 0.27753),      # upper bound z^2 / (n + z^2)
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
    (48, 1000, 0.03639, 0.06307),
])
def test_wilson_interval(k, n, lo, hi):
    assert wilson(k, n) == pytest.approx((lo, hi), abs=1e-5)


def test_wilson_covers_the_estimate_and_shrinks():
    for n in (1, 7, 50, 400):
        for k in range(0, n + 1, max(1, n // 7)):
            lo, hi = wilson(k, n)
            assert 0 <= lo <= k / n <= hi <= 1
    assert wilson(40, 400)[1] - wilson(40, 400)[0] < wilson(4, 40)[1] - wilson(4, 40)[0]
    assert wilson(0, 0) == (0.0, 1.0)


def _answer(golden, steps, malformed=None):
    return Trace(golden.id, golden.input, golden.program, steps, extra={"malformed": malformed})


def test_score_counts_final_answers_and_prefixes():
    golden = generate("eval-ood", 4, seed=0)
    g = [t.steps for t in golden]
    traces = [
        _answer(golden[0], g[0]),                                   # all right
        _answer(golden[1], [g[1][0], "zz", g[1][2], g[1][3]]),      # right answer after a wrong step
        _answer(golden[2], [g[2][0], g[2][1], None, None], "2 of 4 steps"),
        _answer(golden[3], g[3][:3] + [g[3][3]], "no end token"),   # right steps, but malformed
    ]
    cell = score(traces, golden)
    assert (cell["n"], cell["correct"], cell["malformed"], cell["depth"]) == (4, 2, 2, 4)
    assert [c["correct"] for c in cell["by_depth"]] == [4, 3, 2, 1 + 1]
    assert cell["ci95"] == list(wilson(2, 4))
    with pytest.raises(ValueError, match="does not answer"):
        score(traces[::-1], golden)


def test_markdown_table_has_one_row_per_policy_and_a_depth_table_per_split():
    golden = generate("eval-seen", 3, seed=0)
    cell = score([_answer(t, t.steps) for t in golden], golden)
    record = {"title": "CPU run", "decoding": "greedy", "n_per_split": 3, "device": "cpu",
              "policies": {name: {"splits": {"eval-seen": cell}} for name in ("sft", "sft+rl-compound")}}
    table = markdown_table(record)
    assert table.startswith("# CPU run\n")
    assert "| sft | 100.0% [43.9, 100.0] |" in table
    assert "| eval-seen (depth 3) |" in table and "| t = 1 | t = 2 | t = 3 | malformed |" in table
    assert table.count("| sft+rl-compound |") == 2


def test_trace_files_are_written_inside_out_only(tmp_path):
    """A name that is a path is refused, and so is a target that resolves outside ``out``
    (here: ``out/traces`` a link to another folder)."""
    from latentsel.policy.evaluate import trace_path

    out = tmp_path / "evout"
    assert trace_path(out, "sft", "eval-seen") == out / "traces" / "sft.eval-seen.jsonl.gz"
    for name in ("../../escaped", "a/b", "..", ".hidden", "a..b"):
        with pytest.raises(ValueError, match="policy name"):
            trace_path(out, name, "eval-seen")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "traces").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="outside --out"):
        trace_path(out, "sft", "eval-seen")


def test_evaluate_writes_no_trace_file_outside_out(tmp_path):
    import torch

    from latentsel.policy.checkpoint import save_checkpoint
    from latentsel.policy.evaluate import evaluate
    from latentsel.policy.model import GPT, GPTConfig
    from latentsel.policy.tokenizer import Tokenizer
    from latentsel.world import default_world

    tok = Tokenizer.from_world(default_world())
    torch.manual_seed(0)
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, GPT(GPTConfig(tok.vocab_size, tok.block_size(4), 1, 1, 8)), tok, step=0, policy="p")
    out, elsewhere = tmp_path / "evout", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "traces").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="outside --out"):
        evaluate({"p": ckpt}, out, n=1, splits=["eval-seen"], save_traces=True, progress=False, device="cpu")
    assert not any(elsewhere.iterdir())
