"""The columnar fast path of the streaming reader: blocks read as Arrow columns accept and refuse
exactly what the line reader does, on texts where pyarrow's JSON parser and Python's differ, and
build_data reads the columns into the same statistics as the records."""
import json
import pickle

import numpy as np
import pytest

from latentsel.models.registry import default_params
from latentsel.traces.columns import TraceColumns
from latentsel.traces.emission import build_data
from latentsel.traces.format import TraceFormatError, read_traces, write_traces
from latentsel.traces.regimes import generate
from latentsel.traces.simulate import simulate
from latentsel.traces.stream import iter_chunks
from latentsel.world import World, default_world


def _key(tr):
    program = None if tr.program is None else [tuple(p) for p in tr.program]
    truth = None if tr.truth is None else (tuple(tr.truth.routes), tuple(tr.truth.skills), tuple(tr.truth.off))
    return (tr.id, tr.input, list(tr.steps), program, tr.answer, tr.source, truth, dict(tr.extra))


@pytest.fixture(scope="module")
def lines(tmp_path_factory, world):
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.8, noise=0.05, off_module=0.05)
    traces = simulate(generate("eval-ood", 30, seed=5), truth, "modular", world, seed=6)
    path = tmp_path_factory.mktemp("columns") / "t.jsonl"
    write_traces(path, traces, world=world)
    return path.read_bytes().splitlines()


def _compare(path, world, chunk=8):
    """iter_chunks against read_traces on ``path``: the first error, and with skip_invalid the
    records kept and the errors, all equal. Returns the chunks."""
    try:
        want = read_traces(path, world=world)
        want_error = None
    except TraceFormatError as e:
        want_error = str(e)
    try:
        got = [tr for c in iter_chunks(path, world=world, chunk=chunk, prefixes=False) for tr in c]
        got_error = None
    except TraceFormatError as e:
        got_error = str(e)
    assert got_error == want_error
    if want_error is None:
        assert [_key(t) for t in got] == [_key(t) for t in want]
    want_errors, got_errors = [], []
    kept = read_traces(path, world=world, skip_invalid=True, errors=want_errors)
    chunks = list(iter_chunks(path, world=world, chunk=chunk, skip_invalid=True, errors=got_errors, prefixes=False))
    assert [str(e) for e in got_errors] == [str(e) for e in want_errors]
    assert [_key(t) for c in chunks for t in c] == [_key(t) for t in kept]
    return chunks


def _record(line: bytes) -> dict:
    return json.loads(line)


def _with(record: dict, **kw) -> bytes:
    return json.dumps({**record, **kw}).encode()


# lines where pyarrow and Python's json may read differently; each replaces line 5 of 30
EDGE = {
    "duplicate key": lambda r: json.dumps(r).replace('{"id": ', '{"id": "x", "id": ', 1).encode(),
    "id a number": lambda r: _with(r, id=5),
    "raw tab in id": lambda r: json.dumps(r).replace(r["id"], r["id"] + "\t", 1).encode(),
    "escaped non-ASCII id": lambda r: _with(r, id=r["id"] + "é\n"),
    "lone surrogate escape": lambda r: json.dumps(r).replace(r["id"], r["id"] + "\\ud800", 1).encode(),
    "invalid UTF-8": lambda r: json.dumps(r).replace(r["id"], r["id"] + "Z", 1).encode().replace(b"Z", b"\xff"),
    "two objects on one line": lambda r: json.dumps(r).encode() + _with(r, id="other"),
    "NaN in source": lambda r: json.dumps({**r, "source": {"x": float("nan")}}).encode(),
    "Infinity in source": lambda r: json.dumps({**r, "source": {"x": [1.0, float("inf")]}}).encode(),
    "1e400 in source": lambda r: json.dumps({**r, "source": {"x": 1.0}}).replace("1.0", "1e400").encode(),
    "big integer in source": lambda r: _with(r, source={"x": 10 ** 30}),
    "deep source": lambda r: json.dumps({**r, "source": {"x": 0}}).replace("0}", "[" * 3000 + "]" * 3000 + "}").encode(),
    "source a number": lambda r: _with(r, source=5),
    "source a list": lambda r: _with(r, source=[1]),
    "source null": lambda r: _with(r, source=None),
    "source other keys": lambda r: _with(r, source={"policy": "sft", "step": 3, "nested": {"a": [1, 2]}}),
    "extra key": lambda r: _with(r, note="hi"),
    "malformed completion": lambda r: _with(r, malformed={"step": 1, "reason": "parse"}),
    "truth with another key": lambda r: _with(r, truth={**r["truth"], "q": 1}),
    "truth missing a key": lambda r: _with(r, truth={k: v for k, v in r["truth"].items() if k != "off"}),
    "truth off as numbers": lambda r: _with(r, truth={**r["truth"], "off": [0] * len(r["steps"])}),
    "truth null": lambda r: _with(r, truth=None),
    "null in a program pair": lambda r: _with(r, program=[[r["program"][0][0], None]] + r["program"][1:]),
    "program triple": lambda r: _with(r, program=[r["program"][0] + ["x"]] + r["program"][1:]),
    "program null": lambda r: _with(r, program=None),
    "id null": lambda r: _with(r, id=None),
    "input missing": lambda r: json.dumps({k: v for k, v in r.items() if k != "input"}).encode(),
    "hidden steps": lambda r: _with(r, steps=[None] + r["steps"][1:]),
    "answer": lambda r: _with(r, answer=r["steps"][-1]),
    "answer outside the alphabet": lambda r: _with(r, answer="A"),
    "BOM before the record": lambda r: b"\xef\xbb\xbf" + json.dumps(r).encode(),
    "spaces and CR around": lambda r: b"  " + json.dumps(r).encode() + b" \r",
    "CR between two objects": lambda r: json.dumps(r).encode() + b"\r" + _with(r, id="other"),
    "array": lambda r: b"[1, 2]",
    "null": lambda r: b"null",
}


