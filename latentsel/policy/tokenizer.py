"""Token ids for prompts and completions (DESIGN §7).

A prompt states the input and the intended program; the completion holds the intermediate
results only, so the module a step executes stays latent::

    prompt      <bos> x_1 .. x_n <prog> r_1 k_1 .. r_L k_L <out>
    completion  h_1 <sep> h_2 <sep> .. <sep> h_L <eos>

``x`` and ``h_t`` are strings over the world's alphabet (one token per character, a step may
be empty); ``r_t`` / ``k_t`` are one token per routing / skill.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

from latentsel.traces.failures import NO_END, overlong_reason, ran_on_reason, stopped_reason, unreadable_reason
from latentsel.world import World

__all__ = ["Tokenizer", "Parsed", "SPECIALS"]

SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>", "<prog>", "<out>")


class Parsed(NamedTuple):
    """A decoded completion: ``steps`` has exactly ``depth`` entries (``None`` = could not be
    read); ``malformed`` is ``None`` for a well-formed completion, else the first reason."""

    steps: list[str | None]
    malformed: str | None


@dataclass(frozen=True)
class Tokenizer:
    """The vocabulary of a world: specials, then characters, then routings, then skills."""

    alphabet: str
    routes: tuple[str, ...]
    skills: tuple[str, ...]
    max_len: int

    @classmethod
    def from_world(cls, world: World) -> "Tokenizer":
        return cls(world.alphabet, tuple(world.route_names), tuple(world.skill_names), world.max_len)

    def __post_init__(self):
        names = list(SPECIALS) + list(self.alphabet) + [f"r:{r}" for r in self.routes] + [f"k:{k}" for k in self.skills]
        object.__setattr__(self, "_names", tuple(names))
        object.__setattr__(self, "_ids", {n: i for i, n in enumerate(names)})

    # -- ids ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._names)

    pad = property(lambda self: 0)
    bos = property(lambda self: 1)
    eos = property(lambda self: 2)
    sep = property(lambda self: 3)
    prog = property(lambda self: 4)
    out = property(lambda self: 5)

    @property
    def first_char(self) -> int:
        return len(SPECIALS)

    @property
    def segment_tokens(self) -> tuple[int, ...]:
        """The tokens that open a segment (the input, the program, each step)."""
        return (self.bos, self.prog, self.out, self.sep)

    def is_char(self, token: int) -> bool:
        return self.first_char <= token < self.first_char + len(self.alphabet)

    def name(self, token: int) -> str:
        return self._names[token]

    def block_size(self, max_depth: int) -> int:
        """The longest prompt + completion for programs up to ``max_depth`` steps."""
        prompt = 1 + self.max_len + 1 + 2 * max_depth + 1
        return prompt + self.completion_budget(max_depth)

    def completion_budget(self, depth: int) -> int:
        """Tokens a well-formed completion of ``depth`` steps may need (steps, separators, end)."""
        return depth * (self.max_len + 1)

    # -- encoding ----------------------------------------------------------------------
    def chars(self, s: str) -> list[int]:
        try:
            return [self._ids[c] for c in s]
        except KeyError:
            bad = "".join(sorted(set(s) - set(self.alphabet)))
            raise ValueError(f"{s!r} has characters outside the alphabet: {bad!r}") from None

    def encode_prompt(self, x: str, program: Sequence[tuple[str, str]]) -> list[int]:
        """``[bos] x [prog] (r k)* [out]``; ``KeyError`` naming an unknown module."""
        ids = [self.bos, *self.chars(x), self.prog]
        for route, skill in program:
            for key in (f"r:{route}", f"k:{skill}"):
                if key not in self._ids:
                    raise KeyError(f"unknown {'routing' if key[0] == 'r' else 'skill'} {key[2:]!r}")
                ids.append(self._ids[key])
        ids.append(self.out)
        return ids

    def encode_completion(self, steps: Sequence[str]) -> list[int]:
        """``h_1 [sep] .. [sep] h_L [eos]`` for fully observed steps."""
        ids: list[int] = []
        for t, step in enumerate(steps):
            if step is None:
                raise ValueError(f"step {t + 1} is unobserved; a completion needs every step")
            if t:
                ids.append(self.sep)
            ids.extend(self.chars(step))
        ids.append(self.eos)
        return ids

    def parse_completion(self, ids: Sequence[int], depth: int) -> Parsed:
        """Read the steps of a generated completion; never raises on a malformed one.

        Tokens after the first ``<eos>`` are ignored. A piece between separators that holds
        a non-character token or more than ``max_len`` characters becomes ``None``; missing
        pieces are ``None``; surplus pieces are dropped. Each case sets ``malformed``.
        """
        ids = [int(i) for i in ids]
        reasons: list[str] = []
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        else:
            reasons.append(NO_END)
        pieces: list[list[int]] = [[]]
        for tok in ids:
            if tok == self.sep:
                pieces.append([])
            else:
                pieces[-1].append(tok)
        steps: list[str | None] = []
        for t, piece in enumerate(pieces[:depth]):
            if not all(self.is_char(tok) for tok in piece):
                reasons.append(unreadable_reason(t + 1))
                steps.append(None)
            elif len(piece) > self.max_len:
                reasons.append(overlong_reason(t + 1, self.max_len))
                steps.append(None)
            else:
                steps.append("".join(self._names[tok] for tok in piece))
        if len(pieces) < depth:
            reasons.append(stopped_reason(len(pieces), depth))
            steps.extend([None] * (depth - len(pieces)))
        elif len(pieces) > depth:
            reasons.append(ran_on_reason(len(pieces), depth))
        return Parsed(steps, "; ".join(reasons) or None)
