"""The vectorized batch executor: every module applied to a batch of histories at once.

Strings are padded integer arrays: ``codes: uint8[..., W]`` holds character indices in the
alphabet, ``PAD`` (255) past each string's end, and ``lens: int32[...]`` the lengths;
``W = world.max_len``. A batch of histories is ``codes: uint8[N, T, W]``,
``lens: int32[N, T]`` and ``depth: int32[N]``, the number of entries of each history
(``depth[n] = t`` means ``H = [h_0, ..., h_{t-1}]``; entries past it are ignored).

The skill pass groups the routed strings by length, so that every default skill is a
fixed column operation on a dense block: that is what makes it fast.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from latentsel.world.types import World

__all__ = ["PAD", "encode", "decode", "encode_histories", "route_all", "skill_all", "apply_all", "distinct_routes",
           "apply_distinct"]

# the code past each string's end in a padded uint8 array
PAD = 255


def encode(strings: Sequence[str], world: World) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> ``(codes: uint8[N, W], lens: int32[N])``.

    Raises ``ValueError`` for a character outside the alphabet or a string longer than
    ``world.max_len``.
    """
    if world.n_chars >= PAD:
        raise ValueError(f"the batch executor supports alphabets of < {PAD} characters, got {world.n_chars}")
    w = world.max_len
    lens = np.fromiter(map(len, strings), dtype=np.int32, count=len(strings))
    if lens.size and lens.max() > w:
        i = int(np.argmax(lens > w))
        raise ValueError(f"string {strings[i]!r} is longer than max_len={w}")
    mapped = _lookup_table(world.alphabet)[np.frombuffer("".join(strings).encode("utf-32-le"), dtype=np.uint32)]
    if (mapped == PAD).any():  # a character outside the alphabet: name its string
        i = int(np.searchsorted(np.cumsum(lens), int(np.argmax(mapped == PAD)), side="right"))
        world.check_string(strings[i])
    codes = np.full((len(strings), w), PAD, dtype=np.uint8)
    codes[np.arange(w) < lens[:, None]] = mapped  # the characters of each row fill its first len cells
    return codes, lens


_TABLES: dict[str, np.ndarray] = {}


def _lookup_table(alphabet: str) -> np.ndarray:
    """``uint8[0x110000]``: code point -> index in the alphabet, PAD for any other."""
    table = _TABLES.get(alphabet)
    if table is None:
        table = np.full(0x110000, PAD, dtype=np.uint8)
        table[[ord(c) for c in alphabet]] = np.arange(len(alphabet))
        _TABLES[alphabet] = table
    return table


def decode(codes: np.ndarray, lens: np.ndarray, world: World) -> list[str]:
    """``(codes: uint8[..., W], lens: int[...])`` -> flat list of strings (C order)."""
    alphabet = np.array(list(world.alphabet) + [""], dtype=object)
    lens = np.broadcast_to(lens, codes.shape[:-1]).reshape(-1)
    codes = codes.reshape(lens.size, codes.shape[-1])
    out = []
    for row, n in zip(codes, lens):
        out.append("".join(alphabet[np.minimum(row[:n], world.n_chars)]))
    return out


def encode_histories(histories: Sequence[Sequence[str]], world: World) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list of histories (each ``[h_0, ..., h_{t-1}]``, t >= 1) ->
    ``(codes: uint8[N, T, W], lens: int32[N, T], depth: int32[N])`` with ``T = max t``."""
    depth = np.array([len(h) for h in histories], dtype=np.int32)
    if depth.size and depth.min() < 1:
        raise ValueError("every history must hold at least the input h_0")
    t = int(depth.max()) if depth.size else 1
    flat = [s for h in histories for s in list(h) + [""] * (t - len(h))]
    codes, lens = encode(flat, world)
    return codes.reshape(len(histories), t, -1), lens.reshape(len(histories), t), depth


def _mask(codes: np.ndarray, lens: np.ndarray) -> None:
    """Set ``codes[..., j] = PAD`` for ``j >= lens`` (in place)."""
    codes[np.arange(codes.shape[-1]) >= lens[..., None]] = PAD


def route_all(world: World, codes: np.ndarray, lens: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every routing on every history.

    Args:
        codes: uint8[N, T, W]; lens: int[N, T]; depth: int[N] (1 <= depth <= T).
    Returns:
        ``(codes: uint8[N, R, W], lens: int32[N, R])``, truncated to ``max_len``.
    """
    n, t, w = codes.shape
    if w != world.max_len or lens.shape != (n, t) or depth.shape != (n,):
        raise ValueError(
            f"expected codes [N, T, {world.max_len}], lens [N, T], depth [N]; "
            f"got {codes.shape}, {lens.shape}, {depth.shape}"
        )
    out = np.full((n, world.n_routes, w), PAD, dtype=np.uint8)
    out_lens = np.empty((n, world.n_routes), dtype=np.int32)
    for r, route in enumerate(world.routes):
        if route.batch is not None:
            res, res_lens = route.batch(codes, lens, depth)
            res_lens = np.minimum(res_lens, w)
            out[:, r, : min(w, res.shape[1])] = res[:, :w]
        else:
            strings = decode(codes, lens, world)
            hist = [strings[i * t: i * t + int(d)] for i, d in enumerate(depth)]
            res, res_lens = encode([world.route(r, h) for h in hist], world)
            out[:, r] = res
        out_lens[:, r] = res_lens
    _mask(out, out_lens)
    return out, out_lens