@pytest.mark.parametrize("what", sorted(EDGE))
@pytest.mark.parametrize("chunk", [4, 100])
def test_edge_lines_are_read_as_the_line_reader_reads_them(lines, world, tmp_path, what, chunk):
    body = list(lines)
    body[5] = EDGE[what](_record(body[5]))
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(body) + b"\n")
    _compare(path, world, chunk)


def test_an_object_over_two_lines_beside_two_on_one(lines, world, tmp_path):
    """Three lines that pyarrow reads as three rows (two objects on the first, one over the next
    two), and Python's reader refuses all three."""
    body = list(lines[:10])
    r = _record(body[5])
    text = json.dumps(r)
    cut = text.index(', "input"')
    body[4] = body[4] + _with(r, id="other")
    body[5] = text[:cut + 1].encode()
    body.insert(6, text[cut + 1:].encode())
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(body) + b"\n")
    chunks = _compare(path, world, chunk=100)
    assert sum(map(len, chunks)) == 8  # 11 lines, 3 refused


@pytest.mark.parametrize("layout", ["plain", "CRLF", "blank lines", "no final newline", "gzip"])
def test_a_clean_file_is_read_as_columns(lines, world, tmp_path, layout):
    """Every layout of a valid file stays on the fast path (no block falls back to the line parser)."""
    body = list(lines)
    sep, end, name = b"\n", b"\n", "t.jsonl"
    if layout == "CRLF":
        sep, end = b"\r\n", b"\r\n"
    elif layout == "blank lines":
        body = [x for line in body for x in (line, b"  ")]
    elif layout == "no final newline":
        end = b""
    data = sep.join(body) + end
    path = tmp_path / name
    if layout == "gzip":
        import gzip

        path = tmp_path / "t.jsonl.gz"
        data = gzip.compress(data)
    path.write_bytes(data)
    chunks = _compare(path, world, chunk=7)
    assert chunks and all(isinstance(c, TraceColumns) for c in chunks)
    assert sum(map(len, chunks)) == 30


def _arrays_equal(a, b):
    assert all(np.array_equal(x, y) for x, y in zip(a.arrays(), b.arrays()))
    assert len(a.blocks) == len(b.blocks)
    for ga, gb in zip(a.blocks, b.blocks):
        for fa, fb in zip(ga, gb):
            if isinstance(fa, tuple):
                assert all(np.array_equal(x, y) for x, y in zip(fa, fb))
            else:
                assert np.array_equal(fa, fb)


@pytest.mark.parametrize("model", ["modular", "grammar"])
def test_build_data_reads_columns_as_records(world, tmp_path, model):
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.8, noise=0.05, off_module=0.05)
    traces = simulate(generate("eval-ood", 120, seed=7), truth, "modular", world, seed=8, hide=[2])
    traces += simulate(generate("eval-seen", 80, seed=9), truth, "modular", world, seed=10)
    for i, tr in enumerate(traces):
        tr.id = f"t{i}"
    path = tmp_path / "t.jsonl"
    write_traces(path, traces, world=world)
    (cols,) = list(iter_chunks(path, world=world, chunk=1000))
    assert isinstance(cols, TraceColumns) and cols.hidden.size == 120
    _arrays_equal(build_data(cols, world, model=model), build_data(read_traces(path, world=world), world, model=model))
    # a subset in another order, and a block sent to another process
    idx = np.array([150, 3, 7, 199, 0, 64])
    want = build_data([traces[i] for i in idx], world, model=model)
    _arrays_equal(build_data(cols.take(idx), world, model=model), want)
    _arrays_equal(build_data(pickle.loads(pickle.dumps(cols.take(idx))), world, model=model), want)
    assert [_key(t) for t in cols.take(idx)] == [_key(traces[i]) for i in idx]


