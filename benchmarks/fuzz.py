"""Trace-file fuzzer: ``read_traces`` on mutated files accepts or raises TraceFormatError, nothing else.

Each input is a small valid trace file (1-4 records drawn from the prompt regimes, with hidden
steps, free programs, truth, answers and extra keys) put through one or two mutations:

* ``byte_flip``, ``truncate``: random bytes changed; the file cut anywhere;
* ``wrong_type``: a field, or an element of one, replaced by a value of another JSON type;
* ``number``: a field set to a huge, NaN, infinite or overlong number literal;
* ``unknown_name``: a routing or skill name made a near miss, a stranger, empty or 10^3-10^6 long;
* ``deep_nesting``: a field nested up to 10^5 levels deep, balanced or not;
* ``invalid_utf8``: an invalid UTF-8 sequence (stray byte, overlong form, surrogate) inserted;
* ``structure``: keys dropped, ids duplicated, steps of the wrong length, too many hidden steps,
  strings outside the alphabet or past ``max_len``, a ``malformed`` field;
* ``lines``: CRLF endings, a BOM, NUL bytes, blank, joined, duplicated or very long lines;
* ``gzip``: a ``.gz`` file with a flipped header, body or checksum byte, cut short, with garbage
  or a second member after it, or not gzip at all.

Every input runs in a worker process under a per-input time limit (``--timeout``): an input
that runs past it is a *hang*, and the worker is replaced. Outcomes: ``accepted`` (the traces
must also write and read back the same), ``TraceFormatError`` counted by reason class (its
message must be one line, at most ``--max-message`` characters), and any other exception, a
hang, a failed round trip or an overlong message, each a *bug*. Inputs are reproducible:
input ``i`` depends on ``(--seed, i)`` only. Prints a table and writes JSON; the exit status is
1 when there is a bug.

    nice python benchmarks/fuzz.py --n 100000 --seed 0
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import multiprocessing as mp
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from multiprocessing.connection import wait
from pathlib import Path

from _results import write_results

from latentsel.traces import TraceFormatError, read_traces, write_traces
from latentsel.traces.regimes import generate
from latentsel.world import default_world

WORLD = default_world()

# reason classes of TraceFormatError, first match wins (the reason, not the file:line prefix)
REASONS = [
    ("json-nesting", r"nested too deeply"),
    ("json-number", r"out of the float64 range|Exceeds the limit|integer string conversion"),
    ("json-constant", r"is not valid JSON"),
    ("json-syntax", r"^invalid JSON"),
    ("utf8", r"^not valid UTF-8"),
    ("file-unreadable", r"^cannot read"),
    ("not-object", r"must be a JSON object"),
    ("missing-key", r"^missing key|is missing"),
    ("hidden-run", r"are hidden; at most"),
    ("duplicate-id", r"^duplicate id"),
    ("length-mismatch", r"has length \d+ but|must be a list of \d+"),
    ("unknown-name", r"unknown (routing|skill|name)"),
    ("alphabet", r"outside the alphabet"),
    ("too-long", r"> max_len"),
    ("program-pair", r"must be a \[routing, skill\] pair"),
    ("wrong-type", r"must be|got "),
]
_REASONS = [(name, re.compile(pattern)) for name, pattern in REASONS]


def reason_class(reason: str) -> str:
    for name, pattern in _REASONS:
        if pattern.search(reason):
            return name
    return "other"


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
def base_records() -> list[dict]:
    """Valid records of every shape the format allows."""
    traces = generate("sft", 30, seed=1) + generate("eval-ood", 20, seed=2) + generate("rl-atomic", 10, seed=3)
    out = [t.to_dict() for t in traces]
    for i, rec in enumerate(out):
        if i % 4 == 1 and len(rec["steps"]) >= 2:
            rec["steps"][i % (len(rec["steps"]) - 1)] = None  # a hidden step
        if i % 5 == 2:
            rec["program"] = None  # a free trace: only the grammar model applies
        if i % 6 == 3:
            rec["answer"] = rec["steps"][-1] or ""
        if i % 7 == 4:
            rec["malformed"] = "no end token"
            rec["steps"][0] = None
        if i % 3 == 0:
            rec["source"] = {"kind": "policy", "seed": i, "temperature": 0.5, "nested": {"a": [1, None, True]}}
    return out


NUM_TOKENS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "1" * 5000, "-" + "9" * 4301,
              "0." + "1" * 10000, "1e308", "2e308", "-0", "-0.0", "4.9e-324", "123456789012345678901234567890",
              "1E400", "01", "1.", ".5", "+1", "0x10", "1_000"]
BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
            b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xc3\x28", b"\xe2\x82"]
OTHER_VALUES = [None, True, False, 0, -1, 7, 1.5, "", "x", "abc", [], {}, [[]], [None], {"a": 1}, ["prev", "reverse"],
                [["prev", "reverse"]], "prev", 1e300]
PLACEHOLDER = "\u0000FUZZ\u0000"


def _paths(rec: dict) -> list[tuple]:
    """Every place a value can be swapped: top-level keys and the elements inside them."""
    out = [(k,) for k in rec]
    for k in ("steps", "program"):
        if isinstance(rec.get(k), list):
            out += [(k, i) for i in range(len(rec[k]))]
    if isinstance(rec.get("program"), list):
        out += [("program", i, j) for i, p in enumerate(rec["program"]) if isinstance(p, list) for j in range(len(p))]
    if isinstance(rec.get("truth"), dict):
        out += [("truth", k) for k in rec["truth"]]
        out += [("truth", k, i) for k in ("routes", "skills", "off") if isinstance(rec["truth"].get(k), list)
                for i in range(len(rec["truth"][k]))]
    if isinstance(rec.get("source"), dict):
        out += [("source", k) for k in rec["source"]]
    return out


def _set(rec: dict, path: tuple, value) -> None:
    target = rec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _name_paths(rec: dict) -> list[tuple]:
    out = []
    if isinstance(rec.get("program"), list):
        out += [("program", i, j) for i in range(len(rec["program"])) for j in range(2)]
    if isinstance(rec.get("truth"), dict):
        out += [("truth", k, i) for k in ("routes", "skills") for i in range(len(rec["truth"][k]))]
    return out


def m_wrong_type(rng, recs):
    rec = rng.choice(recs)
    path = rng.choice(_paths(rec))
    _set(rec, path, copy.deepcopy(rng.choice(OTHER_VALUES)))
    return recs, {}


def m_number(rng, recs):
    rec = rng.choice(recs)
    paths = _paths(rec) + [("extra_number",)] + ([("source", "x")] if isinstance(rec.get("source"), dict) else [])
    _set(rec, rng.choice(paths), PLACEHOLDER)
    return recs, {"raw": rng.choice(NUM_TOKENS)}


def m_unknown_name(rng, recs):
    rec = rng.choice(recs)
    paths = _name_paths(rec)
    if not paths:
        rec["program"] = [["prev", "reverse"]] * len(rec["steps"])
        paths = _name_paths(rec)
    path = rng.choice(paths)
    names = WORLD.route_names + WORLD.skill_names
    base = rng.choice(names)
    kind = rng.randrange(8)
    name = [base[:-1], base.upper(), base + "_", "".join(rng.choice("abcxyz_") for _ in range(rng.randint(1, 12))),
            "", "q" * 10 ** rng.randint(3, 6), "rëvérse\u200b", base + "\x00"][kind]
    _set(rec, path, name)
    return recs, {}


def m_deep_nesting(rng, recs):
    rec = rng.choice(recs)
    path = rng.choice(_paths(rec) + [("deep",)])
    _set(rec, path, PLACEHOLDER)
    depth = rng.choice([10, 100, 500, 999, 1000, 3000, 10_000, 100_000])
    opener, closer, inner = rng.choice([("[", "]", "1"), ('{"a": ', "}", "null"), ("[[", "]]", "[]")])
    raw = opener * depth + inner + closer * (depth if rng.random() < 0.7 else rng.randrange(depth))
    return recs, {"raw": raw}


def m_structure(rng, recs):
    rec = rng.choice(recs)
    kind = rng.randrange(10)
    if kind == 0 and len(rec) > 1:
        del rec[rng.choice(list(rec))]
    elif kind == 1 and len(recs) > 1:
        recs[-1]["id"] = recs[0]["id"]
    elif kind == 2:
        rec["steps"] = rec["steps"] + ["abc"] if rng.random() < 0.5 else rec["steps"][:-1]
    elif kind == 3:
        n = len(rec["steps"]) + rng.randint(1, 3)
        rec["steps"] = [None] * (n - 1) + ["abc"]
        if rec.get("program") is not None:
            rec["program"] = [["prev", "reverse"]] * n
        rec.pop("truth", None)
    elif kind == 4:
        rec["input"] = rng.choice(["ABC", "a b", "ä", "\x00", "a\n", "abc\u2028", "12"])
    elif kind == 5:
        rec["steps"][rng.randrange(len(rec["steps"]))] = "a" * rng.choice([17, 100, 10 ** 6])
    elif kind == 6:
        rec["malformed"] = rng.choice([None, "x", 3, ["a"], "1 of 9 steps"])
    elif kind == 7:
        rec["steps"] = []
        rec["program"] = []
    elif kind == 8:
        rec["id"] = rng.choice(["", " ", "x" * 10 ** 5, "é", "\x00"])
    else:
        rec["truth"] = {"routes": ["prev"], "skills": ["reverse"], "off": [rng.choice([0, 1, None, "no"])]}
    return recs, {}


RECORD_MUTATORS = {"wrong_type": m_wrong_type, "number": m_number, "unknown_name": m_unknown_name,
                   "deep_nesting": m_deep_nesting, "structure": m_structure}


def b_byte_flip(rng, data: bytes) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        buf[rng.randrange(len(buf))] ^= rng.randint(1, 255)
    return bytes(buf)


def b_truncate(rng, data: bytes) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def b_invalid_utf8(rng, data: bytes) -> bytes:
    quotes = [m.start() + 1 for m in re.finditer(b'"', data)] or [0]
    at = rng.choice(quotes) if rng.random() < 0.7 else rng.randrange(len(data) + 1)
    return data[:at] + rng.choice(BAD_UTF8) + data[at:]


def b_lines(rng, data: bytes) -> bytes:
    lines = data.split(b"\n")
    kind = rng.randrange(7)
    if kind == 0:
        return data.replace(b"\n", b"\r\n")
    if kind == 1:
        return b"\xef\xbb\xbf" + data
    if kind == 2:
        at = rng.randrange(len(data) + 1)
        return data[:at] + b"\x00" * rng.randint(1, 4) + data[at:]
    if kind == 3:
        lines.insert(rng.randrange(len(lines) + 1), rng.choice([b"", b"   ", b"\t", b"\r", b"\x0c", b"\xc2\xa0"]))
    elif kind == 4 and len(lines) > 1:
        i = rng.randrange(len(lines) - 1)
        lines[i: i + 2] = [lines[i] + lines[i + 1]]
    elif kind == 5:
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(lines))
    else:
        lines.insert(rng.randrange(len(lines) + 1), b'{"id": "' + b"z" * 10 ** rng.randint(4, 6) + b'"}')
    return b"\n".join(lines)


BYTE_MUTATORS = {"byte_flip": b_byte_flip, "truncate": b_truncate, "invalid_utf8": b_invalid_utf8, "lines": b_lines}


def g_gzip(rng, data: bytes) -> bytes:
    gz = bytearray(gzip.compress(data, mtime=0))
    kind = rng.randrange(8)
    if kind == 0:  # header
        gz[rng.randrange(min(10, len(gz)))] ^= rng.randint(1, 255)
    elif kind == 1:  # deflate stream
        gz[rng.randrange(10, max(11, len(gz) - 8))] ^= rng.randint(1, 255)
    elif kind == 2:  # CRC32 or size
        gz[rng.randrange(len(gz) - 8, len(gz))] ^= rng.randint(1, 255)
    elif kind == 3:
        gz = gz[: rng.randrange(len(gz))]
    elif kind == 4:
        gz += bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
    elif kind == 5:  # a second member: valid gzip, read as one stream
        gz += gzip.compress(data, mtime=0)
    elif kind == 6:
        return data  # not gzip at all
    else:
        return gzip.compress(b"", mtime=0)
    return bytes(gz)


def make_input(seed: int, i: int, base: list[dict]) -> tuple[str, bytes, str]:
    """Input ``i``: ``(label, file bytes, suffix)``; depends on ``(seed, i)`` only."""
    rng = random.Random(f"{seed}-{i}")
    recs = copy.deepcopy(rng.sample(base, rng.randint(1, 4)))
    kinds = ["valid"] if rng.random() < 0.02 else rng.sample(
        list(RECORD_MUTATORS) + list(BYTE_MUTATORS) + ["gzip"], rng.choice([1, 1, 2]))
    raws = []
    for kind in kinds:
        if kind in RECORD_MUTATORS:
            try:
                recs, info = RECORD_MUTATORS[kind](rng, recs)
            except (TypeError, KeyError, IndexError, AttributeError, ValueError):
                continue  # a first mutation left no place for the second: the input keeps the first
            if "raw" in info:
                raws.append(info["raw"])
    text = "".join(json.dumps(r, ensure_ascii=rng.random() < 0.5) + "\n" for r in recs)
    for raw in raws:  # literal JSON no encoder writes (NaN, 1e999, 10^4 digits, 10^5 brackets)
        text = text.replace(json.dumps(PLACEHOLDER), raw, 1)  # control characters are escaped either way
    data = text.encode("utf-8", "surrogatepass")
    for kind in kinds:
        if kind in BYTE_MUTATORS:
            data = BYTE_MUTATORS[kind](rng, data)
    gz = "gzip" in kinds or rng.random() < 0.1
    if "gzip" in kinds:
        data = g_gzip(rng, data)
    elif gz:
        data = gzip.compress(data, mtime=0)
    return "+".join(sorted(kinds)), data, ".jsonl.gz" if gz else ".jsonl"


# --------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------
def run_one(path: Path, max_message: int) -> tuple[str, str, str]:
    """``(outcome, class, detail)`` of reading one file: outcome ``accepted``, ``rejected`` or ``bug``."""
    try:
        traces = read_traces(path)
    except TraceFormatError as e:
        message = str(e)
        if len(message) > max_message or "\n" in message:
            return "bug", "error-message", f"{len(message)} characters, {message.count(chr(10)) + 1} lines"
        return "rejected", reason_class(e.reason), e.reason[:120]
    except Exception as e:  # noqa: BLE001 - anything else is what the fuzzer looks for
        return "bug", type(e).__name__, str(e)[:200]
    back_path = path.with_name("back" + "".join(path.suffixes))
    try:
        write_traces(back_path, traces)
        back = read_traces(back_path)
    except Exception as e:  # noqa: BLE001 - an accepted file must write and read back
        return "bug", "round-trip", f"{type(e).__name__}: {str(e)[:200]}"
    if [t.to_dict() for t in back] != [t.to_dict() for t in traces]:
        return "bug", "round-trip", "read back different traces"
    return "accepted", f"{len(traces)} traces", ""


def worker(conn, seed: int, tmp: str, max_message: int, memory_gb: float) -> None:
    try:
        import resource

        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    base = base_records()
    folder = Path(tempfile.mkdtemp(dir=tmp))
    conn.send("ready")  # the time limit starts with the first input, not with this set-up
    while True:
        i = conn.recv()
        if i is None:
            return
        label, data, suffix = make_input(seed, i, base)
        path = folder / f"in{suffix}"
        path.write_bytes(data)
        t0 = time.perf_counter()
        try:
            outcome, cls, detail = run_one(path, max_message)
        except MemoryError:
            outcome, cls, detail = "bug", "MemoryError", "past the worker's memory limit"
        conn.send((i, label, len(data), outcome, cls, detail, time.perf_counter() - t0))


class Pool:
    """Worker processes, one input each at a time; one past the time limit is killed and replaced."""

    def __init__(self, args, tmp):
        self.args, self.tmp = args, tmp
        self.ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.slots = [self._start() for _ in range(args.jobs)]

    def _start(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker, args=(child, self.args.seed, self.tmp, self.args.max_message,
                                                     self.args.memory_gb), daemon=True)
        proc.start()
        child.close()
        parent.recv()
        return {"proc": proc, "conn": parent, "i": None, "t0": 0.0}

    def replace(self, k):
        self.slots[k]["proc"].kill()
        self.slots[k]["proc"].join()
        self.slots[k]["conn"].close()
        self.slots[k] = self._start()

    def close(self):
        for slot in self.slots:
            try:
                slot["conn"].send(None)
            except OSError:
                pass
            slot["proc"].join(timeout=5)
            if slot["proc"].is_alive():
                slot["proc"].kill()


def fuzz(args) -> dict:
    base = base_records()
    outcomes, reasons, bugs, by_mutation = Counter(), Counter(), [], defaultdict(Counter)
    examples: dict[str, str] = {}
    slowest: list[tuple[float, int, str]] = []
    total_s, done = 0.0, 0
    pending = iter(range(args.n))
    tmp = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=tmp) as folder:
        pool = Pool(args, folder)
        t_start = time.perf_counter()

        def feed(k):
            i = next(pending, None)
            slot = pool.slots[k]
            slot["i"], slot["t0"] = i, time.perf_counter()
            if i is not None:
                slot["conn"].send(i)

        def record(i, label, size, outcome, cls, detail, seconds):
            nonlocal total_s, done
            done += 1
            total_s += seconds
            outcomes[outcome] += 1
            for kind in label.split("+"):
                by_mutation[kind][outcome] += 1
            if outcome == "rejected":
                reasons[cls] += 1
                examples.setdefault(cls, detail)
            elif outcome == "bug":
                reasons[f"BUG {cls}"] += 1
                if len(bugs) < args.keep_bugs:
                    bugs.append({"input": i, "mutation": label, "bytes": size, "class": cls, "detail": detail})
            slowest.append((seconds, i, label))
            if len(slowest) > 50:
                slowest.sort(reverse=True)
                del slowest[10:]
            if args.progress and done % max(1, args.n // 10) == 0:
                print(f"  {done}/{args.n} inputs, {time.perf_counter() - t_start:.0f} s, "
                      f"{outcomes['bug']} bugs", file=sys.stderr, flush=True)

        for k in range(len(pool.slots)):
            feed(k)
        while any(slot["i"] is not None for slot in pool.slots):
            busy = {slot["conn"]: k for k, slot in enumerate(pool.slots) if slot["i"] is not None}
            for conn in wait(list(busy), timeout=0.2):
                k = busy[conn]
                try:
                    result = conn.recv()
                except (EOFError, OSError):  # the worker died (killed for memory, a crash in C)
                    i = pool.slots[k]["i"]
                    label = make_input(args.seed, i, base)[0]
                    record(i, label, 0, "bug", "worker-died", f"exit code {pool.slots[k]['proc'].exitcode}", 0.0)
                    pool.replace(k)
                    feed(k)
                    continue
                record(*result)
                feed(k)
            now = time.perf_counter()
            for k, slot in enumerate(pool.slots):
                if slot["i"] is not None and now - slot["t0"] > args.timeout:
                    i = slot["i"]
                    label, data, _ = make_input(args.seed, i, base)
                    record(i, label, len(data), "bug", "hang", f"still running after {args.timeout} s", args.timeout)
                    pool.replace(k)
                    feed(k)
        wall = time.perf_counter() - t_start
        pool.close()
    slowest.sort(reverse=True)
    return {"benchmark": "fuzz", "n": args.n, "seed": args.seed, "jobs": args.jobs, "timeout_s": args.timeout,
            "wall_s": wall, "inputs_per_s": args.n / wall, "mean_read_ms": 1e3 * total_s / max(done, 1),
            "outcomes": {k: outcomes[k] for k in ("accepted", "rejected", "bug")},
            "reasons": dict(reasons.most_common()), "reason_examples": examples,
            "by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())},
            "bugs": bugs, "slowest": [{"seconds": s, "input": i, "mutation": m} for s, i, m in slowest[:10]]}


def print_table(result: dict) -> None:
    o = result["outcomes"]
    slowest = result["slowest"][0]["seconds"] if result["slowest"] else 0.0
    print(f"{result['n']} inputs (seed {result['seed']}) in {result['wall_s']:.0f} s, {result['inputs_per_s']:.0f}/s "
          f"with {result['jobs']} worker(s); mean read {result['mean_read_ms']:.2f} ms, slowest {slowest:.2f} s")
    print(f"accepted {o['accepted']}, TraceFormatError {o['rejected']}, bugs {o['bug']}")
    print()
    print(f"{'outcome class':<28} {'inputs':>8}  example")
    for cls, count in result["reasons"].items():
        print(f"{cls:<28} {count:>8}  {result['reason_examples'].get(cls, '')[:70]}")
    print()
    print(f"{'mutation':<16} {'accepted':>9} {'rejected':>9} {'bug':>5}   (an input of two counts in both rows)")
    for kind, c in result["by_mutation"].items():
        print(f"{kind:<16} {c.get('accepted', 0):>9} {c.get('rejected', 0):>9} {c.get('bug', 0):>5}")
    for bug in result["bugs"][:10]:
        print(f"BUG input {bug['input']} ({bug['mutation']}, {bug['bytes']} bytes): {bug['class']}: {bug['detail']}")


def main(args):
    result = fuzz(args)
    print_table(result)
    write_results(args.json, result)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="inputs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds an input may take before it is a hang")
    parser.add_argument("--max-message", type=int, default=1000, help="longest acceptable error message")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="address-space limit of each worker")
    parser.add_argument("--keep-bugs", type=int, default=50, help="bug examples kept in the JSON")
    parser.add_argument("--progress", action="store_true", help="a line on stderr every tenth of the run")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "fuzz.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(1 if main(parse_args())["outcomes"]["bug"] else 0)
