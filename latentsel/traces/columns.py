"""A block of trace lines read as columns: the streaming reader's fast path.

:func:`read_columns` parses a block of JSONL lines with pyarrow's multi-threaded JSON reader
into Arrow columns and validates the whole block in vectorized passes over them: every string
against the alphabet and ``max_len`` through one lookup of its bytes, every module name by a
dictionary lookup, every length (program, truth, steps) from the list offsets. It accepts a
block only if :func:`latentsel.traces.format.parse_line` would accept every one of its lines
with the same content; anything else (a bad record, a record it does not model, a JSON text
the two parsers might read differently) raises :class:`Slow`, and the caller reads the block
line by line through ``parse_line``, the one validator of the format.

Where pyarrow and Python's ``json`` differ, the block goes to the slow path:

* two objects on one line, or one object over two lines: pyarrow reads both; the block is
  taken only if every line is ``{...}`` (a top-level object can then neither continue past its
  line nor share it: after a closing ``}`` an open object continues with ``,`` ``}`` or ``]``,
  never ``{``), and there are as many rows as lines;
* invalid UTF-8 inside strings (pyarrow keeps it), NaN or infinite numbers and nesting deeper
  than Python's parser takes (in ``source``): refused before or after the parse;
* keys the record does not model, ``malformed`` completions, a ``source`` that is not an
  object, a ``truth`` with other keys.

:class:`TraceColumns` holds an accepted block: the Arrow table, the lengths ``build_data``
needs, and the block's bytes, from which a record is decoded only when one is asked for.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np

from latentsel.traces.format import hidden_run_error
from latentsel.world import World
from latentsel.world.executor import PAD, _lookup_table, encode

__all__ = ["TraceColumns", "read_columns", "parse_block", "check_table", "record_decoder", "Slow"]

_MAX_NESTING = 64
"""The deepest ``source`` the fast path takes (Python's parser refuses ~1,000 levels; pyarrow has no limit)."""


_BLOCK_BYTES = 1 << 20
"""pyarrow's parse unit: blocks of 1 MiB are parsed on all cores."""


class Slow(Exception):
    """This block needs the line-by-line parser."""


def _pa():
    import pyarrow  # noqa: PLC0415 - imported with the first streamed block, not with the package
    import pyarrow.compute  # noqa: F401, PLC0415
    import pyarrow.json  # noqa: F401, PLC0415
    return pyarrow


@lru_cache(maxsize=1)
def _schema():
    pa = _pa()
    names = pa.list_(pa.string())
    truth = pa.struct([("routes", names), ("skills", names), ("off", pa.list_(pa.bool_()))])
    # ``source`` is free-form: its type is inferred per block (and must come out an object)
    return pa.schema([("id", pa.string()), ("input", pa.string()), ("program", pa.list_(names)),
                      ("steps", names), ("answer", pa.string()), ("truth", truth)])


def _array(column):
    """One Arrow array of a (chunked) column."""
    pa = _pa()
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _offsets(arr) -> np.ndarray:
    """int64[len + 1]: the offsets of a list or string array (its own slice)."""
    return np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1].astype(np.int64)


def _bytes(arr) -> np.ndarray:
    """uint8: the data buffer of a string array."""
    buf = arr.buffers()[2]
    return np.empty(0, dtype=np.uint8) if buf is None else np.frombuffer(buf, dtype=np.uint8)


def _lengths(arr) -> np.ndarray:
    off = _offsets(arr)
    return off[1:] - off[:-1]


def _list_values(arr):
    """The values of a list array's own slice (a list array's ``.values`` may reach past it)."""
    off = _offsets(arr)
    return arr.values.slice(int(off[0]), int(off[-1] - off[0]))


def _string_data(arr):
    """``(arr, offsets, bytes)``: a string array with its nulls as ``""`` (a null slot's bytes are
    not a string), its offsets, and the bytes of its strings."""
    if arr.null_count:
        arr = _pa().compute.fill_null(arr, "")
    off = _offsets(arr)
    return arr, off, _bytes(arr)[int(off[0]): int(off[-1])]


def string_codes(arr, world: World) -> tuple[np.ndarray, np.ndarray]:
    """``(codes: uint8[S, W], lens: int32[S])`` of a string array of valid strings (a null reads
    as ``""``): ASCII data mapped byte by byte, any other decoded to code points (``encode``)."""
    arr, off, raw = _string_data(arr)
    if raw.size and raw.max() >= 128:  # UTF-8 beyond ASCII: characters are not bytes
        return encode(arr.to_pylist(), world)
    lens = (off[1:] - off[:-1]).astype(np.int32)
    codes = np.full((lens.size, world.max_len), PAD, dtype=np.uint8)
    codes[np.arange(world.max_len) < lens[:, None]] = _lookup_table(world.alphabet)[raw]
    return codes, lens


