"""Every writer of the package under faults: killed at random points, and on a full file system.

A writer killed mid-write leaves its target absent (when no write had finished) or holding one
complete version, never a mix or a truncated file; the files of a set (a fit's) load as one
version or are refused. A write that runs out of space raises an OSError naming its target,
keeps the previous version and leaves no temporary file. The stale temporary files of killed
writers go with the next write of their target.
"""
import dataclasses
import datetime
import errno
import gzip
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from latentsel._io import LOCK_NAME

SEED = 20261126
FAST_KILLS = 4  # kills per writer in the default run
SLOW_KILLS = 50  # ... and in the slow sweep
PNG = b"\x89PNG\r\n\x1a\n"
PAGE = 4096


# --- killing a writer ---------------------------------------------------------------------------

def _fork(body) -> int:
    """A child process running ``body()``, then ending with ``os._exit`` (0, or 1 if it raised)."""
    with warnings.catch_warnings():
        # the parent runs JAX and torch threads, of which Python and JAX warn at a fork; the
        # child only writes files, with neither
        warnings.filterwarnings("ignore", r"[\s\S]*fork\(\)", DeprecationWarning)
        warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def _temp_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*.tmp"))


def kill_at_random(write, versions, check, *, rng: random.Random, kills: int, max_delay: float, log: Path) -> list:
    """``kills`` times: fork a child that calls ``write(version)`` in a loop, alternating between
    the two ``versions`` (starting with each in turn), SIGKILL it after a random delay in
    ``[0, max_delay)`` seconds and call ``check(finished)``, ``finished``: whether a write of any
    child so far finished. Returns what the checks returned."""
    finished, seen = False, []
    for i in range(kills):
        r, w = os.pipe()

        def loop(first=i % 2, r=r, w=w):
            os.close(r)
            try:
                k, told = first, False
                while True:
                    write(versions[k % 2])
                    k += 1
                    if not told:  # one write of this child finished
                        os.write(w, b"x")
                        told = True
            except BaseException:
                log.write_text(traceback.format_exc())
                raise

        pid = _fork(loop)
        os.close(w)
        time.sleep(rng.uniform(0, max_delay))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        with open(r, "rb") as pipe:  # its write end closed with the child
            finished |= pipe.read() == b"x"
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"the writer ended by itself (status {status}):\n{log.read_text() if log.exists() else ''}"
        seen.append(check(finished))
    return seen


def _delay(write, version) -> float:
    """A kill delay bound that lands kills before, in and after the first few writes: the time of
    one write (made here, which also loads whatever it needs before the forks), times 2.5."""
    t = time.perf_counter()
    write(version)
    return max(0.05, 2.5 * (time.perf_counter() - t))


def check_one(target: Path, refs: dict, read, content=lambda data: data):
    """``target`` absent (no write finished) or exactly one version's bytes in ``refs`` (compared
    as ``content(bytes)``), which ``read(target, name)`` reads back with the package's reader.
    Returns the name, or None."""
    refs = {name: content(ref) for name, ref in refs.items()}

    def check(finished):
        if not target.exists():
            assert not finished, f"{target} is gone although a write had finished"
            return None
        raw = target.read_bytes()
        try:
            data = content(raw)
        except (OSError, EOFError) as e:
            raise AssertionError(f"{target}: {len(raw)} bytes, not a whole file ({e})") from None
        names = [name for name, ref in refs.items() if data == ref]
        assert names, (f"{target}: {len(data)} bytes, neither version "
                       f"({', '.join(f'{n}: {len(r)} bytes' for n, r in refs.items())})")
        read(target, names[0])
        return names[0]

    return check


# --- the versions written -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def traces_ab(world):
    from latentsel.models.registry import default_params
    from latentsel.traces.regimes import generate
    from latentsel.traces.simulate import simulate

    return [simulate(generate("eval-seen", 40, seed=seed, world=world),
                     default_params("modular", world, fidelity=fidelity), "modular", world, seed=seed + 10)
            for seed, fidelity in ((1, 0.8), (2, 0.6))]


@pytest.fixture(scope="module")
def fits_ab(traces_ab):
    """Two EM fits of different traces (same shapes: one compilation)."""
    import latentsel as ls

    return [ls.fit(traces, "modular", "em", max_iter=15, progress=False) for traces in traces_ab]


