import gzip
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentsel.traces import Trace, TraceFormatError, Truth, read_traces, write_traces
from latentsel.traces.regimes import generate

GOOD = {
    "id": "sft-000017", "input": "abcde",
    "program": [["prev", "reverse"], ["cat_prev_input", "shift1"], ["longest", "evens"]],
    "steps": ["edcba", None, "fdbce"],
    "answer": "fdbce",
    "source": {"kind": "policy", "policy": "sft", "checkpoint": "ckpt.pt", "seed": 0},
    "truth": {"routes": ["prev", "cat_prev_input", "longest"],
              "skills": ["reverse", "shift1", "evens"], "off": [False, False, False]},
}


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_design_example_reads(tmp_path):
    path = _write_lines(tmp_path / "t.jsonl", [json.dumps(GOOD)])
    (trace,) = read_traces(path)
    assert trace.program[1] == ("cat_prev_input", "shift1")
    assert trace.steps == ["edcba", None, "fdbce"]
    assert trace.truth == Truth(("prev", "cat_prev_input", "longest"), ("reverse", "shift1", "evens"), (False,) * 3)
    assert trace.final == "fdbce" and trace.depth == 3
    assert trace.to_dict() == GOOD


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_round_trip(tmp_path, world, suffix):
    traces = generate("sft", 50, seed=3) + generate("eval-ood", 20, seed=3)
    traces.append(Trace("free", "abc", None, ["cba", None], answer="x", source={"note": "ünïcode"}, extra={"k": [1]}))
    path = tmp_path / f"t{suffix}"
    assert write_traces(path, traces) == len(traces)
    back = read_traces(path)
    assert [t.to_dict() for t in back] == [t.to_dict() for t in traces]
    if suffix.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            assert json.loads(f.readline())["id"] == traces[0].id


def _bad(**changes):
    rec = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is KeyError:
            del rec[key]
        else:
            rec[key] = value
    return json.dumps(rec)


@pytest.mark.parametrize("line, reason", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"id": "a", "input": "abc", "steps": [NaN]}', "NaN is not valid JSON"),
    (_bad(id=KeyError), "missing key 'id'"),
    (_bad(id=""), "id must be a non-empty string"),
    (_bad(input="abC"), "input 'abC' has characters outside the alphabet: 'C'"),
    (_bad(input="a" * 17), "input has length 17 > max_len=16"),
    (_bad(steps=[]), "steps must be a non-empty list"),
    (_bad(steps=["abc", "def"]), "steps has length 2 but program has length 3"),
    (_bad(steps=["edcba", 3, "x"]), "steps[1] must be a string, got int"),
    (_bad(steps=["edcba", None, "fdbcé"]), "steps[2] 'fdbcé' has characters outside the alphabet"),
    (_bad(program=[["prev", "reverse"], ["cat_prev_input", "shift9"], ["longest", "evens"]]),
     "program[1]: unknown skill 'shift9'"),
    (_bad(program=[["nowhere", "reverse"], ["prev", "shift1"], ["longest", "evens"]]),
     "program[0]: unknown routing 'nowhere'"),
    (_bad(program=[["prev"], ["prev", "shift1"], ["longest", "evens"]]), "program[0] must be a [routing, skill] pair"),
    (_bad(program="prev"), "program must be a list"),
    (_bad(source=[1]), "source must be an object"),
    (_bad(truth={"routes": ["prev"], "skills": [], "off": []}), "truth.routes must be a list of 3 names"),
    (_bad(truth={"routes": ["prev"] * 3, "skills": ["reverse", "reverse", "x"], "off": [False] * 3}),
     "truth.skills[2]: unknown name 'x'"),
    (_bad(truth={"routes": ["prev"] * 3, "skills": ["reverse"] * 3, "off": [0, 0, 0]}),
     "truth.off must be a list of 3 booleans"),
])
def test_bad_record_names_file_line_and_reason(tmp_path, line, reason):
    path = _write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), "", line])
    with pytest.raises(TraceFormatError) as info:
        read_traces(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert reason in str(info.value)
    assert info.value.line == 3


def test_duplicate_id(tmp_path):
    path = _write_lines(tmp_path / "dup.jsonl", [json.dumps(GOOD)] * 2)
    with pytest.raises(TraceFormatError, match=r"dup.jsonl:2: duplicate id 'sft-000017' \(first on line 1\)"):
        read_traces(path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(TraceFormatError, match=r"bin.jsonl:2: not valid UTF-8"):
        read_traces(path)


def test_skip_invalid_counts(tmp_path):
    good = [json.dumps(dict(GOOD, id=f"t{i}")) for i in range(5)]
    path = _write_lines(tmp_path / "mixed.jsonl", [good[0], "oops", good[1], _bad(input="A"), good[2]])
    errors = []
    traces = read_traces(path, skip_invalid=True, errors=errors)
    assert [t.id for t in traces] == ["t0", "t1", "t2"]
    assert [e.line for e in errors] == [2, 4]


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(TraceFormatError, match="no such file"):
        read_traces(tmp_path / "nope.jsonl")
    bad_gz = tmp_path / "t.jsonl.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(TraceFormatError, match="t.jsonl.gz:1: cannot read"):
        read_traces(bad_gz)
    with pytest.raises(TraceFormatError, match="is a directory"):
        read_traces(tmp_path)


def test_empty_file_has_no_traces(tmp_path):
    assert read_traces(_write_lines(tmp_path / "e.jsonl", [])) == []


def test_write_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    write_traces(path, generate("sft", 5, seed=0))
    before = path.read_bytes()
    bad = generate("sft", 5, seed=1)
    bad[3].steps[0] = "NOT IN SIGMA"
    with pytest.raises(TraceFormatError, match=r"trace 4 \(id 'sft-000003'\) is invalid"):
        write_traces(path, bad)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.jsonl"]


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400) | st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_fuzz_reader_raises_only_its_own_error(tmp_path, data):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    try:
        read_traces(path)
    except TraceFormatError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["id", "input", "program", "steps", "answer", "source", "truth", "x"]),
                       json_values, max_size=8))