@lru_cache(maxsize=16)
def _byte_classes(alphabet: str) -> np.ndarray:
    """uint8[256]: per byte 0 (an ASCII character of the alphabet), 1 (another ASCII byte) or 2 (not ASCII)."""
    out = np.where(_lookup_table(alphabet)[:256] == PAD, 1, 0).astype(np.uint8)
    out[128:] = 2
    return out


def _check_strings(arr, world: World) -> None:
    """:class:`Slow` unless every string of ``arr`` is at most ``max_len`` characters of the alphabet."""
    arr, off, raw = _string_data(arr)
    worst = int(np.take(_byte_classes(world.alphabet), raw).max(initial=0))
    if worst == 2:  # UTF-8 beyond ASCII: checked as code points
        try:
            encode(arr.to_pylist(), world)
        except ValueError:
            raise Slow from None
        return
    if worst or (off[1:] - off[:-1]).max(initial=0) > world.max_len:
        raise Slow


@lru_cache(maxsize=16)
def _name_table(route_names: tuple[str, ...], skill_names: tuple[str, ...]):
    """The module names of a world as one Arrow value set, and per entry its routing and skill
    index (-1 where it is not one)."""
    union = list(dict.fromkeys(route_names + skill_names))
    route = {name: i for i, name in enumerate(route_names)}
    skill = {name: i for i, name in enumerate(skill_names)}
    return (_pa().array(union, type=_pa().string()), np.array([route.get(u, -1) for u in union], dtype=np.int32),
            np.array([skill.get(u, -1) for u in union], dtype=np.int32))


def _names(arr, world: World):
    """``(index, routing, skill)``: per name of a string array its entry in the world's value set,
    and per entry its routing and skill index (-1 where it is not one); :class:`Slow` for a name
    that is neither."""
    values, route, skill = _name_table(tuple(world.route_names), tuple(world.skill_names))
    idx = _pa().compute.index_in(arr, value_set=values)
    if idx.null_count:
        raise Slow
    return idx.to_numpy(zero_copy_only=False), route, skill


def _depth(self) -> int:
    return len(self.steps)


def _extra(self) -> dict:
    return {}  # a block is read as columns only if its records have no other keys


def _source(self) -> dict:
    return {} if self.source_ is None else self.source_  # as parse_trace reads a missing or null source


@lru_cache(maxsize=8)
def record_decoder(route_names: tuple[str, ...], skill_names: tuple[str, ...]):
    """The msgspec decoder of one line of a block :func:`read_columns` accepted, as a light
    record of a world (module names are literals: a decoded name is the literal's own string)."""
    import msgspec  # noqa: PLC0415 - with the first record asked for

    route, skill = Literal[route_names], Literal[skill_names]
    truth = msgspec.defstruct("TruthRecord", [("routes", list[route]), ("skills", list[skill]), ("off", list[bool])],
                              forbid_unknown_fields=True, gc=False)
    record = msgspec.defstruct(
        "TraceRecord",
        [("id", str), ("input", str), ("steps", list[Optional[str]]),
         ("program", Optional[list[tuple[route, skill]]], None), ("answer", Optional[str], None),
         ("source_", Optional[dict[str, Any]], msgspec.field(default=None, name="source")),
         ("truth", Optional[truth], None)],
        forbid_unknown_fields=True, gc=False,
        namespace={"depth": property(_depth), "extra": property(_extra), "source": property(_source),
                   "__doc__": "A trace record of a block read as columns."})
    return msgspec.json.Decoder(record)


