"""Policy throughput: SFT training tokens/s and model FLOP utilisation, and KV-cache sampling.

Rows, all measured in one run on one device:

* ``peak``: the anchor. On a GPU, a large bf16 matmul (and the H200's measured bf16 ceiling,
  790 TFLOP/s, for MFU); on a CPU, a large fp32 matmul with the threads torch uses.
* ``plain loop``: a nanoGPT-style loop of the same size written here (token and absolute
  position embeddings, pre-LN blocks, tied head, AdamW, fixed-length random token batches):
  what the toolkit's training step should come near.
* ``sft step``: the toolkit's SFT step (:class:`latentsel.policy.train._SFTStep`) on fresh
  depth 2-3 prompts, data drawing and collation included; ``sft step (model)`` with the batches
  prepared beforehand: the model, loss and optimizer alone.
* ``sampling``: :func:`latentsel.policy.sampling.generate` with the KV cache, temperature 1, on
  eval-seen prompts; generated tokens/s.

Tokens are real (non-pad) tokens; ``positions/s`` also counts padding. Ratios are to the plain
loop (training) in the same run.

    python benchmarks/policy.py --preset cpu --batch 64 --steps 30
    python benchmarks/policy.py --preset gpu --batch 256 --steps 50 --device cuda
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from _results import write_results

from latentsel.policy import distributed
from latentsel.policy.data import PromptStream
from latentsel.policy.model import GPT, PRESETS, GPTConfig
from latentsel.policy.sampling import autocast, generate
from latentsel.policy.tokenizer import Tokenizer
from latentsel.policy.train import TrainConfig, _optimizer, _SFTStep
from latentsel.traces.regimes import generate as prompts_of
from latentsel.world import default_world

H200_BF16 = 790e12  # measured dense bf16 ceiling of the H200 (the device notes)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device) -> float:
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


class PlainBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, d):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(PlainBlock(d, n_head) for _ in range(n_layer))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def time_steps(step, n, device) -> float:
    step()  # warm-up: allocation, kernel selection
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    world = default_world()
    tok = Tokenizer.from_world(world)
    n_layer, n_head, n_embd = PRESETS[args.preset]
    torch.manual_seed(0)
    model = GPT(GPTConfig(tok.vocab_size, tok.block_size(4), n_layer, n_head, n_embd,
                          slot_layout=tok.segment_tokens)).to(device)
    cfg = TrainConfig(preset=args.preset, batch_size=args.batch, device=str(device))
    d = distributed.Dist(0, 1, 0, device)
    stream = PromptStream("sft", 0, 0, world)
    sft = _SFTStep(cfg, tok, stream, d)
    opt = _optimizer(model, cfg, device)
    rows = []

    peak = peak_flops(device)
    mfu_peak = H200_BF16 if device.type == "cuda" and "H200" in torch.cuda.get_device_name() else peak
    rows.append({"row": "peak", "flops_per_s": peak, "note": "bf16 matmul" if device.type == "cuda" else
                 f"fp32 matmul, {torch.get_num_threads()} threads"})

    # the toolkit's step, data included, then with the batches prepared beforehand
    counter = iter(range(10**9))
    widths, real = [], []

    def ours():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            rec = sft(model, next(counter))
        opt.step()
        widths.append(rec["_width"])
        real.append(rec["tokens"])

    s_ours = time_steps(ours, args.steps, device)
    width = sum(widths) / len(widths)
    tokens = sum(real) / len(real)
    flops_tok = model.flops_per_token(round(width))
    prepared = [sft.host_batch(10**6 + i) for i in range(args.steps + 1)]
    it = iter(prepared)

    def ours_model():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            sft(model, 0, next(it))
        opt.step()

    s_model = time_steps(ours_model, args.steps, device)

    # the plain loop: same size, fixed-length random batches of the mean padded width
    torch.manual_seed(0)
    plain = PlainGPT(tok.vocab_size, tok.block_size(4), n_layer, n_head, n_embd).to(device)
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=device.type == "cuda")
    t_plain = max(2, round(width))
    x = torch.randint(tok.vocab_size, (args.batch, t_plain), device=device)
    y = torch.randint(tok.vocab_size, (args.batch, t_plain), device=device)

    def plain_step():
        popt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = plain(x, y)
        loss.backward()
        popt.step()

    s_plain = time_steps(plain_step, args.steps, device)
    plain_tokens = args.batch * t_plain
    plain_rate = plain_tokens / s_plain
    for name, s, n_tok in (("plain loop", s_plain, plain_tokens), ("sft step", s_ours, tokens),
                           ("sft step (model)", s_model, tokens)):
        rate = n_tok / s
        rows.append({"row": name, "s_per_step": s, "tokens_per_s": rate,
                     "positions_per_s": args.batch * (t_plain if name == "plain loop" else width) / s,
                     "flops_per_s": rate * flops_tok, "mfu": rate * flops_tok / mfu_peak,
                     "vs_plain": rate / plain_rate})

    # sampling with the KV cache
    prompts = prompts_of("eval-seen", args.sample_n, seed=1, world=world)
    encoded = [tok.encode_prompt(p.input, p.program) for p in prompts]
    budgets = [tok.completion_budget(3)] * len(prompts)
    model.eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with autocast(device):
        generate(model, encoded[: args.batch], budgets[: args.batch], eos=tok.eos, pad=tok.pad, temperature=1.0,
                 generator=gen)
        sync(device)
        t0 = time.perf_counter()
        out = generate(model, encoded, budgets, eos=tok.eos, pad=tok.pad, temperature=1.0, generator=gen)
        sync(device)
    s_sample = time.perf_counter() - t0
    n_gen = sum(len(c) for c in out)
    rows.append({"row": "sampling", "s": s_sample, "generated_tokens": n_gen, "tokens_per_s": n_gen / s_sample,
                 "batch": len(prompts)})

    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), preset "
          f"{args.preset} ({model.n_params() / 1e6:.2f}M parameters), batch {args.batch}, mean width {width:.1f}")
    print(f"{'row':<18} {'tokens/s':>12} {'FLOP/s':>10} {'MFU':>7} {'vs plain':>9}")
    for r in rows:
        tps = f"{r['tokens_per_s']:.3g}" if "tokens_per_s" in r else ""
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
        vs = f"{r['vs_plain']:.2f}x" if "vs_plain" in r else ""
        fl = f"{r['flops_per_s']:.3g}" if "flops_per_s" in r else ""
        print(f"{r['row']:<18} {tps:>12} {fl:>10} {mfu:>7} {vs:>9}")
    out = Path(args.out)
    write_results(out, {"device": device.type, "preset": args.preset, "batch": args.batch, "mean_width": width,
                        "n_params": model.n_params(), "mfu_peak_flops_per_s": mfu_peak, "rows": rows},
                  torch=torch.__version__)
    if not math.isfinite(s_ours):
        raise SystemExit(1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu", choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sample-n", type=int, default=512, help="prompts sampled in one batch")
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "policy.json"))
    main(p.parse_args())
