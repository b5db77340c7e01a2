"""The 24 skills and 10 routings of the default world (DESIGN §2).

Each module has two implementations that the tests hold equal: a plain reference on one
string (``fn``) and a vectorized one (``batch``) used by :mod:`latentsel.world.executor`.

Vectorized skills take a block of equal-length strings ``codes: uint8[m, l]`` (character
indices, no padding) and the alphabet size, and return ``(out: uint8[m, w], lens)`` where
``lens`` is an int (every row has that length) or ``int[m]`` with rows padded by ``PAD``.
Vectorized routings take the padded history ``codes: uint8[N, T, W]``, ``lens: int[N, T]``
and ``depth: int[N]`` (the number of entries, ``t``) and return ``(uint8[N, W'], int[N])``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from latentsel.world.executor import PAD
from latentsel.world.types import DEFAULT_ALPHABET, MAX_LEN, Route, Skill, World

__all__ = ["SKILLS", "ROUTES", "default_world"]


# --------------------------------------------------------------------------------------
# reference skills: fn(s, alphabet) -> str
# --------------------------------------------------------------------------------------
def _map(s, alphabet, f):
    a = len(alphabet)
    return "".join(alphabet[f(alphabet.index(ch), i) % a] for i, ch in enumerate(s))


def _swap_pairs(s, alphabet):
    chars = list(s)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def _swap_ends(s, alphabet):
    if len(s) < 2:
        return s
    return s[-1] + s[1:-1] + s[0]


def _dedup(s, alphabet):
    return "".join(ch for i, ch in enumerate(s) if i == 0 or s[i - 1] != ch)


def _unique(s, alphabet):
    return "".join(ch for i, ch in enumerate(s) if ch not in s[:i])


_REFERENCE_SKILLS = {
    "reverse": lambda s, al: s[::-1],
    "rotl": lambda s, al: s[1:] + s[:1],
    "rotr": lambda s, al: s[-1:] + s[:-1],
    "swap_pairs": _swap_pairs,
    "swap_halves": lambda s, al: s[len(s) // 2:] + s[: len(s) // 2],
    "sort": lambda s, al: "".join(sorted(s, key=al.index)),
    "sort_desc": lambda s, al: "".join(sorted(s, key=al.index, reverse=True)),
    "swap_ends": _swap_ends,
    "shift1": lambda s, al: _map(s, al, lambda c, i: c + 1),
    "unshift1": lambda s, al: _map(s, al, lambda c, i: c - 1),
    "shift3": lambda s, al: _map(s, al, lambda c, i: c + 3),
    "atbash": lambda s, al: _map(s, al, lambda c, i: len(al) - 1 - c),
    "shift_even": lambda s, al: _map(s, al, lambda c, i: c + 1 if i % 2 == 0 else c),
    "shift_first": lambda s, al: _map(s, al, lambda c, i: c + 1 if i == 0 else c),
    "dup_each": lambda s, al: "".join(ch + ch for ch in s),
    "mirror": lambda s, al: s + s[::-1],
    "double": lambda s, al: s + s,
    "evens": lambda s, al: s[0::2],
    "odds": lambda s, al: s[1::2],
    "drop_first": lambda s, al: s[1:],
    "drop_last": lambda s, al: s[:-1],
    "dedup": _dedup,
    "unique": _unique,
    "first_half": lambda s, al: s[: (len(s) + 1) // 2],
}


# --------------------------------------------------------------------------------------
# vectorized skills
# --------------------------------------------------------------------------------------
def _gather(index_fn):
    """A skill whose output picks input positions: ``out[:, j] = block[:, index_fn(l)[j]]``."""
    cache = lru_cache(maxsize=None)(lambda n: np.asarray(index_fn(n), dtype=np.intp))

    def batch(block, n_chars):
        idx = cache(block.shape[1])
        return block[:, idx], idx.size

    return batch


def _charmap(table_fn):
    """A skill that maps every character index through ``table_fn(n_chars): int[A]``."""
    cache = lru_cache(maxsize=None)(lambda a: np.asarray(table_fn(a), dtype=np.uint8))

    def batch(block, n_chars):
        return cache(n_chars)[block], block.shape[1]

    return batch


def _shift_positions(positions):
    def batch(block, n_chars):
        out = block.copy()
        sel = out[:, positions]
        out[:, positions] = np.where(sel + 1 == n_chars, 0, sel + 1)
        return out, block.shape[1]

    return batch


def _compact(block, keep):
    """Keep the ``keep``-marked characters of each row, left-aligned and padded.

    One sort per row: a kept character at position j sorts by ``j << 8 | c``, a dropped
    one as ``0xFFFF``, so the low bytes of the sorted keys are the compacted row, padded.
    """
    j = np.arange(block.shape[1], dtype=np.uint16) << 8
    key = np.where(keep, j | block, np.uint16(0xFFFF))
    key.sort(axis=1)
    return (key & 0xFF).astype(np.uint8), keep.sum(axis=1)


def _dedup_batch(block, n_chars):
    keep = np.ones(block.shape, dtype=bool)
    keep[:, 1:] = block[:, 1:] != block[:, :-1]
    return _compact(block, keep)


def _unique_batch(block, n_chars):
    m, n = block.shape
    keep = np.empty(block.shape, dtype=bool)
    if n_chars <= 64:
        # a bit set per row of the characters seen so far
        seen = np.zeros(m, dtype=np.uint64)
        bits = np.left_shift(np.uint64(1), block.astype(np.uint64))
        for j in range(n):
            keep[:, j] = (seen & bits[:, j]) == 0
            seen |= bits[:, j]
    else:
        earlier = np.tril(np.ones((n, n), dtype=bool), k=-1)
        keep = ~((block[:, :, None] == block[:, None, :]) & earlier).any(axis=2)
    return _compact(block, keep)


def _swap_pairs_index(n):
    idx = list(range(n))
    for i in range(0, n - 1, 2):
        idx[i], idx[i + 1] = i + 1, i
    return idx


def _swap_ends_index(n):
    idx = list(range(n))
    if n >= 2:
        idx[0], idx[-1] = n - 1, 0
    return idx


def _sort_batch(block, n_chars):
    return np.sort(block, axis=1), block.shape[1]


def _sort_desc_batch(block, n_chars):
    return np.sort(block, axis=1)[:, ::-1], block.shape[1]


_BATCH_SKILLS = {
    "reverse": _gather(lambda n: range(n - 1, -1, -1)),
    "rotl": _gather(lambda n: [(j + 1) % n for j in range(n)]),
    "rotr": _gather(lambda n: [(j - 1) % n for j in range(n)]),
    "swap_pairs": _gather(_swap_pairs_index),
    "swap_halves": _gather(lambda n: list(range(n // 2, n)) + list(range(n // 2))),
    "sort": _sort_batch,
    "sort_desc": _sort_desc_batch,
    "swap_ends": _gather(_swap_ends_index),
    "shift1": _charmap(lambda a: (np.arange(a) + 1) % a),
    "unshift1": _charmap(lambda a: (np.arange(a) - 1) % a),
    "shift3": _charmap(lambda a: (np.arange(a) + 3) % a),
    "atbash": _charmap(lambda a: a - 1 - np.arange(a)),
    "shift_even": _shift_positions(slice(0, None, 2)),
    "shift_first": _shift_positions(slice(0, 1)),
    "dup_each": _gather(lambda n: [j // 2 for j in range(2 * n)]),
    "mirror": _gather(lambda n: list(range(n)) + list(range(n - 1, -1, -1))),
    "double": _gather(lambda n: list(range(n)) * 2),
    "evens": _gather(lambda n: range(0, n, 2)),
    "odds": _gather(lambda n: range(1, n, 2)),
    "drop_first": _gather(lambda n: range(1, n)),
    "drop_last": _gather(lambda n: range(0, n - 1)),
    "dedup": _dedup_batch,
    "unique": _unique_batch,
    "first_half": _gather(lambda n: range((n + 1) // 2)),
}

SKILLS = tuple(Skill(name, _REFERENCE_SKILLS[name], _BATCH_SKILLS[name]) for name in _REFERENCE_SKILLS)


# --------------------------------------------------------------------------------------
# reference routings: fn(history) -> str
# --------------------------------------------------------------------------------------
def _skip(h):
    return h[-2] if len(h) >= 2 else h[0]


def _zip(a, b):
    m = min(len(a), len(b))
    return "".join(x + y for x, y in zip(a, b)) + a[m:] + b[m:]


def _half(s):
    return (len(s) + 1) // 2


def _longest(h):
    best = h[0]
    for s in h[1:]:
        if len(s) >= len(best):
            best = s
    return best


def _shortest(h):
    best = h[0]
    for s in h[1:]:
        if len(s) <= len(best):
            best = s
    return best


_REFERENCE_ROUTES = {
    "prev": lambda h: h[-1],
    "input": lambda h: h[0],
    "skip": _skip,
    "cat_prev_input": lambda h: h[-1] + h[0],
    "cat_input_prev": lambda h: h[0] + h[-1],
    "zip_prev_input": lambda h: _zip(h[-1], h[0]),
    "cat_prev_skip": lambda h: h[-1] + _skip(h),
    "head_prev_tail_input": lambda h: h[-1][: _half(h[-1])] + h[0][_half(h[0]):],
    "longest": _longest,
    "shortest": _shortest,
}


# --------------------------------------------------------------------------------------
# vectorized routings
# --------------------------------------------------------------------------------------
def _pick(codes, lens, j):
    """Entry ``j: int[N]`` of each history: ``(uint8[N, W], int[N])``."""
    rows = np.arange(codes.shape[0])
    return codes[rows, j], lens[rows, j]


def _prev(codes, lens, depth):
    return _pick(codes, lens, depth - 1)


def _input(codes, lens, depth):
    return codes[:, 0], lens[:, 0]


def _skip_batch(codes, lens, depth):
    return _pick(codes, lens, np.where(depth >= 2, depth - 2, 0))


def _splice(a, la, b, b_start, lb):
    """``a[:la] + b[b_start:lb]`` per row, padded: ``(uint8[N, Wa + Wb], int[N])``."""
    wa = a.shape[1]
    both = np.concatenate([a, b], axis=1)
    j = np.arange(both.shape[1])[None, :]
    la, b_start, lb = la[:, None], b_start[:, None], lb[:, None]
    src = np.where(j < la, j, wa + b_start + j - la)
    n = la + lb - b_start
    out = np.take_along_axis(both, np.minimum(src, both.shape[1] - 1), axis=1)
    out[j >= n] = PAD
    return out, n[:, 0]


def _concat(first, second):
    def batch(codes, lens, depth):
        (a, la), (b, lb) = first(codes, lens, depth), second(codes, lens, depth)
        return _splice(a, la, b, np.zeros_like(lb), lb)

    return batch


def _zip_batch(codes, lens, depth):
    (a, la), (b, lb) = _prev(codes, lens, depth), _input(codes, lens, depth)
    wa = a.shape[1]
    both = np.concatenate([a, b], axis=1)
    j = np.arange(both.shape[1])[None, :]
    la_, lb_ = la[:, None], lb[:, None]
    m = np.minimum(la_, lb_)
    interleaved = np.where(j % 2 == 0, j // 2, wa + j // 2)
    rest = np.where(la_ > lb_, j - m, wa + j - m)
    src = np.where(j < 2 * m, interleaved, rest)
    out = np.take_along_axis(both, np.clip(src, 0, both.shape[1] - 1), axis=1)
    n = la + lb
    out[j >= n[:, None]] = PAD
    return out, n


def _head_tail_batch(codes, lens, depth):
    (a, la), (b, lb) = _prev(codes, lens, depth), _input(codes, lens, depth)
    return _splice(a, (la + 1) // 2, b, (lb + 1) // 2, lb)


def _extreme(longest):
    def batch(codes, lens, depth):
        t = codes.shape[1]
        j = np.arange(t)[None, :]
        valid = j < depth[:, None]
        # ties go to the latest entry
        if longest:
            key = np.where(valid, lens * (t + 1) + j, -1)
            pick = key.argmax(axis=1)
        else:
            key = np.where(valid, lens * (t + 1) + (t - j), np.iinfo(np.int64).max)
            pick = key.argmin(axis=1)
        return _pick(codes, lens, pick)

    return batch


_BATCH_ROUTES = {
    "prev": _prev,
    "input": _input,
    "skip": _skip_batch,
    "cat_prev_input": _concat(_prev, _input),
    "cat_input_prev": _concat(_input, _prev),
    "zip_prev_input": _zip_batch,
    "cat_prev_skip": _concat(_prev, _skip_batch),
    "head_prev_tail_input": _head_tail_batch,
    "longest": _extreme(longest=True),
    "shortest": _extreme(longest=False),
}

def _skip_entry(t):
    return t - 2 if t >= 2 else 0


# which entries of a history of t entries each routing can read (Route.reads)
_READS = {
    "prev": lambda t: (t - 1,),
    "input": lambda t: (0,),
    "skip": lambda t: (_skip_entry(t),),
    "cat_prev_input": lambda t: (t - 1, 0),
    "cat_input_prev": lambda t: (0, t - 1),
    "zip_prev_input": lambda t: (t - 1, 0),
    "cat_prev_skip": lambda t: (t - 1, _skip_entry(t)),
    "head_prev_tail_input": lambda t: (t - 1, 0),
    "longest": range,
    "shortest": range,
}


def _extreme_entry(pick):
    """The entry ``longest`` / ``shortest`` reads: among the observed entries (``None`` =
    hidden), the one of extreme length, ties going to the latest, as the routing's ``fn``."""
    def reads_on(history):
        lengths = [(len(h), i) for i, h in enumerate(history) if h is not None]
        if not lengths:
            raise ValueError("history has no observed entry to compare lengths")
        best = pick(length for length, _ in lengths)
        return (max(i for length, i in lengths if length == best),)

    return reads_on


_READS_ON = {"longest": _extreme_entry(max), "shortest": _extreme_entry(min)}

ROUTES = tuple(Route(name, _REFERENCE_ROUTES[name], _BATCH_ROUTES[name], _READS[name], _READS_ON.get(name))
               for name in _REFERENCE_ROUTES)


def default_world() -> World:
    """The world of DESIGN §2: 24 skills, 10 routings, ``a``..``z``, ``max_len = 16``."""
    return World(skills=SKILLS, routes=ROUTES, alphabet=DEFAULT_ALPHABET, max_len=MAX_LEN)