def _nuts_shaped(fit, seed: int):
    """``fit`` as a nuts fit would be saved: with draws (``[1 chain, 3 draws, ...]``), so that the
    set has a third file, samples.npz."""
    from latentsel.analysis.options import NUTSOptions

    rng = np.random.default_rng(seed)
    draws = fit.params.__class__(*(np.asarray(p) * rng.uniform(0.9, 1.1, size=(1, 3, *np.shape(p)))
                                   for p in fit.params))
    return fit._replace(options=NUTSOptions(warmup=2, samples=3, chains=1), draws=draws, conjugate=None,
                        summary={"divergences": 0}, result=None)


def _fit_state(fit) -> str:
    """Everything :func:`load_fit` gives back of a fit, as one JSON text."""
    record = {k: v for k, v in fit.record().items() if k != "files"}
    post = {name: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else list(v))
            for name, v in fit.posterior._asdict().items()}
    draws = None if fit.draws is None else [np.asarray(d).tolist() for d in fit.draws]
    return json.dumps({"record": record, "posterior": post, "draws": draws}, sort_keys=True)


def _figure(seed: int, size: float = 3.0, n: int = 60):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size, 0.75 * size))
    ax = fig.subplots()
    ax.imshow(np.random.default_rng(seed).uniform(size=(n, n)))  # noise: a PNG that hardly compresses
    ax.set_title(f"version {seed}")
    return fig


def _table(seed: int, rows: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"caption": f"table {seed}", "columns": ["regime", "N", "accuracy"],
            "rows": [[f"r{seed}-{i}", int(i), float(x)] for i, x in enumerate(rng.uniform(size=rows))]}


@pytest.fixture(scope="module")
def torch_one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoints_ab(torch_one_thread):
    """The arguments of two checkpoints: other weights, optimizer state and step."""
    torch = torch_one_thread
    from latentsel.policy.model import GPT, GPTConfig
    from latentsel.policy.tokenizer import Tokenizer
    from latentsel.world import default_world

    tok = Tokenizer.from_world(default_world())
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(tok.vocab_size, tok.block_size(4), n_layer=2, n_head=2, n_embd=32))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        versions.append(dict(model=model, tokenizer=tok, step=3 + seed, policy=f"sft-{seed}",
                             train_config={"seed": seed}, optimizer=opt))
    return versions


# --- one test per writer ------------------------------------------------------------------------

def _kills(request) -> int:
    return SLOW_KILLS if request.node.get_closest_marker("slow") else FAST_KILLS


