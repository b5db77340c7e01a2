"""Worker of tests/policy/test_train.py::test_ddp_gradients_equal_single_process.

Run under ``torchrun --nproc_per_node=N`` (or alone, as the single-process reference): computes
the SFT gradient of one training step and a GRPO gradient on a fixed global batch, sharded
over the ranks exactly as training shards it, and saves rank 0's (all-reduced) gradients.

    python tests/_ddp_worker.py OUT.pt
"""
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from latentsel.policy import distributed
from latentsel.policy.data import PromptStream, collate, sft_pairs
from latentsel.policy.losses import grpo_loss
from latentsel.policy.model import GPT, GPTConfig
from latentsel.policy.tokenizer import Tokenizer
from latentsel.policy.train import TrainConfig, _SFTStep
from latentsel.world import default_world


def grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def main(out):
    torch.set_num_threads(1)
    d = distributed.setup("cpu")
    world = default_world()
    tok = Tokenizer.from_world(world)
    torch.manual_seed(0)
    model = GPT(GPTConfig(tok.vocab_size, tok.block_size(3), n_layer=2, n_head=2, n_embd=32,
                          slot_layout=tok.segment_tokens))
    net = DistributedDataParallel(model) if d.enabled else model
    cfg = TrainConfig(regime="sft", preset="tiny", batch_size=10, pool=50, seed=3)
    stream = PromptStream("sft", cfg.pool, cfg.seed, world)
    pool = stream.pool
    record = _SFTStep(cfg, tok, stream, d)(net, step=2)
    result = {"sft": grads(model), "sft_loss": float(record["loss"]), "tokens": record["tokens"]}

    model.zero_grad(set_to_none=True)
    pairs = sft_pairs(pool[:6], tok)
    pairs = [(p, c[: 3 + 2 * i]) for i, (p, c) in enumerate(pairs)]  # unequal completion lengths
    advantage = torch.linspace(-1.0, 1.0, len(pairs))
    mine = list(range(d.rank, len(pairs), d.world_size))
    batch = collate([pairs[i] for i in mine], tok.pad, d.device)
    n_tokens = distributed.all_sum([float(batch.mask.sum())], d)[0]
    ref_logp = torch.zeros_like(batch.mask) - 3.0
    loss, _ = grpo_loss(net, batch, advantage[mine], n_tokens, d.world_size, ref_logp, kl_coef=0.1)
    loss.backward()
    result["grpo"] = grads(model)
    if d.is_main:
        torch.save(result, out)
    distributed.teardown(d)


if __name__ == "__main__":
    main(sys.argv[1])
    # torch 2.13's gloo transport can abort (std::terminate) while the interpreter shuts
    # down after a clean teardown; the results are on disk, so leave without the shutdown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
