"""A compact decoder-only transformer (pre-LayerNorm, GELU MLP, tied embeddings).

Positions come in three layouts:

* absolute (the default): one learned embedding per position, as in GPT-2;
* segment (``segment_tokens``): absolute positions plus the distance from the latest of a few
  segment tokens, so character j of a step sits at the same segment position as character j of
  the input;
* slots (``slot_layout``, what the training recipe builds): no absolute position at all. Every
  token gets a *role* (input, program, completion), a *slot* and an *offset*: the input is slot 0,
  the program tokens ``r_t k_t`` and the completion's step ``h_t`` are slot t, and the offset
  counts from the token that opens the segment (``<bos>``, ``<prog>``, ``<out>``, ``<sep>``; in
  the program, 1 for ``r_t`` and 2 for ``k_t``). Role and offset are learned embeddings; the
  slot enters attention as a rotary angle, so attention scores depend on slot *differences*
  only (the low rotary frequencies barely turn over a few slots, so a head can also match
  content whatever the slots). Step t then reads its program slot and the entries before it the same way at every t
  and in programs of any depth: two more program tokens move nothing a step reads.

One :class:`GPTConfig` describes the network; it travels inside every checkpoint as a plain
dict. The forward pass takes explicit positions and an optional boolean attention mask so
that the sampler can run left-padded batches and a key/value cache through the same code.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "KVCache", "PRESETS"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    segment_tokens: tuple[int, ...] = ()
    slot_layout: tuple[int, ...] = ()
    """``(bos, prog, out, sep)`` token ids: the slot layout (see the module doc)."""
    rope_base: float = 100.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["segment_tokens"] = list(self.segment_tokens)
        d["slot_layout"] = list(self.slot_layout)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        d = dict(d)
        d["segment_tokens"] = tuple(d.get("segment_tokens", ()))
        d["slot_layout"] = tuple(d.get("slot_layout", ()))
        return cls(**d)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.slot_layout and self.segment_tokens:
            raise ValueError("a model has slot_layout or segment_tokens, not both")
        if self.slot_layout and len(self.slot_layout) != 4:
            raise ValueError(f"slot_layout is (bos, prog, out, sep), got {self.slot_layout}")
        if self.slot_layout and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary slots need an even head size, got {self.n_embd // self.n_head}")

    @property
    def layout(self) -> str:
        return "slots" if self.slot_layout else "segment" if self.segment_tokens else "absolute"


# sizes by name: (n_layer, n_head, n_embd); vocab and block size come from the tokenizer
PRESETS = {
    "tiny": (2, 2, 32),
    "toy": (3, 4, 96),
    "cpu": (4, 4, 128),
    "gpu": (6, 8, 256),
}


class KVCache:
    """Keys and values of past positions: ``k, v: [n_layer, B, n_head, t_max, head_dim]``,
    allocated on first use with the dtype the attention produces (bf16 under autocast)."""

    def __init__(self, config: GPTConfig, t_max: int):
        self.n_layer, self.t_max = config.n_layer, t_max
        self.k = self.v = None
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v: [B, H, T, D]`` after the cached positions; returns all keys and values."""
        if self.k is None:
            b, h, _, d = k.shape
            self.k = k.new_zeros(self.n_layer, b, h, self.t_max, d)
            self.v = v.new_zeros(self.n_layer, b, h, self.t_max, d)
        t0, t1 = self.length, self.length + k.shape[2]
        if t1 > self.t_max:
            raise ValueError(f"the cache holds {self.t_max} positions, {t1} requested")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x: [B, H, T, D]`` by angles given as ``cos, sin: [B, 1, T, D / 2]``."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).type_as(x)