def _rng(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")


def _traces_killed(tmp_path, traces_ab, world, suffix, kills):
    from latentsel.traces import read_traces, write_traces

    refs = {}
    for name, traces in zip("AB", traces_ab):
        write_traces(tmp_path / f"ref-{name}.{suffix}", traces)
        refs[name] = (tmp_path / f"ref-{name}.{suffix}").read_bytes()
    assert refs["A"] != refs["B"]
    expected = {name: [tr.to_dict() for tr in traces] for name, traces in zip("AB", traces_ab)}
    target = tmp_path / "out" / f"traces.{suffix}"

    def read(path, name):
        assert [tr.to_dict() for tr in read_traces(path, world=world)] == expected[name]

    def write(traces):
        write_traces(target, traces, world=world)

    delay = _delay(lambda v: write_traces(tmp_path / "warm.jsonl", v), traces_ab[0])
    # a .gz file's bytes differ from write to write (see test_a_gz_file_written_twice_is_the_same_bytes):
    # its content is compared, every byte of it decompressed
    content = gzip.decompress if suffix.endswith(".gz") else (lambda data: data)
    seen = kill_at_random(write, traces_ab, check_one(target, refs, read, content), rng=_rng(f"traces-{suffix}"),
                          kills=kills, max_delay=delay, log=tmp_path / "child.log")
    write(traces_ab[1])
    assert _temp_files(target.parent) == [] and content(target.read_bytes()) == content(refs["B"])
    return seen


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz"])
def test_write_traces_killed_at_random_leaves_one_whole_version(tmp_path, traces_ab, world, suffix, request):
    _traces_killed(tmp_path, traces_ab, world, suffix, _kills(request))


def _fit_killed(tmp_path, versions, kills, name):
    from latentsel.analysis.results import load_fit

    expected = []
    for i, fit in enumerate(versions):
        fit.save(tmp_path / f"ref-{i}")
        expected.append(_fit_state(load_fit(tmp_path / f"ref-{i}")))
    assert expected[0] != expected[1] and expected[0] == _fit_state(versions[0])
    out = tmp_path / "out"
    refused = re.compile(rf"^{re.escape(str(out))}: (posterior\.jsonl|samples\.npz) (does not belong to fit\.json: "
                         r"written by another run, or the run was killed|is missing beside fit\.json: the run was "
                         r"killed, or the file removed)$")

    def check(finished):
        if not (out / "fit.json").exists():
            assert not finished, "fit.json is gone although a save had finished"
            return None
        try:
            loaded = load_fit(out)
        except ValueError as e:  # killed between the files of the set: refused, never mixed
            assert refused.match(str(e)), str(e)
            return "refused"
        state = _fit_state(loaded)
        assert state in expected, "load_fit returned neither fit"
        return "AB"[expected.index(state)]

    delay = _delay(lambda v: v.save(tmp_path / "warm"), versions[0])
    seen = kill_at_random(lambda fit: fit.save(out), versions, check, rng=_rng(name), kills=kills,
                          max_delay=delay, log=tmp_path / "child.log")
    versions[-1].save(out)  # the last version writes every file of the set, so it sweeps them all
    assert _temp_files(out) == [] and _fit_state(load_fit(out)) == expected[-1]
    return seen


def test_fit_save_killed_at_random_loads_one_fit_or_is_refused(tmp_path, fits_ab, request):
    _fit_killed(tmp_path, fits_ab, _kills(request), "fit")


def test_fit_save_killed_between_an_em_and_a_nuts_fit_loads_one_or_is_refused(tmp_path, fits_ab, request):
    """The set changes shape between the versions: samples.npz is written by one and removed by
    the other."""
    _fit_killed(tmp_path, [fits_ab[0], _nuts_shaped(fits_ab[1], 1)], _kills(request), "fit-nuts")


@pytest.fixture(scope="module")
def figures_ab():
    return [_figure(1), _figure(2)]


def test_save_figure_killed_at_random_leaves_one_whole_png(tmp_path, figures_ab, request):
    from latentsel.plots import save_figure

    refs = {}
    for name, fig in zip("AB", figures_ab):
        refs[name] = save_figure(fig, tmp_path / f"ref-{name}.png").read_bytes()
        assert save_figure(fig, tmp_path / "again.png").read_bytes() == refs[name]  # a figure renders the same
    assert refs["A"] != refs["B"]
    target = tmp_path / "out" / "figure.png"

    def read(path, name):
        data = path.read_bytes()
        assert data.startswith(PNG) and data.endswith(b"IEND\xaeB`\x82")

    delay = _delay(lambda f: save_figure(f, tmp_path / "warm.png"), figures_ab[0])
    kill_at_random(lambda fig: save_figure(fig, target), figures_ab, check_one(target, refs, read),
                   rng=_rng("figure"), kills=_kills(request), max_delay=delay, log=tmp_path / "child.log")
    save_figure(figures_ab[0], target)
    assert _temp_files(target.parent) == [] and target.read_bytes() == refs["A"]


def test_write_section_killed_at_random_leaves_one_whole_section(tmp_path, request):
    from latentsel.plots import report
    from latentsel.plots.report import write_section

    folder = tmp_path / "run"
    (folder / "figures").mkdir(parents=True)
    (folder / "figures" / "f.png").write_bytes(PNG + b"\x00" * 64)
    (folder / "identify.json").write_text("{}")
    versions = [dict(title=f"version {name}", order=order, text=[f"paragraph of {name}"] * 3,
                     figures=[{"file": "figures/f.png", "caption": f"caption {name}"}],
                     tables=[_table(order, 1500)], files=["identify.json"])
                for name, order in (("A", 1), ("B", 2))]
    # the references are written in place: their figure and file are the folder's
    refs = {name: write_section(folder, **version).read_bytes() for name, version in zip("AB", versions)}
    assert refs["A"] != refs["B"]
    target = folder / report.SECTION_FILE

    def read(path, name):
        manifest = report._read_section(path)  # what write_report reads: checked, figures and files too
        assert manifest["title"] == f"version {name}"

    delay = _delay(lambda v: write_section(folder, **v), versions[0])
    target.unlink()
    kill_at_random(lambda v: write_section(folder, **v), versions, check_one(target, refs, read),
                   rng=_rng("section"), kills=_kills(request), max_delay=delay, log=tmp_path / "child.log")
    write_section(folder, **versions[1])
    assert _temp_files(folder) == [] and target.read_bytes() == refs["B"]


def test_write_report_killed_at_random_leaves_one_whole_page(tmp_path, figures_ab, monkeypatch, request):
    from latentsel.plots import report, save_figure
    from latentsel.plots.report import write_report, write_section

    # a fixed clock: a page is then the same bytes every time it is written
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    clock = SimpleNamespace(datetime=SimpleNamespace(now=lambda tz=None: when), timezone=datetime.timezone)
    monkeypatch.setattr(report, "datetime", clock)
    runs = []
    for name, fig in zip("AB", figures_ab):
        run = tmp_path / f"run-{name}"
        save_figure(fig, run / "fig.png")
        write_section(run, f"run {name}", figures=[{"file": "fig.png", "caption": name}], tables=[_table(ord(name), 300)])
        runs.append(run)
    refs = {name: write_report(run, out=tmp_path / f"ref-{name}.html").read_bytes() for name, run in zip("AB", runs)}
    assert refs["A"] != refs["B"] and all(r == write_report(run, out=tmp_path / "again.html").read_bytes()
                                          for r, run in zip(refs.values(), runs))
    target = tmp_path / "out" / "report.html"

    def read(path, name):
        page = path.read_text(encoding="utf-8")
        assert page.rstrip().endswith("</html>") and f"run {name}" in page

    delay = _delay(lambda run: write_report(run, out=tmp_path / "warm.html"), runs[0])
    kill_at_random(lambda run: write_report(run, out=target), runs, check_one(target, refs, read),
                   rng=_rng("report"), kills=_kills(request), max_delay=delay, log=tmp_path / "child.log")
    write_report(runs[0], out=target)
    assert _temp_files(target.parent) == [] and target.read_bytes() == refs["A"]


def test_sweep_task_files_killed_at_random_hold_one_whole_result(tmp_path, request):
    from latentsel.experiments import sweeps

    task = sweeps.Task("sft-100-0-0123456789abcdef", len, ("sft", 100, 0))
    rng = np.random.default_rng(0)
    results = [{"records": [{"model": name, "n": i, "accuracy": x} for i, x in enumerate(rng.uniform(size=3000))],
                "array": rng.uniform(size=500)} for name in ("A", "B")]
    refs, expected = {}, {}
    for name, result in zip("AB", results):
        expected[name] = sweeps._save(tmp_path / f"ref-{name}", task, result)
        refs[name] = (tmp_path / f"ref-{name}" / f"{task.name}.json").read_bytes()
    tasks_dir = tmp_path / "tasks"
    target = tasks_dir / f"{task.name}.json"

    def read(path, name):
        assert sweeps._load(tasks_dir, task) == expected[name] and sweeps.done_tasks([task], tasks_dir) == 1

    def check(finished):
        name = check_one(target, refs, read)(finished)
        if name is None:
            assert sweeps._load(tasks_dir, task) is None
        return name

    delay = _delay(lambda r: sweeps._save(tmp_path / "warm", task, r), results[0])
    kill_at_random(lambda r: sweeps._save(tasks_dir, task, r), results, check, rng=_rng("sweep"),
                   kills=_kills(request), max_delay=delay, log=tmp_path / "child.log")
    sweeps._save(tasks_dir, task, results[1])
    assert _temp_files(tasks_dir) == [] and target.read_bytes() == refs["B"]


@pytest.mark.slow  # torch's import and a model build, about 11 s; the slow sweep kills it 50 times too
def test_checkpoint_killed_at_random_leaves_one_loadable_checkpoint(tmp_path, checkpoints_ab, request):
    torch = pytest.importorskip("torch")
    from latentsel.policy.checkpoint import load_checkpoint, save_checkpoint

    refs = {}
    for name, version in zip("AB", checkpoints_ab):
        save_checkpoint(tmp_path / f"ref-{name}.pt", **version)
        refs[name] = (tmp_path / f"ref-{name}.pt").read_bytes()
    assert refs["A"] != refs["B"]
    target = tmp_path / "run" / "checkpoint.pt"

    def read(path, name):
        version = checkpoints_ab["AB".index(name)]
        state = load_checkpoint(path)  # torch.load(weights_only=True)
        assert state["step"] == version["step"] and state["policy"] == version["policy"]
        want = version["model"].state_dict()
        assert state["model"].keys() == want.keys() and all(torch.equal(state["model"][k], want[k]) for k in want)
        assert len(state["optimizer"]["state"]) == len(version["optimizer"].state_dict()["state"]) > 0

    delay = _delay(lambda v: save_checkpoint(tmp_path / "warm.pt", **v), checkpoints_ab[0])
    kill_at_random(lambda v: save_checkpoint(target, **v), checkpoints_ab, check_one(target, refs, read),
                   rng=_rng("checkpoint"), kills=_kills(request), max_delay=delay, log=tmp_path / "child.log")
    save_checkpoint(target, **checkpoints_ab[0])
    assert _temp_files(target.parent) == [] and target.read_bytes() == refs["A"]


def _metrics_record(step: int) -> dict:
    """A metrics record, a function of its step; large (100 KB: a write the kernel makes page by
    page, so that a kill can cut it, as a full disk can cut a small one)."""
    return {"loss": 1.0 / step, "tokens": 64 * step, "updated": True, "step": step, "lr": 1e-3,
            "note": f"{step}:" + "x" * 100_000}


def _append_metrics(path: Path, step: int) -> None:
    # the append of latentsel.policy.train._train, as it is written there
    record = _metrics_record(step)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def test_metrics_log_killed_mid_append_tears_at_most_its_last_line_which_resume_drops(tmp_path, capsys, request):
    from latentsel.policy.train import _truncate_metrics

    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    rng = _rng("metrics")
    state = {"next": 1}

    def append_from(first):
        step = first
        while True:
            _append_metrics(path, step)
            step += 1

    def check(finished):
        data = path.read_bytes() if path.exists() else b""
        *lines, tail = data.split(b"\n")
        steps = [json.loads(line)["step"] for line in lines]  # every complete line parses
        assert steps == list(range(1, len(steps) + 1)), "the log skips or repeats a step"
        assert all(json.loads(line) == _metrics_record(s) for line, s in zip(lines, steps))
        nxt = len(steps) + 1
        whole = json.dumps(_metrics_record(nxt)).encode()
        assert whole.startswith(tail), "the last line is not a prefix of the record being appended"
        # the resume: records past the checkpoint's step go, and a torn last line with them
        ckpt = rng.randint(0, len(steps) + (tail == whole))
        _truncate_metrics(path, ckpt)
        err = capsys.readouterr().err
        if tail and tail != whole:  # torn
            assert err.startswith(f"warning: {path}:{nxt}: dropped a torn last line (an interrupted append)")
        else:
            assert err == ""
        assert (path.read_bytes() if path.exists() else b"") == b"".join(
            json.dumps(_metrics_record(s)).encode() + b"\n" for s in range(1, ckpt + 1))
        state["next"] = ckpt + 1
        return ckpt

    _append_metrics(tmp_path / "warm.jsonl", 1)
    for _ in range(_kills(request)):  # each run resumes where the last one's checkpoint left it
        kill_at_random(append_from, [state["next"]] * 2, check, rng=rng, kills=1, max_delay=0.05,
                       log=tmp_path / "child.log")
    _append_metrics(path, state["next"])
    _truncate_metrics(path, state["next"])
    assert _temp_files(path.parent) == [] and capsys.readouterr().err == ""
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, state["next"] + 1))