def test_fuzz_records_raise_only_its_own_error(tmp_path, record):
    path = tmp_path / "fuzz.jsonl"
    path.write_text(json.dumps(record) + "\n")
    try:
        read_traces(path)
    except TraceFormatError:
        pass


def test_numbers_json_cannot_hold_are_refused_both_ways(tmp_path):
    """1e999 reads as inf and inf writes as Infinity, which no reader accepts: a record with
    either is refused, naming the file, and nothing is written."""
    record = {"id": "a", "input": "abc", "steps": ["cba"], "program": [["prev", "reverse"]]}
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps(record)[:-1] + ', "source": {"x": 1e999}}\n')
    with pytest.raises(TraceFormatError, match=r"big\.jsonl:1: invalid JSON: the number 1e999 is out of the float64"):
        read_traces(path)
    trace = Trace(id="a", input="abc", steps=("cba",), program=(("prev", "reverse"),), source={"x": float("inf")})
    with pytest.raises(TraceFormatError, match=r"out\.jsonl: trace 1 \(id 'a'\) is invalid: it holds NaN"):
        write_traces(tmp_path / "out.jsonl", [trace])
    assert not (tmp_path / "out.jsonl").exists()


# --------------------------------------------------------------------------------------
# hidden steps: the reader accepts exactly the runs fit can enumerate
# --------------------------------------------------------------------------------------
def _hidden_record(steps, **extra):
    return json.dumps({"id": "h", "input": "abc", "program": [["prev", "reverse"]] * len(steps), "steps": steps,
                       **extra})


@pytest.mark.parametrize("steps, reason", [
    ([None, None, None, "cba"], "steps 1-3 are hidden; at most 2 consecutive hidden steps can precede an observed one"),
    (["cba", None, None, None, "abc"], "steps 2-4 are hidden; at most 2"),
])
def test_a_longer_run_of_hidden_steps_than_fit_enumerates_is_refused(tmp_path, steps, reason):
    path = _write_lines(tmp_path / "h.jsonl", [json.dumps(GOOD), _hidden_record(steps)])
    with pytest.raises(TraceFormatError) as info:
        read_traces(path)
    assert str(info.value).startswith(f"{path}:2: ") and reason in str(info.value)


@pytest.mark.parametrize("steps", [[None, None, "cba"], ["cba", None, None, None], [None] * 5,
                                   [None, None, "cba", None, None, "abc"]])
def test_hidden_runs_fit_can_enumerate_are_read(tmp_path, steps):
    (trace,) = read_traces(_write_lines(tmp_path / "h.jsonl", [_hidden_record(steps)]))
    assert trace.steps == steps


def test_a_malformed_completion_keeps_its_unreadable_steps(tmp_path):
    """The ``None`` steps of a malformed completion are failures, not hidden steps (failures.py):
    any number of them reads, so ``latentsel sample`` can always write what a policy produced."""
    line = _hidden_record([None, None, None, "cba"], malformed="step 1 holds a non-character token")
    (trace,) = read_traces(_write_lines(tmp_path / "m.jsonl", [line]))
    assert trace.steps[:3] == [None] * 3