class _Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = c.n_head, c.dropout
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd, bias=False)
        self.proj = nn.Linear(c.n_embd, c.n_embd, bias=False)

    def forward(self, x, mask, cache: KVCache | None, layer: int, rope=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        drop = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.attn = _Attention(c)
        self.mlp = nn.Sequential(
            nn.Linear(c.n_embd, 4 * c.n_embd, bias=False), nn.GELU(),
            nn.Linear(4 * c.n_embd, c.n_embd, bias=False), nn.Dropout(c.dropout),
        )

    def forward(self, x, mask, cache, layer, rope=None):
        x = x + self.attn(self.ln1(x), mask, cache, layer, rope)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.n_embd)
        slots = bool(config.slot_layout)
        self.pos = None if slots else nn.Embedding(config.block_size, config.n_embd)
        self.seg = nn.Embedding(config.block_size, config.n_embd) if config.segment_tokens else None
        self.register_buffer("seg_tokens", torch.tensor(config.segment_tokens, dtype=torch.long), persistent=False)
        self.role = nn.Embedding(3, config.n_embd) if slots else None
        self.offset = nn.Embedding(config.block_size, config.n_embd) if slots else None
        pairs = config.n_embd // config.n_head // 2
        freq = config.rope_base ** (-torch.arange(pairs, dtype=torch.float32) / max(pairs, 1))
        self.register_buffer("rope_freq", freq, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)
        # GPT-2's scaling of the residual projections keeps the residual stream's variance
        # independent of depth at initialisation
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def segment_positions(self, idx: torch.Tensor) -> torch.Tensor:
        """``[B, T]``: distance of each token from the latest segment token at or before it."""
        is_start = torch.isin(idx, self.seg_tokens)
        p = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        last = torch.where(is_start, p, -1).cummax(dim=1).values
        return (p - last).clamp(max=self.config.block_size - 1)

    def slot_positions(self, idx: torch.Tensor) -> torch.Tensor:
        """``long[B, T, 3]``: the (role, slot, offset) of every token (the slot layout).

        Computed from the tokens given, left to right; tokens before the first ``<bos>`` (left
        padding) count as input.
        """
        bos, prog, out, sep = self.config.slot_layout
        b, t = idx.shape
        p = torch.arange(t, device=idx.device).expand(b, t)

        def last(hit):
            return torch.where(hit, p, -1).cummax(dim=1).values

        l_bos, l_prog, l_out = last(idx == bos), last(idx == prog), last(idx == out)
        role = torch.where((l_out > l_prog) & (l_out > l_bos), 2, torch.where(l_prog > l_bos, 1, 0))
        opener = last((idx == bos) | (idx == prog) | (idx == out) | (idx == sep))
        d = p - opener
        seps = (idx == sep).long().cumsum(dim=1)
        since_out = seps - torch.gather(seps, 1, l_out.clamp(min=0))
        in_prog = (role == 1) & (d > 0)
        slot = torch.where(role == 2, 1 + since_out, torch.where(in_prog, (d - 1) // 2 + 1, 0))
        offset = torch.where(in_prog, 1 + (d - 1) % 2, d)
        top = self.config.block_size - 1
        return torch.stack([role, slot.clamp(max=top), offset.clamp(max=top)], dim=-1)

    def _rope(self, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angle = slot[:, None, :, None].float() * self.rope_freq
        return angle.cos(), angle.sin()

    def forward(self, idx: torch.Tensor, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, seg: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` of tokens ``idx: [B, T]``.

        Args:
            pos: positions ``[B, T]`` (default ``0..T-1``, after the cached ones).
            mask: boolean ``[B, 1, T, T_keys]``, True where a query may attend a key; ``None``
                is causal attention over ``idx`` (training, right padding).
            cache: keys and values of earlier positions; updated in place.
            seg: segment positions ``[B, T]`` (models with ``segment_tokens``), or slot positions
                ``[B, T, 3]`` (models with ``slot_layout``; ``pos`` is then unused); default
                computed from ``idx``, which only sees the tokens given, so cached decoding passes them.
        """
        b, t = idx.shape
        x, rope = self._embed(idx, pos, cache, seg)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer, rope)
        if cache is not None:
            cache.length += t
        return self.head(self.ln_f(x))

    def _embed(self, idx, pos, cache, seg):
        """The input embedding of ``idx`` and the rotary angles (``None`` without slots)."""
        b, t = idx.shape
        if cache is not None and cache.length and seg is None and self.config.layout != "absolute":
            kind = "slot" if self.pos is None else "segment"
            raise ValueError(f"decoding with a cache needs explicit {kind} positions")
        if self.pos is None:
            seg = self.slot_positions(idx) if seg is None else seg
            # no table is indexed by absolute position (offsets are clamped, slots rotate), so a
            # left-padded batch may be wider than block_size; callers check each prompt's length
            x = self.tok(idx) + self.role(seg[..., 0]) + self.offset(seg[..., 2])
            return self.drop(x), self._rope(seg[..., 1])
        if pos is None:
            # checked on host integers: no device sync and no graph break under torch.compile
            start = cache.length if cache is not None else 0
            if start + t > self.config.block_size:
                raise ValueError(f"position {start + t - 1} is beyond block_size={self.config.block_size}")
            pos = torch.arange(start, start + t, device=idx.device).expand(b, t)
        elif int(pos.max()) >= self.config.block_size:
            raise ValueError(f"position {int(pos.max())} is beyond block_size={self.config.block_size}")
        x = self.tok(idx) + self.pos(pos)
        if self.seg is not None:
            x = x + self.seg(self.segment_positions(idx) if seg is None else seg)
        return self.drop(x), None

    def flops_per_token(self, t: int) -> int:
        """Training FLOPs per token (forward + backward) at context ``t``, as in the PaLM appendix."""
        c = self.config
        tables = (self.pos, self.seg, self.role, self.offset)
        n = self.n_params() - sum(e.weight.numel() for e in tables if e is not None)
        return 6 * n + 12 * c.n_layer * c.n_embd * t