def skill_all(world: World, codes: np.ndarray, lens: np.ndarray, *, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every skill on every string.

    Args:
        codes: uint8[M, W]; lens: int[M].
        threads: worker threads (default: one per core, at most 8).
    Returns:
        ``(codes: uint8[M, K, W], lens: int32[M, K])``, truncated to ``max_len``. The
        arrays are views of skill-major buffers (not C-contiguous).
    """
    m, w = codes.shape
    if w != world.max_len or lens.shape != (m,):
        raise ValueError(f"expected codes [M, {world.max_len}] and lens [M]; got {codes.shape}, {lens.shape}")
    k_n = world.n_skills
    order = np.argsort(lens, kind="stable")
    sorted_codes = codes[order]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(lens, minlength=w + 1))])
    # skill-major layout: each write below is a contiguous block of rows
    out = np.empty((k_n, m, w), dtype=np.uint8)
    out_lens = np.empty((k_n, m), dtype=np.int32)

    def run(skill_indices):
        for length in range(w + 1):
            lo, hi = bounds[length], bounds[length + 1]
            if lo == hi:
                continue
            block = sorted_codes[lo:hi, :length]
            for k in skill_indices:
                _apply_skill(world, k, block, out[k, lo:hi], out_lens[k, lo:hi])

    # numpy releases the GIL inside these kernels, so threads over skills use the cores
    n_threads = max(1, min(threads or os.cpu_count() or 1, k_n, 8))
    if n_threads == 1 or m < 2048:
        run(range(k_n))
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(run, [range(i, k_n, n_threads) for i in range(n_threads)]))
    inverse = np.empty_like(order)
    inverse[order] = np.arange(m)
    return np.take(out, inverse, axis=1).transpose(1, 0, 2), np.take(out_lens, inverse, axis=1).T


def _apply_skill(world: World, k: int, block: np.ndarray, target: np.ndarray, target_lens: np.ndarray) -> None:
    """Skill ``k`` on a block of equal-length strings, written into ``target: uint8[m, W]``."""
    w = target.shape[1]
    skill = world.skills[k]
    if skill.batch is not None:
        res, res_lens = skill.batch(block, world.n_chars)
    else:
        strings = decode(block, np.full(block.shape[0], block.shape[1]), world)
        res, res_lens = encode([world.skill(k, s) for s in strings], world)
    width = min(w, res.shape[1])
    target[:, :width] = res[:, :width]
    target[:, width:] = PAD
    if np.ndim(res_lens):
        res_lens = np.minimum(res_lens, w)
        _mask(target, res_lens)
    else:
        res_lens = min(int(res_lens), w)
    target_lens[...] = res_lens


def apply_all(world: World, codes: np.ndarray, lens: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every module ``(r, k)`` on every history: ``trunc(skill_k(trunc(route_r(H))))``.

    Args:
        codes: uint8[N, T, W]; lens: int[N, T]; depth: int[N].
    Returns:
        ``(codes: uint8[N, R, K, W], lens: int32[N, R, K])``.
    """
    n = codes.shape[0]
    routed, routed_lens = route_all(world, codes, lens, depth)
    out, out_lens = skill_all(world, routed.reshape(n * world.n_routes, -1), routed_lens.reshape(-1))
    return out.reshape(n, world.n_routes, world.n_skills, -1), out_lens.reshape(n, world.n_routes, world.n_skills)


def distinct_routes(codes: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which routings of a history give the same string (at t = 1 five of the default ten
    route the input).

    Args:
        codes: uint8[N, R, W], lens: int[N, R]; routed strings, PAD past their ends.
    Returns:
        ``(keep: bool[N, R], index: int64[N, R])``: ``keep`` marks the first routing of each
        distinct string; ``index[n, r]`` is the position of (n, r)'s string among the kept ones
        in C order.
    """
    n, r_n, w = codes.shape
    if w % 8 == 0:  # compare 8 characters at a time
        codes = np.ascontiguousarray(codes).view(np.uint64)
    first = np.tile(np.arange(r_n), (n, 1))
    for r in range(1, r_n):
        for q in range(r - 1, -1, -1):  # downwards, so the smallest equal routing wins
            same = (lens[:, r] == lens[:, q]) & (codes[:, r] == codes[:, q]).all(axis=-1)
            first[same, r] = q
    keep = first == np.arange(r_n)
    position = np.cumsum(keep.ravel()) - 1
    index = position[(np.arange(n)[:, None] * r_n + first).ravel()].reshape(n, r_n)
    return keep, index


def apply_distinct(world: World, codes: np.ndarray, lens: np.ndarray, depth: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every skill on every *distinct* routed string of every history: what :func:`apply_all`
    computes, without repeating the skills on routings that coincide.

    Args:
        codes: uint8[N, T, W]; lens: int[N, T]; depth: int[N].
    Returns:
        ``(codes: uint8[U, K, W], lens: int32[U, K], owner: int64[U], index: int64[N, R])``:
        module (r, k) on history n gives ``codes[index[n, r], k]``; ``owner[u]`` is the history
        of distinct string u.
    """
    routed, routed_lens = route_all(world, codes, lens, depth)
    keep, index = distinct_routes(routed, routed_lens)
    out, out_lens = skill_all(world, routed[keep], routed_lens[keep])
    return out, out_lens, np.nonzero(keep)[0], index
