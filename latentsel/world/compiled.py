"""The match counts of the default world's modules, compiled (numba).

:func:`latentsel.traces.emission.build_data` needs, for every observed step, the number of
positions where ``y_t`` agrees with each module's output on the teacher-forced history. The
vectorized executor (:mod:`latentsel.world.executor`) materializes all R*K outputs and then
compares them; here one compiled loop routes each history, runs every skill on each distinct
routed string into a scratch buffer and counts the agreements at once, never writing the
outputs. Each default module has a compiled twin (an *op code*); the tests hold every twin
equal to the module's reference function and the counts equal to the executor's.

A world whose modules are all default ones (any subset, any order, any alphabet of < 255
characters) is compiled (:func:`compiled_matcher`); any other world keeps the vectorized
executor, as does a corpus too small to pay numba's start (:mod:`latentsel._compiled`). The
kernel is compiled on first use and cached on disk by numba.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import config, njit, prange, set_num_threads

from latentsel._compiled import numba_threads
from latentsel.world.default import ROUTES, SKILLS
from latentsel.world.types import World

__all__ = ["compiled_matcher", "set_threads", "SKILL_OPS", "ROUTE_OPS"]

numba_threads()

# op codes, in the order of the default world's modules
SKILL_OPS = {s.fn: i for i, s in enumerate(SKILLS)}
ROUTE_OPS = {r.fn: i for i, r in enumerate(ROUTES)}


def compiled_matcher(world: World):
    """The compiled match counts of ``world``'s modules, or ``None`` where a module of the world
    has no compiled twin.

    Returns ``match(out, at, codes, lens, hist, depth, y_codes, y_lens, y_at)``: job j reads the
    first ``depth[j]`` entries of the padded history ``codes[hist[j]]`` (``codes: uint8[H, T, W]``,
    ``lens: int[N, T]``) and writes, for every module, the number of positions where its output
    agrees with ``y_codes[y_at[0][j], y_at[1][j]]`` (length ``y_lens[...]`` at the same place)
    into ``out[at[0][j], at[1][j]]`` (``out: int8[N', T', R, K]``); -1 where the lengths differ.
    """
    try:
        hash(world)
    except TypeError:  # a module of the user's own whose function cannot be hashed
        return None
    return _matcher(world)


@lru_cache(maxsize=16)
def _matcher(world: World):
    try:
        skill_ops = np.array([SKILL_OPS[s.fn] for s in world.skills], dtype=np.int64)
        route_ops = np.array([ROUTE_OPS[r.fn] for r in world.routes], dtype=np.int64)
    except KeyError:  # a module of the user's own
        return None
    n_chars, width = world.n_chars, world.max_len
    length, gather, cmap = _tables(world, skill_ops)
    special = np.isin(skill_ops, _SPECIAL)

    def index(a):
        return np.ascontiguousarray(a, dtype=np.int64)

    def match(out, at, codes, lens, hist, depth, y_codes, y_lens, y_at):
        if out.shape[2:] != (route_ops.size, skill_ops.size) or out.dtype != np.int8 or not out.flags.c_contiguous:
            raise ValueError(f"expected a C-contiguous int8 out of shape [N, T, {route_ops.size}, {skill_ops.size}]")
        if len(depth):
            _kernel(np.ascontiguousarray(codes), np.ascontiguousarray(lens, dtype=np.int32), index(hist), index(depth),
                    np.ascontiguousarray(y_codes), np.ascontiguousarray(y_lens, dtype=np.int32),
                    index(at[0]), index(at[1]), index(y_at[0]), index(y_at[1]),
                    route_ops, skill_ops, special, length, gather, cmap, n_chars, width, out)
        return out

    return match


def set_threads(n: int) -> None:
    """Run the compiled kernel on ``n`` threads (at most the cores numba found) in this process."""
    set_num_threads(max(1, min(int(n), config.NUMBA_NUM_THREADS)))


# op codes: a default module's index in the default world (the tests check the order)
(S_REVERSE, S_ROTL, S_ROTR, S_SWAP_PAIRS, S_SWAP_HALVES, S_SORT, S_SORT_DESC, S_SWAP_ENDS, S_SHIFT1, S_UNSHIFT1,
 S_SHIFT3, S_ATBASH, S_SHIFT_EVEN, S_SHIFT_FIRST, S_DUP_EACH, S_MIRROR, S_DOUBLE, S_EVENS, S_ODDS, S_DROP_FIRST,
 S_DROP_LAST, S_DEDUP, S_UNIQUE, S_FIRST_HALF) = range(24)
(R_PREV, R_INPUT, R_SKIP, R_CAT_PREV_INPUT, R_CAT_INPUT_PREV, R_ZIP_PREV_INPUT, R_CAT_PREV_SKIP,
 R_HEAD_PREV_TAIL_INPUT, R_LONGEST, R_SHORTEST) = range(10)

# the skills whose output is not a gather of input positions through a character map
_SPECIAL = (S_SORT, S_SORT_DESC, S_DEDUP, S_UNIQUE)
_CHARMAPS = (S_SHIFT1, S_UNSHIFT1, S_SHIFT3, S_ATBASH, S_SHIFT_EVEN, S_SHIFT_FIRST)


def _tables(world: World, skill_ops: np.ndarray):
    """Every other skill as a gather and a character map, read off its reference function:
    ``out[j] = cmap[k, cls(j), s[gather[k, n, j]]]`` for input length n, with ``cls(j)`` = 0 at
    j = 0, 1 at even j > 0, 2 at odd j. Returns ``(length: int64[K, W + 1]`` (the truncated
    output length, -1 where it depends on the characters), ``gather: int64[K, W + 1, W]``,
    ``cmap: uint8[K, 3, A]``)."""
    w, a = world.max_len, world.n_chars
    length = np.full((skill_ops.size, w + 1), -1, dtype=np.int64)
    gather = np.zeros((skill_ops.size, w + 1, w), dtype=np.int64)
    cmap = np.tile(np.arange(a, dtype=np.uint8), (skill_ops.size, 3, 1))
    probe = "".join(chr(0x4E00 + i) for i in range(w))  # distinct characters: a gather's positions
    for k, op in enumerate(skill_ops):
        fn = SKILLS[op].fn
        if op in (S_SORT, S_SORT_DESC):
            length[k] = np.arange(w + 1)
        if op in _SPECIAL:
            continue
        for n in range(w + 1):
            if op in _CHARMAPS:
                length[k, n], gather[k, n] = n, np.arange(w)
            else:
                out = fn(probe[:n], probe)[:w]
                length[k, n] = len(out)
                gather[k, n, :len(out)] = [probe.index(ch) for ch in out]
        if op in _CHARMAPS:
            for c, ch in enumerate(world.alphabet):
                out = fn(ch * 3, world.alphabet)
                cmap[k, :, c] = [world.alphabet.index(out[i]) for i in (0, 2, 1)]
    return length, gather, cmap


jit = njit(cache=True, nogil=True)


@jit
def _special(op, s, r, n, o, a, count):
    """``sort``, ``sort_desc``, ``dedup`` or ``unique`` on ``s[r, :n]`` into ``o``; returns the length."""
    if op == S_SORT or op == S_SORT_DESC:
        for c in range(a):
            count[c] = 0
        for j in range(n):
            count[s[r, j]] += 1
        j = 0
        for i in range(a):
            c = i if op == S_SORT else a - 1 - i
            for _ in range(count[c]):
                o[j] = c
                j += 1
        return n
    if op == S_DEDUP:
        m = 0
        for j in range(n):
            if j == 0 or s[r, j] != s[r, j - 1]:
                o[m] = s[r, j]
                m += 1
        return m
    for c in range(a):  # unique
        count[c] = 0
    m = 0
    for j in range(n):
        if count[s[r, j]] == 0:
            count[s[r, j]] = 1
            o[m] = s[r, j]
            m += 1
    return m


@njit(cache=True, nogil=True, inline="always")
def _put(o, r, at, h, i, e, lo, hi):
    """``o[r, at:] = h[i, e, lo:hi]``; returns the new end."""
    for j in range(lo, hi):
        o[r, at] = h[i, e, j]
        at += 1
    return at


@njit(cache=True, nogil=True, inline="always")
def _route(op, h, hl, i, d, o, r):
    """Routing ``op`` on the history ``h[i, :d]`` (lengths ``hl[i]``) into ``o[r]``; returns the length."""
    prev = d - 1
    skip = d - 2 if d >= 2 else 0
    if op == R_PREV:
        return _put(o, r, 0, h, i, prev, 0, hl[i, prev])
    if op == R_INPUT:
        return _put(o, r, 0, h, i, 0, 0, hl[i, 0])
    if op == R_SKIP:
        return _put(o, r, 0, h, i, skip, 0, hl[i, skip])
    if op == R_CAT_PREV_INPUT:
        return _put(o, r, _put(o, r, 0, h, i, prev, 0, hl[i, prev]), h, i, 0, 0, hl[i, 0])
    if op == R_CAT_INPUT_PREV:
        return _put(o, r, _put(o, r, 0, h, i, 0, 0, hl[i, 0]), h, i, prev, 0, hl[i, prev])
    if op == R_CAT_PREV_SKIP:
        return _put(o, r, _put(o, r, 0, h, i, prev, 0, hl[i, prev]), h, i, skip, 0, hl[i, skip])
    if op == R_ZIP_PREV_INPUT:
        la, lb = hl[i, prev], hl[i, 0]
        m = min(la, lb)
        for j in range(m):
            o[r, 2 * j] = h[i, prev, j]
            o[r, 2 * j + 1] = h[i, 0, j]
        return _put(o, r, _put(o, r, 2 * m, h, i, prev, m, la), h, i, 0, m, lb)
    if op == R_HEAD_PREV_TAIL_INPUT:
        la, lb = hl[i, prev], hl[i, 0]
        return _put(o, r, _put(o, r, 0, h, i, prev, 0, (la + 1) // 2), h, i, 0, (lb + 1) // 2, lb)
    # longest / shortest: the extreme length, ties to the latest entry
    best = 0
    for e in range(1, d):
        if (hl[i, e] >= hl[i, best]) if op == R_LONGEST else (hl[i, e] <= hl[i, best]):
            best = e
    return _put(o, r, 0, h, i, best, 0, hl[i, best])


@njit(parallel=True, cache=True, nogil=True)
def _kernel(codes, lens, hist, depth, y_codes, y_lens, row, col, y_row, y_col, route_ops, skill_ops, special,
            length, gather, cmap, a, w, out):
    n_jobs, r_n, k_n = depth.size, route_ops.size, skill_ops.size
    n_blocks = min(n_jobs, 256)
    for b in prange(n_blocks):
        routed = np.empty((r_n, 2 * w), dtype=np.uint8)
        rlen = np.empty(r_n, dtype=np.int64)
        o = np.empty(2 * w, dtype=np.uint8)
        count = np.empty(a, dtype=np.int64)
        for j in range(b * n_jobs // n_blocks, (b + 1) * n_jobs // n_blocks):
            h, d, i, t = hist[j], depth[j], row[j], col[j]
            yi, yt = y_row[j], y_col[j]
            yl = y_lens[yi, yt]
            for r in range(r_n):
                rlen[r] = min(_route(route_ops[r], codes, lens, h, d, routed, r), w)
                same = -1
                for q in range(r):  # the smallest equal routing already holds the counts
                    if rlen[q] == rlen[r]:
                        equal = True
                        for c in range(rlen[r]):
                            if routed[q, c] != routed[r, c]:
                                equal = False
                                break
                        if equal:
                            same = q
                            break
                if same >= 0:
                    for k in range(k_n):
                        out[i, t, r, k] = out[i, t, same, k]
                    continue
                for k in range(k_n):
                    # most outputs have another length than y_t: only those of its length are compared
                    n_out = length[k, rlen[r]]
                    made = n_out < 0  # dedup / unique: the length is known once the output is made
                    if made:
                        n_out = min(_special(skill_ops[k], routed, r, rlen[r], o, a, count), w)
                    if n_out != yl:
                        out[i, t, r, k] = -1
                        continue
                    m = 0
                    if special[k]:
                        if not made:
                            _special(skill_ops[k], routed, r, rlen[r], o, a, count)
                        for c in range(yl):
                            m += o[c] == y_codes[yi, yt, c]
                    else:
                        n = rlen[r]  # (no array views here: their reference counts are shared by the threads)
                        m += cmap[k, 0, routed[r, gather[k, n, 0]]] == y_codes[yi, yt, 0] if yl else 0
                        for c in range(1, yl):
                            m += cmap[k, 1 + c % 2, routed[r, gather[k, n, c]]] == y_codes[yi, yt, c]
                    out[i, t, r, k] = m
