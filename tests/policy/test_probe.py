"""Teacher-forced per-step accuracy (latentsel.policy.probe) against an oracle with planted errors."""
import numpy as np
import torch

from latentsel.policy.data import prompt_pool, sft_pairs
from latentsel.policy.model import GPT, GPTConfig
from latentsel.policy.probe import teacher_forced
from latentsel.policy.tokenizer import Tokenizer
from latentsel.world import default_world

WORLD = default_world()
TOK = Tokenizer.from_world(WORLD)


class Oracle(torch.nn.Module):
    """Predicts every golden next token, except at planted (trace, completion token) positions."""

    def __init__(self, traces, wrong=()):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seqs = [p + c for p, c in sft_pairs(traces, TOK)]
        self.prompt_len = [len(p) for p, _ in sft_pairs(traces, TOK)]
        self.wrong = set(wrong)

    def forward(self, inputs):
        b, t = inputs.shape
        logits = torch.zeros(b, t, TOK.vocab_size)
        for row in range(b):
            i = next(i for i, s in enumerate(self.seqs) if inputs[row, : len(s) - 1].tolist() == s[:-1])
            for pos, target in enumerate(self.seqs[i][1:]):
                if (i, pos + 1 - self.prompt_len[i]) in self.wrong:
                    target = (target + 1) % TOK.vocab_size
                logits[row, pos, target] = 1.0
        return logits


def test_oracle_scores_exactly_the_planted_errors():
    traces = prompt_pool("eval-seen", 6, seed=3, world=WORLD)
    assert all(len(t.program) == 3 for t in traces)
    perfect = teacher_forced(Oracle(traces), TOK, traces, batch_size=4)
    assert perfect["step"] == {"acc": 1.0, "n": 18}
    assert perfect["stop"]["acc"] == perfect["answer"]["acc"] == 1.0
    # trace 0: the first character of step 2 wrong; trace 1: the <eos> (the stop) wrong;
    # trace 2: the <sep> after step 1 wrong (step 1 then runs on)
    completion = sft_pairs(traces, TOK)
    sep0 = completion[0][1].index(TOK.sep)
    sep2 = completion[2][1].index(TOK.sep)
    wrong = {(0, sep0 + 1), (1, len(completion[1][1]) - 1), (2, sep2)}
    got = teacher_forced(Oracle(traces, wrong), TOK, traces, batch_size=4)
    assert got["step"] == {"acc": 15 / 18, "n": 18}
    assert got["by_position"] == {"1": {"acc": 5 / 6, "n": 6}, "2": {"acc": 5 / 6, "n": 6},
                                  "3": {"acc": 5 / 6, "n": 6}}
    assert got["stop"] == {"acc": 5 / 6, "n": 6}
    assert got["answer"] == {"acc": 3 / 6, "n": 6}
    k0 = traces[0].program[1][1]
    assert got["by_skill"][k0]["n"] >= 1 and got["by_skill"][k0]["acc"] < 1.0
    assert sum(c["n"] for c in got["by_route"].values()) == 18


def test_untrained_model_is_scored_and_left_in_its_mode():
    torch.manual_seed(0)
    model = GPT(GPTConfig(TOK.vocab_size, TOK.block_size(4), n_layer=1, n_head=2, n_embd=16))
    model.train()
    traces = prompt_pool("eval-seen", 20, seed=4, world=WORLD)
    got = teacher_forced(model, TOK, traces, batch_size=8)
    assert model.training
    assert got["step"]["n"] == 60 and 0.0 <= got["step"]["acc"] <= 1.0
    assert np.isclose(sum(c["acc"] * c["n"] for c in got["by_position"].values()), got["step"]["acc"] * 60)