@pytest.mark.slow
def test_training_killed_at_random_resumes_to_the_run_it_would_have_been(tmp_path, torch_one_thread):
    """A real training run killed at random moments (mid-step, mid-append, mid-checkpoint) and
    resumed each time: its log stays whole lines but for a torn last one, and the run resumed to
    the end logs every step once, with the losses of an uninterrupted run."""
    import sys
    from dataclasses import asdict

    from latentsel.policy.checkpoint import load_checkpoint
    from latentsel.policy.train import TrainConfig, train

    def config(name):
        return TrainConfig(out=str(tmp_path / name), regime="toy", preset="tiny", steps=60, batch_size=8, lr=3e-3,
                           warmup=2, pool=64, seed=1, checkpoint_every=3, log_every=1, max_depth=2)

    cfg = config("killed")
    metrics, ckpt = Path(cfg.out) / "metrics.jsonl", Path(cfg.out) / "checkpoint.pt"
    code = ("import torch; torch.set_num_threads(1); from latentsel.policy.train import TrainConfig, train; "
            f"train(TrainConfig(**{asdict(cfg)!r}), progress=False)")
    rng = _rng("train")
    kills = 0
    for _ in range(6):
        before = metrics.stat() if metrics.exists() else None
        with open(tmp_path / "stderr.txt", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=err)
        # once it logs (the resume's rewrite of the log, or a step), kill it at a random moment
        while proc.poll() is None and (not metrics.exists() or (before is not None and (
                metrics.stat().st_ino, metrics.stat().st_size) == (before.st_ino, before.st_size))):
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        if proc.wait() != -signal.SIGKILL:  # it ran to the end first
            assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()
            break
        kills += 1
        lines = metrics.read_bytes().split(b"\n")[:-1]  # the last line may be torn
        assert [json.loads(line)["step"] for line in lines] == list(range(1, len(lines) + 1))
        if ckpt.exists():
            assert load_checkpoint(ckpt)["step"] % 3 == 0
    assert kills >= 3
    train(cfg, progress=False)  # the last resume, in this process
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 61)) and load_checkpoint(ckpt)["step"] == 60
    whole = config("whole")
    train(whole, progress=False)
    loss = [json.loads(line)["loss"] for line in (Path(whole.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx(loss)
    assert _temp_files(Path(cfg.out)) == []


# --- the slow sweep: many kills per writer ------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("writer", ["traces", "traces-gz", "fit", "fit-nuts", "figure", "section", "report", "sweep",
                                    "checkpoint", "metrics"])
def test_every_writer_survives_many_random_kills(writer, tmp_path, request, capsys, monkeypatch):
    """The tests above, SLOW_KILLS kills each (their kill count follows the slow marker)."""
    tests = {
        "traces": lambda: _traces_killed(tmp_path, request.getfixturevalue("traces_ab"),
                                         request.getfixturevalue("world"), "jsonl", SLOW_KILLS),
        "traces-gz": lambda: _traces_killed(tmp_path, request.getfixturevalue("traces_ab"),
                                            request.getfixturevalue("world"), "jsonl.gz", SLOW_KILLS),
        "fit": lambda: _fit_killed(tmp_path, request.getfixturevalue("fits_ab"), SLOW_KILLS, "fit"),
        "fit-nuts": lambda: _fit_killed(tmp_path, [request.getfixturevalue("fits_ab")[0],
                                                   _nuts_shaped(request.getfixturevalue("fits_ab")[1], 1)],
                                        SLOW_KILLS, "fit-nuts"),
        "figure": lambda: test_save_figure_killed_at_random_leaves_one_whole_png(
            tmp_path, request.getfixturevalue("figures_ab"), request),
        "section": lambda: test_write_section_killed_at_random_leaves_one_whole_section(tmp_path, request),
        "report": lambda: test_write_report_killed_at_random_leaves_one_whole_page(
            tmp_path, request.getfixturevalue("figures_ab"), monkeypatch, request),
        "sweep": lambda: test_sweep_task_files_killed_at_random_hold_one_whole_result(tmp_path, request),
        "checkpoint": lambda: test_checkpoint_killed_at_random_leaves_one_loadable_checkpoint(
            tmp_path, request.getfixturevalue("checkpoints_ab"), request),
        "metrics": lambda: test_metrics_log_killed_mid_append_tears_at_most_its_last_line_which_resume_drops(
            tmp_path, capsys, request),
    }
    seen = tests[writer]()
    if seen is not None and writer.startswith(("traces", "fit")):
        # the kills overwrote one version with the other, and for a fit also cut between its files
        assert {"A", "B"} <= set(seen), seen


# --- a full file system -------------------------------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (16 pages), unmounted afterwards."""
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command to make a small file system")
    where = tmp_path / "tiny"
    where.mkdir()
    proc = subprocess.run([mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def _free_pages(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize // PAGE


def _fill(folder: Path, leave_pages: int) -> None:
    """Fill the file system of ``folder`` until ``leave_pages`` pages are free."""
    pages = _free_pages(folder) - leave_pages
    assert pages >= 0
    (folder / "filler").write_bytes(b"\0" * pages * PAGE)
    assert _free_pages(folder) == leave_pages


def _no_space(target: Path):
    """``pytest.raises`` of the OSError of a write that ran out of space: it names ``target``."""
    return pytest.raises(OSError, match=f"^cannot write {re.escape(str(target))}: No space left on device$")


def _pages(n_bytes: int) -> int:
    return math.ceil(n_bytes / PAGE)


def test_write_traces_out_of_space_keeps_the_previous_file(tiny_fs, traces_ab, world):
    from latentsel.traces import read_traces, write_traces

    target = tiny_fs / "traces.jsonl"
    write_traces(target, traces_ab[0][:4])
    before = target.read_bytes()
    with _no_space(target) as info:
        write_traces(target, [dataclasses.replace(tr, id=f"{k}-{tr.id}") for k in range(5) for tr in traces_ab[1]])
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and len(read_traces(target, world=world)) == 4
    assert _temp_files(tiny_fs) == []


def test_fit_save_out_of_space_keeps_the_previous_fit(tiny_fs, fits_ab, tmp_path):
    from latentsel.analysis.results import load_fit

    out = tiny_fs / "fit"
    small = _first_traces(fits_ab[0], 3)
    small.save(out)
    assert _free_pages(tiny_fs) < _pages(_saved_sizes(fits_ab[1], tmp_path / "scratch")["posterior.jsonl"])
    with _no_space(out / "posterior.jsonl") as info:
        fits_ab[1].save(out)
    assert info.value.errno == errno.ENOSPC
    assert _fit_state(load_fit(out)) == _fit_state(small) and _temp_files(tiny_fs) == []


def test_fit_save_out_of_space_at_fit_json_is_refused_not_mixed(tiny_fs, fits_ab, tmp_path):
    """Space for the new posterior.jsonl but not for fit.json: the folder holds the new posterior
    beside the old fit.json, and load_fit refuses it rather than mix the two."""
    from latentsel.analysis.results import load_fit

    out = tiny_fs / "fit"
    old, new = _first_traces(fits_ab[0], 3), _first_traces(fits_ab[1], 1)  # fit.json alone is ~11 pages
    old.save(out)
    sizes = _saved_sizes(new, tmp_path / "scratch")
    p_old, p_new, fit_json = (_pages((out / "posterior.jsonl").stat().st_size), _pages(sizes["posterior.jsonl"]),
                              _pages(sizes["fit.json"]))
    assert fit_json > p_old  # so that the pages freed by the old posterior do not make room
    _fill(tiny_fs, p_new)
    with _no_space(out / "fit.json"):
        new.save(out)
    assert _temp_files(tiny_fs) == []
    with pytest.raises(ValueError, match="posterior.jsonl does not belong to fit.json"):
        load_fit(out)


def test_save_figure_out_of_space_keeps_the_previous_png(tiny_fs):
    from latentsel.plots import save_figure

    target = tiny_fs / "figure.png"
    save_figure(_figure(1, size=1.5, n=4), target, dpi=40)
    before = target.read_bytes()
    assert before.startswith(PNG) and len(before) < 8 * PAGE
    with _no_space(target) as info:
        save_figure(_figure(2, size=6, n=300), target, dpi=100)
    assert info.value.errno == errno.ENOSPC and target.read_bytes() == before and _temp_files(tiny_fs) == []


def test_write_section_out_of_space_keeps_the_previous_section(tiny_fs):
    from latentsel.plots import report
    from latentsel.plots.report import write_section

    target = write_section(tiny_fs, "small", tables=[_table(1, 5)])
    before = target.read_bytes()
    with _no_space(target) as info:
        write_section(tiny_fs, "large", tables=[_table(2, 5000)])
    assert info.value.errno == errno.ENOSPC and target.read_bytes() == before and _temp_files(tiny_fs) == []
    assert report._read_section(target)["title"] == "small"


def _first_traces(fit, n: int):
    """``fit`` with the posterior of its first ``n`` traces only: a small fit to save."""
    post = fit.posterior
    t = int(post.depth[:n].max())
    cut = post._replace(**{name: getattr(post, name)[:n, :t] for name in post._fields[1:6]},
                        log_evidence=post.log_evidence[:n], depth=post.depth[:n], trace_ids=post.trace_ids[:n])
    return fit._replace(posterior=cut, n_traces=n)


def _saved_sizes(fit, scratch: Path) -> dict:
    """The size of every file ``fit.save`` writes (saved in ``scratch``, off the small file system)."""
    fit.save(scratch)
    return {p.name: p.stat().st_size for p in scratch.iterdir() if p.name != LOCK_NAME}


@pytest.mark.parametrize("writer", ["traces", "fit", "figure", "section", "sweep",
                                    pytest.param("checkpoint", marks=pytest.mark.slow)])  # torch: about 13 s
def test_a_first_write_that_does_not_fit_leaves_nothing(tiny_fs, writer, request):
    """On a file system with one page left (a folder the write makes costs none), a write too
    large for it raises the OSError naming its target and leaves no file, partial or temporary,
    and no folder it made."""
    from latentsel.experiments import sweeps
    from latentsel.plots import save_figure
    from latentsel.plots.report import write_section
    from latentsel.traces import write_traces

    where = tiny_fs / "new"
    writes = {
        "traces": (where / "traces.jsonl",
                   lambda: write_traces(where / "traces.jsonl", request.getfixturevalue("traces_ab")[0])),
        "fit": (where / "posterior.jsonl", lambda: request.getfixturevalue("fits_ab")[0].save(where)),
        "figure": (where / "figure.png", lambda: save_figure(_figure(2, size=6, n=300), where / "figure.png")),
        "section": (where / "section.json", lambda: write_section(where, "large", tables=[_table(2, 5000)])),
        "sweep": (where / "t.json", lambda: sweeps._save(where, sweeps.Task("t", len, (1,)), list(range(20000)))),
        "checkpoint": (where / "checkpoint.pt", lambda: _save_checkpoint(request, where / "checkpoint.pt")),
    }
    target, write = writes[writer]
    _fill(tiny_fs, 1)
    with _no_space(target) as info:
        write()
    assert info.value.errno == errno.ENOSPC
    if writer == "fit":  # the folder Fit.save made, and locked, goes with the failed save
        assert not where.exists()
    else:  # (the writers make their target's folder, as mkdir -p, and leave it)
        assert list(where.iterdir()) == []
    assert _temp_files(tiny_fs) == []


def _save_checkpoint(request, path):
    from latentsel.policy.checkpoint import save_checkpoint

    save_checkpoint(path, **request.getfixturevalue("checkpoints_ab")[0])


# --- what the faults above found ----------------------------------------------------------------

def test_a_fit_saved_into_a_new_folder_on_a_full_file_system_names_it_and_leaves_nothing(tiny_fs, fits_ab):
    _fill(tiny_fs, 0)
    where = tiny_fs / "new"
    with pytest.raises(OSError, match=rf"^cannot write {re.escape(str(where))}(/{re.escape(LOCK_NAME)})?: "
                                      "No space left on device$"):
        fits_ab[0].save(where)  # locked_folder(where) first
    assert not where.exists()


def test_an_em_save_sweeps_the_temp_files_a_killed_nuts_save_left(tmp_path, fits_ab):
    nuts = _nuts_shaped(fits_ab[1], 1)
    out = tmp_path / "fit"
    nuts.save(out)
    pid = _fork(lambda: None)
    os.waitpid(pid, 0)  # a dead writer's PID
    stale = out / f".samples.npz.{pid}.abcd1234.tmp"  # what a nuts save killed mid-samples.npz leaves
    stale.write_bytes(b"PK\x03\x04partial")
    fits_ab[0].save(out)
    assert _temp_files(out) == []


def test_a_gz_file_written_twice_is_the_same_bytes(tmp_path):
    from latentsel._io import atomic_open

    target = tmp_path / "traces.jsonl.gz"
    written = []
    for _ in range(2):
        with atomic_open(target) as f:
            f.write("{}\n")
        written.append(target.read_bytes())
    assert written[0] == written[1]
    # the name a gzip header records is the file's own (gunzip -N restores it), not the temporary one's
    assert written[0][10:].split(b"\0")[0] in (b"traces.jsonl", b"traces.jsonl.gz")