def _finite(arr, depth: int = 0) -> bool:
    """Whether every number in ``arr`` (nested lists and objects) is finite, within ``_MAX_NESTING``."""
    pa = _pa()
    t = arr.type
    if depth > _MAX_NESTING:
        return False
    if pa.types.is_struct(t):
        return all(_finite(arr.field(i), depth + 1) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _finite(_list_values(arr), depth + 1)
    if pa.types.is_floating(t):
        return pa.compute.all(pa.compute.is_finite(arr), skip_nulls=True).as_py() is not False
    # (a string that looks like a date is inferred as a timestamp: still a JSON string)
    return (pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_string(t) or pa.types.is_null(t)
            or pa.types.is_timestamp(t))


def _every_line_an_object(block: bytes, n_lines: int) -> bool:
    """Whether each of the block's ``n_lines`` lines is ``{...}`` with nothing around it."""
    if not block.startswith(b"{"):
        return False
    body = block[:-1] if block.endswith(b"\n") else block
    return body.endswith(b"}") and body.count(b"}\n{") == n_lines - 1


class TraceColumns(Sequence):
    """A validated block of traces as columns, and a sequence of trace records.

    ``depth`` (int64[N]), ``modules`` (int32[sum depth]: route * K + skill in step order, -1 on
    the steps of a trace that states no program) and ``hidden`` (the rows with a hidden step) are
    what :func:`latentsel.traces.emission.build_data` reads, with :meth:`codes`. ``tc[i]`` is
    the record of row ``i``, decoded from its line when asked for (the streaming reader's record
    type: ``id``, ``input``, ``program``, ``steps``, ``answer``, ``source``, ``truth``, ``depth``).
    """

    def __init__(self, table, block: bytes, rows: np.ndarray, depth: np.ndarray, modules: np.ndarray,
                 hidden: np.ndarray, world_key: tuple):
        self.table, self.block, self.rows = table, block, rows
        self.depth, self.modules, self.hidden = depth, modules, hidden
        # the world the block was checked against: routing and skill names (the record type), alphabet, max_len
        self.world_key = world_key
        self._spans: np.ndarray | None = None

    @property
    def _decode(self):
        return record_decoder(*self.world_key[:2]).decode

    def check_world(self, world: World) -> None:
        """``ValueError`` unless the block was read for ``world`` (its names, alphabet and ``max_len``)."""
        if _world_key(world) != self.world_key:
            raise ValueError("these traces were read for another world (other modules, alphabet or max_len): "
                             "read them with the world you fit")

    def __len__(self) -> int:
        return self.rows.size

    @property
    def ids(self) -> list[str]:
        return self.table.column("id").to_pylist()

    def _line_spans(self) -> np.ndarray:
        """int64[lines, 2]: the byte span of each line of the block (rows index into it)."""
        if self._spans is None:
            nl = np.flatnonzero(np.frombuffer(self.block, dtype=np.uint8) == 10)
            ends = np.append(nl + 1, len(self.block)) if not self.block.endswith(b"\n") else nl + 1
            self._spans = np.stack([np.r_[0, ends[:-1]], ends], axis=1)
        return self._spans

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        lo, hi = self._line_spans()[self.rows[i]]
        return self._decode(self.block[lo:hi])

    def __iter__(self) -> Iterator:
        spans = self._line_spans()[self.rows]
        block, decode = self.block, self._decode
        return (decode(block[lo:hi]) for lo, hi in spans.tolist())

    def take(self, idx: np.ndarray) -> "TraceColumns":
        """The rows ``idx`` (in that order), sharing this block."""
        idx = np.asarray(idx, dtype=np.int64)
        depth = self.depth[idx]
        first = np.r_[0, np.cumsum(self.depth)][idx]  # each taken trace's steps, in the order taken
        modules = self.modules[np.repeat(first - (np.cumsum(depth) - depth), depth) + np.arange(depth.sum())]
        hidden = np.flatnonzero(np.isin(idx, self.hidden)) if self.hidden.size else self.hidden
        out = TraceColumns(self.table.take(idx), self.block, self.rows[idx], depth, modules, hidden, self.world_key)
        out._spans = self._spans
        return out

    def codes(self, world: World) -> tuple[np.ndarray, np.ndarray]:
        """``(codes: uint8[N, T + 1, W], lens: int32[N, T + 1])``: each trace's input and steps
        (a hidden step as ``""``), padded past its depth; ``T`` the deepest trace."""
        self.check_world(world)
        n, t_max = len(self), int(self.depth.max())
        x_codes, x_lens = string_codes(_array(self.table.column("input")), world)
        s_codes, s_lens = string_codes(_list_values(_array(self.table.column("steps"))), world)
        codes = np.full((n, t_max + 1, world.max_len), PAD, dtype=np.uint8)
        lens = np.zeros((n, t_max + 1), dtype=np.int32)
        codes[:, 0], lens[:, 0] = x_codes, x_lens
        steps = np.arange(t_max) < self.depth[:, None]
        codes[:, 1:][steps], lens[:, 1:][steps] = s_codes, s_lens
        return codes, lens


def read_columns(block: bytes, n_lines: int, world: World) -> TraceColumns:
    """The traces of ``block`` (``n_lines`` lines, none blank, ``\\n``-separated), or :class:`Slow`."""
    return check_table(parse_block(block, n_lines), block, world)


def parse_block(block: bytes, n_lines: int):
    """The Arrow table of ``block`` (``n_lines`` lines, none blank), or :class:`Slow`: the half of
    :func:`read_columns` that holds no lock (pyarrow parses on all cores with Python's lock released)."""
    if not _every_line_an_object(block, n_lines):
        raise Slow
    if not block.isascii():
        try:  # pyarrow keeps invalid UTF-8 inside strings; Python's reader refuses it
            block.decode("utf-8")
        except UnicodeDecodeError:
            raise Slow from None
    pa = _pa()
    try:
        table = pa.json.read_json(pa.BufferReader(block), read_options=pa.json.ReadOptions(block_size=_BLOCK_BYTES),
                                  parse_options=pa.json.ParseOptions(explicit_schema=_schema(),
                                                                     unexpected_field_behavior="infer"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, UnicodeDecodeError):
        raise Slow from None
    if table.num_rows != n_lines:
        raise Slow
    return table


def check_table(table, block: bytes, world: World) -> TraceColumns:
    """The block ``block`` parsed as ``table`` (:func:`parse_block`), validated against ``world``:
    :class:`Slow` unless ``parse_line`` accepts every record as it stands."""
    pa = _pa()
    n = table.num_rows
    if set(table.column_names) - {"id", "input", "program", "steps", "answer", "source", "truth"}:
        raise Slow
    ids, inputs, steps = (_array(table.column(k)) for k in ("id", "input", "steps"))
    if ids.null_count or inputs.null_count or steps.null_count or (_lengths(ids) == 0).any():
        raise Slow
    depth = _lengths(steps)
    if (depth == 0).any():
        raise Slow
    # strings: input, observed steps, answer
    step_values = _list_values(steps)
    _check_strings(inputs, world)
    _check_strings(step_values, world)
    answer = _array(table.column("answer"))
    if answer.null_count < n:
        _check_strings(answer, world)
    hidden = np.empty(0, dtype=np.int64)
    if step_values.null_count:
        owner = np.repeat(np.arange(n), depth)
        hidden = np.unique(owner[np.asarray(step_values.is_null())])
        steps_py = steps.take(pa.array(hidden)).to_pylist()
        if any(hidden_run_error(s) is not None for s in steps_py):
            raise Slow
    # program: [routing, skill] pairs of known names, one per step
    modules = np.full(int(depth.sum()), -1, dtype=np.int32)
    program = _array(table.column("program"))
    if program.null_count < n:
        stated = np.asarray(program.is_valid())
        lengths = _lengths(program)
        # (a null program's list is empty: the pairs are those of the stated programs, in order)
        if (lengths[stated] != depth[stated]).any() or lengths[~stated].any():
            raise Slow
        pairs = _list_values(program)
        if pairs.null_count or (_lengths(pairs) != 2).any():
            raise Slow
        names = _list_values(pairs)
        if names.null_count:
            raise Slow
        idx, as_route, as_skill = _names(names, world)
        route, skill = as_route[idx[0::2]], as_skill[idx[1::2]]
        if (route < 0).any() or (skill < 0).any():
            raise Slow
        modules[np.repeat(stated, depth)] = route * world.n_skills + skill
    # truth: three lists as long as the steps, of known names and booleans
    truth = _array(table.column("truth"))
    if [f.name for f in truth.type] != ["routes", "skills", "off"]:
        raise Slow
    if truth.null_count < n:
        given = np.asarray(truth.is_valid())
        for i, name in enumerate(("routes", "skills", "off")):
            field = truth.field(i)
            # a null field under a given truth is a missing or null key: parse_trace refuses it
            if (given & ~np.asarray(field.is_valid())).any() or (_lengths(field)[given] != depth[given]).any():
                raise Slow
            values = _list_values(field if given.all() else field.filter(pa.array(given)))
            if values.null_count:
                raise Slow
            if name != "off":
                idx, as_route, as_skill = _names(values, world)
                if ((as_route if name == "routes" else as_skill)[idx] < 0).any():
                    raise Slow
    if "source" in table.column_names:
        source = _array(table.column("source"))
        if not (pa.types.is_struct(source.type) or pa.types.is_null(source.type)) or not _finite(source):
            raise Slow
    return TraceColumns(table, block, np.arange(n), depth, modules, hidden, _world_key(world))


def _world_key(world: World) -> tuple:
    return tuple(world.route_names), tuple(world.skill_names), world.alphabet, world.max_len