def test_columns_know_their_world(world, lines, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    (cols,) = list(iter_chunks(path, world=world, chunk=1000))
    other = World(world.skills, world.routes, alphabet=world.alphabet + "!", max_len=world.max_len)
    with pytest.raises(ValueError, match="read for another world"):
        build_data(cols, other)
    # the grammar model reads no program, and still refuses another alphabet
    with pytest.raises(ValueError, match="read for another world"):
        build_data(cols, other, model="grammar")


def test_a_world_with_a_non_ascii_alphabet(tmp_path):
    base = default_world()
    world = World(base.skills, base.routes, alphabet="abcdéfghijklmnopqrstuvwxyz"[:26], max_len=base.max_len)
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.8, noise=0.05, off_module=0.05)
    traces = simulate(generate("eval-ood", 40, seed=11, world=world), truth, "modular", world, seed=12)
    assert any("é" in tr.input or any("é" in (s or "") for s in tr.steps) for tr in traces)
    path = tmp_path / "t.jsonl"
    write_traces(path, traces, world=world)
    chunks = _compare(path, world, chunk=16)
    assert all(isinstance(c, TraceColumns) for c in chunks)
    _arrays_equal(build_data(chunks[0], world), build_data(traces[:16], world))


@pytest.mark.parametrize("why", ["duplicate id", "too deep"])
def test_a_refused_trace_without_program_leaves_the_rest_of_its_block_fit_for_programs(lines, world, tmp_path, why):
    """A refused line that states no program is dropped from its block, and the block's other
    traces (all with programs) still build for the modular model."""
    from latentsel.analysis.streaming import StreamedCorpus

    body = list(lines[:6])
    r = _record(body[0])
    body.append(_with(r, program=None) if why == "duplicate id"
                else _with(r, id="deep", program=None, truth=None, steps=r["steps"] * 3))
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(body) + b"\n")
    errors = []
    chunks = list(iter_chunks(path, world=world, chunk=100, skip_invalid=True, errors=errors, max_depth=8))
    assert len(errors) == 1 and ":7: " in str(errors[0])
    (cols,) = chunks
    assert isinstance(cols, TraceColumns) and len(cols) == 6
    _arrays_equal(build_data(cols, world), build_data(read_traces(path, world=world, skip_invalid=True)[:6], world))
    with StreamedCorpus(path, world, "modular", skip_invalid=True, cache="memory", max_depth=8) as corpus:
        assert corpus.n_traces == 6


def test_the_trace_without_program_is_the_one_named(lines, world, tmp_path):
    body = list(lines[:5])
    body[3] = _with(_record(body[3]), program=None)
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(body) + b"\n")
    (cols,) = list(iter_chunks(path, world=world, chunk=100))
    ids = cols.ids
    build_data(cols.take([0, 1, 2, 4]), world)  # the others state theirs
    for taken in ([3], [4, 3, 0]):
        with pytest.raises(ValueError, match=f"trace '{ids[3]}' states no program"):
            build_data(cols.take(taken), world)
    build_data(cols, world, model="grammar")


@pytest.mark.parametrize("chunk", [1, 100])
def test_a_truncated_gzip_after_a_bad_line_reports_the_bad_line_first(lines, world, tmp_path, chunk):
    import gzip

    body = [b'{"id": 5}'] + list(lines[:3])
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(body) + b"\n")[:-4])
    with pytest.raises(TraceFormatError) as want:
        read_traces(path, world=world)
    with pytest.raises(TraceFormatError) as got:
        list(iter_chunks(path, world=world, chunk=chunk))
    assert str(got.value) == str(want.value) and ":1: " in str(got.value)
    # skipped: the same errors, then the same read error, and the traces read before it
    want_errors, got_errors, kept = [], [], []
    with pytest.raises(TraceFormatError) as want:
        for tr in read_traces(path, world=world, skip_invalid=True, errors=want_errors):
            pass
    with pytest.raises(TraceFormatError) as got:
        for c in iter_chunks(path, world=world, chunk=chunk, skip_invalid=True, errors=got_errors):
            kept.extend(c)
    assert str(got.value) == str(want.value) and "cannot read" in str(got.value)
    assert [str(e) for e in got_errors] == [str(e) for e in want_errors] and len(got_errors) == 1
    assert [t.id for t in kept] == [_record(x)["id"] for x in lines[:3]]


def test_dates_in_source_stay_on_the_fast_path(lines, world, tmp_path):
    """pyarrow infers a date-like string as a timestamp: a corpus whose sources carry one is
    still read as columns, with the same records."""
    body = [_with(_record(x), source={"run": "ppo", "written": "2026-11-30T12:00:00", "day": "2026-11-30"})
            for x in lines]
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(body) + b"\n")
    chunks = _compare(path, world, chunk=7)
    assert chunks and all(isinstance(c, TraceColumns) for c in chunks)
    assert next(iter(chunks[0])).source["written"] == "2026-11-30T12:00:00"