def test_the_reader_accepts_exactly_the_hidden_steps_fit_accepts(tmp_path):
    """Every pattern of hidden steps up to depth 5: ``read_traces`` (validate) refuses a record iff
    ``build_data`` (fit) refuses the trace, with the same reason."""
    from itertools import product

    from latentsel.traces.emission import build_data
    from latentsel.world import World, default_world

    base = default_world()
    tiny = World(skills=[base.skills[base.skill_index("reverse")]], routes=[base.routes[base.route_index("prev")]],
                 alphabet="abc", max_len=4)
    for depth in range(1, 6):
        for mask in product([False, True], repeat=depth):
            steps = [None if hidden else "abc" for hidden in mask]
            path = _write_lines(tmp_path / "p.jsonl", [_hidden_record(steps)])
            try:
                read_traces(path, world=tiny)
                read_error = None
            except TraceFormatError as e:
                read_error = e.reason
            trace = Trace("h", "abc", [("prev", "reverse")] * depth, steps)
            try:
                build_data([trace], tiny)
                fit_error = None
            except ValueError as e:
                fit_error = str(e).removeprefix("trace 'h': ")
            assert read_error == fit_error, (steps, read_error, fit_error)


# --------------------------------------------------------------------------------------
# what a record echoes back is bounded
# --------------------------------------------------------------------------------------
BIG = "q" * 100_000


@pytest.mark.parametrize("lines", [
    [_bad(program=[[BIG], ["prev", "shift1"], ["longest", "evens"]])],
    [_bad(truth={"routes": [BIG] * 3, "skills": ["reverse"] * 3, "off": [False] * 3})],
    [_bad(id=[BIG])],
    [_bad(id=BIG)] * 2,
    [_bad(program=[[BIG, "reverse"], ["prev", "shift1"], ["longest", "evens"]])],
])
def test_an_echoed_value_is_cut_short(tmp_path, lines):
    path = _write_lines(tmp_path / "big.jsonl", lines)
    with pytest.raises(TraceFormatError) as info:
        read_traces(path)
    assert len(str(info.value)) < 600 and "qqq" in str(info.value)


def test_write_echoes_a_long_id_cut_short(tmp_path):
    trace = Trace(BIG, "abc", [("prev", "reverse")], ["NOT IN SIGMA"])
    with pytest.raises(TraceFormatError) as info:
        write_traces(tmp_path / "o.jsonl", [trace])
    assert len(str(info.value)) < 600


# --------------------------------------------------------------------------------------
# only regular files are read: a FIFO or a device would block or never end
# --------------------------------------------------------------------------------------
@pytest.fixture
def alarm():
    """Fail instead of hanging: SIGALRM after 5 s."""
    import signal

    def hung(signum, frame):
        raise TimeoutError("read_traces blocked on a file that is not a regular file")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_a_fifo_is_refused_without_blocking(tmp_path, alarm, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    with pytest.raises(TraceFormatError, match=f"{name}: not a regular file") as info:
        read_traces(fifo)
    assert info.value.path == str(fifo) and info.value.line is None


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_a_device_is_refused(alarm):
    with pytest.raises(TraceFormatError, match="/dev/null: not a regular file"):
        read_traces("/dev/null")


# --------------------------------------------------------------------------------------
# write then read gives the same traces
# --------------------------------------------------------------------------------------
_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=0, max_size=16)
_json_leaves = (st.none() | st.booleans() | st.integers(-2**53, 2**53)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
_json = st.recursive(_json_leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=8)


@st.composite
def _traces(draw):
    from latentsel.world import default_world

    world = default_world()
    n = draw(st.integers(1, 4))
    out = []
    for i in range(n):
        depth = draw(st.integers(1, 5))
        steps = draw(st.lists(st.none() | _NAMES, min_size=depth, max_size=depth))
        run = 0
        for t, y in enumerate(steps):  # at most 2 hidden steps before an observed one
            run = run + 1 if y is None else 0
            if run > 2:
                steps[t] = ""
                run = 0
        program = draw(st.none() | st.lists(st.tuples(st.sampled_from(world.route_names),
                                                       st.sampled_from(world.skill_names)),
                                             min_size=depth, max_size=depth))
        truth = draw(st.none() | st.builds(
            Truth, st.lists(st.sampled_from(world.route_names), min_size=depth, max_size=depth).map(tuple),
            st.lists(st.sampled_from(world.skill_names), min_size=depth, max_size=depth).map(tuple),
            st.lists(st.booleans(), min_size=depth, max_size=depth).map(tuple)))
        out.append(Trace(f"t{i}-" + draw(st.text(max_size=6)), draw(_NAMES), program, steps,
                         draw(st.none() | _NAMES), draw(st.dictionaries(st.text(max_size=5), _json, max_size=3)),
                         truth, draw(st.dictionaries(st.text(max_size=5).filter(lambda k: k not in (
                             "id", "input", "program", "steps", "answer", "source", "truth")), _json, max_size=2))))
    return out


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_traces(), st.sampled_from([".jsonl", ".jsonl.gz"]))
def test_write_then_read_gives_the_same_traces(tmp_path, traces, suffix):
    path = tmp_path / f"rt{suffix}"
    assert write_traces(path, traces) == len(traces)
    back = read_traces(path)
    assert [t.to_dict() for t in back] == [t.to_dict() for t in traces]
    assert back == traces
