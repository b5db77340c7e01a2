"""Streamed and sharded fits: the chunked reader accepts and refuses what read_traces does, and EM
on a corpus read in parts, or sharded over a 2-worker cluster, reaches the in-memory optimum."""
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from latentsel.inference.em import e_step, fit_em, prior_mean_params
from latentsel.analysis.streaming import StreamedCorpus, depth_groups, load_part, save_part
from latentsel.models.registry import default_params
from latentsel.traces.emission import build_data
from latentsel.traces.failures import read_prefixes
from latentsel.traces.format import TraceFormatError, read_traces, write_traces
from latentsel.traces.regimes import generate
from latentsel.traces.simulate import simulate
from latentsel.traces.stream import iter_chunks


def _same(a, b) -> bool:
    prog = lambda tr: None if tr.program is None else [tuple(p) for p in tr.program]  # noqa: E731
    return (a.id, a.input, list(a.steps), prog(a), a.depth, a.answer) == (b.id, b.input, list(b.steps), prog(b),
                                                                         b.depth, b.answer)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, world):
    """Two files of simulated traces: one fully observed, one with step 2 hidden (blocks)."""
    folder = tmp_path_factory.mktemp("streamed")
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.8, noise=0.05, off_module=0.05)
    full = simulate(generate("eval-ood", 150, seed=1), truth, "modular", world, seed=2)
    hidden = simulate(generate("eval-ood", 60, seed=3), truth, "modular", world, seed=4, hide=[2])
    for tr in hidden:
        tr.id = "h-" + tr.id
    write_traces(folder / "a.jsonl", full, world=world)
    write_traces(folder / "b.jsonl.gz", hidden, world=world)
    return [folder / "a.jsonl", folder / "b.jsonl.gz"], full + hidden


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunks_hold_the_traces_read_traces_reads(corpus, world, chunk):
    paths, traces = corpus
    got = [tr for part in iter_chunks(paths, world=world, chunk=chunk) for tr in part]
    assert len(got) == len(traces) and all(_same(a, b) for a, b in zip(got, traces))
    assert max(len(part) for part in iter_chunks(paths, world=world, chunk=chunk)) <= chunk


def _lines(path):
    return path.read_text().splitlines()


BAD = {
    "bad character": lambda r: r.update(input="ab1"),
    "unknown routing": lambda r: r.update(program=[["nope", r["program"][0][1]]] + r["program"][1:]),
    "program length": lambda r: r.update(program=r["program"][:-1]),
    "steps not a list": lambda r: r.update(steps="abc"),
    "too long": lambda r: r.update(steps=["a" * 40] + r["steps"][1:]),
    "empty id": lambda r: r.update(id=""),
    "truth names": lambda r: r.update(truth={**r["truth"], "skills": ["zzz"] * len(r["steps"])}),
    "hidden run": lambda r: r.update(steps=[None, None, None, "ab"], program=r["program"][:1] * 4,
                                     truth=None),
    "truth length": lambda r: r.update(truth={**r["truth"], "off": r["truth"]["off"][:-1]}),
    "no steps": lambda r: r.update(steps=[], program=[], truth=None),
    "bad answer": lambda r: r.update(answer="AB"),
    "program length, some programs absent": lambda r: r.update(program=r["program"][:-1], _none_before=True),
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_a_bad_record_is_the_error_read_traces_gives(corpus, world, tmp_path, what):
    lines = _lines(corpus[0][0])[:40]
    record = json.loads(lines[25])
    BAD[what](record)
    if record.pop("_none_before", False):  # a chunk that mixes traces with and without programs
        lines[3] = json.dumps(dict(json.loads(lines[3]), program=None))
    lines[25] = json.dumps(record)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError) as want:
        read_traces(path, world=world)
    for chunk in (4, 100):
        with pytest.raises(TraceFormatError) as got:
            list(iter_chunks(path, world=world, chunk=chunk))
        assert str(got.value) == str(want.value) and got.value.line == 26
        # skipped the same way, with the same message
        want_errors, got_errors = [], []
        kept = read_traces(path, world=world, skip_invalid=True, errors=want_errors)
        streamed = [tr for part in iter_chunks(path, world=world, chunk=chunk, skip_invalid=True, errors=got_errors)
                    for tr in part]
        assert [str(e) for e in got_errors] == [str(e) for e in want_errors]
        assert len(streamed) == len(kept) == 39


def _first_error(path, world, chunk):
    """``(read_traces's error, iter_chunks's error)`` on a file with a bad record."""
    with pytest.raises(TraceFormatError) as want:
        read_traces(path, world=world)
    with pytest.raises(TraceFormatError) as got:
        list(iter_chunks(path, world=world, chunk=chunk))
    return want.value, got.value


def test_duplicate_ids_across_chunks_and_files(corpus, world, tmp_path):
    lines = _lines(corpus[0][0])[:30]
    lines.append(lines[3])  # the same id 27 lines later, in another chunk
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(lines) + "\n")
    want, got = _first_error(path, world, 8)
    assert str(got) == str(want) == f"{path}:31: duplicate id {json.loads(lines[3])['id']!r} (first on line 4)"
    # ids are unique within a file: the same file twice is two files
    assert sum(len(c) for c in iter_chunks([corpus[0][0], corpus[0][0]], world=world)) == 300


@pytest.mark.parametrize("chunk", [4, 100])
def test_every_copy_of_an_id_names_its_first_line(corpus, world, tmp_path, chunk):
    lines = _lines(corpus[0][0])[:10]
    lines += [lines[2], lines[2], lines[2]]  # three more copies of line 3, in one chunk or across two
    path = tmp_path / "dup3.jsonl"
    path.write_text("\n".join(lines) + "\n")
    want, got = [], []
    read_traces(path, world=world, skip_invalid=True, errors=want)
    list(iter_chunks(path, world=world, chunk=chunk, skip_invalid=True, errors=got))
    assert [str(e) for e in got] == [str(e) for e in want] and len(want) == 3
    assert all("(first on line 3)" in str(e) for e in got)


def test_a_truncated_gzip_names_the_line_it_stops_at(corpus, world, tmp_path):
    data = gzip.compress(("\n".join(_lines(corpus[0][0]) * 4) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(TraceFormatError) as want:
        read_traces(path, world=world, skip_invalid=True)
    for chunk in (7, 1000):
        with pytest.raises(TraceFormatError) as got:
            list(iter_chunks(path, world=world, chunk=chunk, skip_invalid=True))
        assert str(got.value) == str(want.value) and "cannot read" in str(got.value) and got.value.line > 100


def test_records_the_fast_path_does_not_model_keep_their_meaning(corpus, world, tmp_path):
    """A malformed completion is cut to its read prefix and extra keys are accepted, as in a fit."""
    lines = _lines(corpus[0][0])[:20]
    r = json.loads(lines[5])
    r["steps"][2] = None
    r["malformed"] = "step 3: unreadable"
    lines[5] = json.dumps(r)
    r = json.loads(lines[6])
    r["policy"] = {"checkpoint": 3}
    lines[6] = json.dumps(r)
    path = tmp_path / "mixed.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    want = read_prefixes(read_traces(path, world=world))[0]
    got = [tr for part in iter_chunks(path, world=world, chunk=6) for tr in part]
    assert len(got) == len(want) == 20 and all(_same(a, b) for a, b in zip(got, want))
    assert got[5].depth == 2


def test_depth_cap_and_one_deep_trace(corpus, world, tmp_path):
    lines = _lines(corpus[0][0])[:50]
    r = json.loads(lines[10])
    deep = dict(r, id="deep", program=r["program"] * 100, steps=r["steps"] * 100, truth=None)
    lines.append(json.dumps(deep))
    path = tmp_path / "deep.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError, match=r"deep.jsonl:51: 400 steps; the deepest trace a fit accepts is "
                                               r"max_depth=100"):
        list(iter_chunks(path, world=world, max_depth=100))
    # accepted under the default cap, it pads only its own part
    with StreamedCorpus(path, world, cache="memory") as c:
        shapes = sorted(data.match.shape[:2] for data, _ in c.parts())
        assert shapes == [(1, 400), (50, 4)]
        traces = read_traces(path, world=world)
        ref = e_step("modular", prior_mean_params("modular", world.n_routes, world.n_skills),
                     build_data(traces, world))
        got = c.counts("modular", prior_mean_params("modular", world.n_routes, world.n_skills))
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_depth_groups_bound_the_padded_cells():
    depths = np.array([4] * 10 + [1000] + [3] * 5 + [9])
    groups = depth_groups(depths, max_cells=16)
    assert sorted(np.concatenate(groups).tolist()) == list(range(depths.size))
    for g in groups:
        bucket = 1 << int(depths[g].max() - 1).bit_length()
        assert len(g) * bucket <= 16 or len(g) == 1


@pytest.mark.parametrize("model", ["modular", pytest.param("entangled", marks=pytest.mark.slow),
                                   pytest.param("grammar", marks=pytest.mark.slow)])
def test_streamed_em_reaches_the_in_memory_optimum(corpus, world, model, tmp_path):
    """The same E-steps on the same iterates: the fits agree to rounding (hidden-step blocks included)."""
    paths, traces = corpus
    ref = fit_em(model, build_data(traces, world, model=model), tol=1e-12, max_iter=12)
    cache = tmp_path / "cache"
    with StreamedCorpus(paths, world, model, cache=cache, chunk=64) as c:
        assert c.n_traces == len(traces) and c.n_parts >= 4
        got = fit_em(model, c, tol=1e-12, max_iter=12)
        assert len(list(cache.iterdir())) == c.n_parts
    assert got.e_steps == ref.e_steps
    assert got.log_evidence == pytest.approx(ref.log_evidence, rel=1e-12)
    for a, b in zip(got.params, ref.params):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def test_a_temporary_cache_is_removed(corpus, world):
    c = StreamedCorpus(corpus[0][:1], world)
    folder = c._parts.folder
    assert folder.is_dir() and len(list(folder.iterdir())) == c.n_parts
    c.close()
    assert not folder.exists()
    with pytest.raises(ValueError, match="not empty"):
        StreamedCorpus(corpus[0][:1], world, cache=corpus[0][0].parent)


def test_a_part_round_trips_with_its_blocks(corpus, world, tmp_path):
    data = build_data(corpus[1][150:], world)
    assert data.blocks
    save_part(tmp_path / "p.npz", data, np.arange(data.n_traces))
    back, rows = load_part(tmp_path / "p.npz")
    assert (rows == np.arange(data.n_traces)).all()
    p = prior_mean_params("modular", world.n_routes, world.n_skills)
    for a, b in zip(e_step("modular", p, back), e_step("modular", p, data)):
        np.testing.assert_array_equal(a, b)


def test_sharded_em_on_a_local_dask_cluster(corpus, world):
    pytest.importorskip("dask.distributed")
    from latentsel.analysis.sharded import ShardedCorpus

    paths, traces = corpus
    ref = fit_em("modular", build_data(traces, world), tol=1e-12, max_iter=12)
    with ShardedCorpus(paths, None, backend="dask", workers=2) as c:
        assert [s["n_traces"] for s in c.shards] == [150, 60]
        assert len({s["pid"] for s in c.shards}) == 2  # one shard a worker process
        got = fit_em("modular", c, tol=1e-12, max_iter=12)
    for a, b in zip(got.params, ref.params):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    assert got.log_evidence == pytest.approx(ref.log_evidence, rel=1e-12)


def test_a_bad_shard_names_its_file_and_line(corpus, world, tmp_path):
    pytest.importorskip("dask.distributed")
    from latentsel.analysis.sharded import ShardedCorpus

    lines = _lines(corpus[0][0])[:10]
    lines[7] = lines[7].replace('"input": "', '"input": "9', 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError, match=r"bad.jsonl:8: input '9"):
        ShardedCorpus([corpus[0][0], bad], None, backend="dask", workers=1)
    with pytest.raises(TypeError, match="by name"):
        ShardedCorpus([bad], world)


@pytest.mark.slow
def test_sharded_em_on_a_local_ray_cluster(corpus, world):
    pytest.importorskip("ray")
    from latentsel.analysis.sharded import ShardedCorpus

    paths, traces = corpus
    ref = fit_em("modular", build_data(traces, world), tol=1e-12, max_iter=12)
    with ShardedCorpus(paths, None, backend="ray", workers=2) as c:
        got = fit_em("modular", c, tol=1e-12, max_iter=12)
    for a, b in zip(got.params, ref.params):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "latentsel", *map(str, args)], capture_output=True, text=True)


def test_cli_fits_several_files_streamed(corpus, world, tmp_path):
    from latentsel.analysis.results import load_fit

    paths, traces = corpus
    out = tmp_path / "fit"
    # the statistics built by 2 processes: the same corpus, so the same fit
    r = _cli("fit", *paths, "--stream", "--workers", "2", "--out", out, "--tol", "1e-12", "--max-iter", "12")
    assert r.returncode == 0, r.stderr
    fit = load_fit(out, world)
    assert fit.posterior is None and fit.n_traces == len(traces)
    assert not (out / "posterior.jsonl").exists()
    ref = fit_em("modular", build_data(traces, world), tol=1e-12, max_iter=12)
    for a, b in zip(fit.params, ref.params):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    assert json.loads((out / "fit.json").read_text())["corpus"]["kind"] == "streamed"
    r = _cli("fit", *paths, "--out", tmp_path / "x")
    assert r.returncode != 0 and "several files are fitted with --stream" in r.stderr
    r = _cli("fit", paths[0], "--backend", "dask", "--method", "svi", "--out", tmp_path / "x")
    assert r.returncode != 0 and "--backend dask fits by em only" in r.stderr


def test_the_first_bad_line_is_the_one_reported(corpus, world, tmp_path):
    """A duplicate id before a bad character, a line of Unicode whitespace, a record nested too
    deeply: reported (or skipped) in line order, as read_traces does."""
    lines = _lines(corpus[0][0])[:20]
    lines[4] = lines[1]
    lines[10] = lines[10].replace('"input": "', '"input": "9', 1)
    lines[12] = "\u00a0"
    r = json.loads(lines[15])
    r["source"] = {}
    lines[15] = json.dumps(r).replace('"source": {}', '"source": {"deep": ' + "[" * 1200 + "]" * 1200 + "}")
    path = tmp_path / "order.jsonl"
    path.write_text("\n".join(lines) + "\n")
    want, got = _first_error(path, world, 50)
    assert str(got) == str(want) and got.line == 5
    want_errors, got_errors = [], []
    read_traces(path, world=world, skip_invalid=True, errors=want_errors)
    list(iter_chunks(path, world=world, chunk=50, skip_invalid=True, errors=got_errors))
    assert [str(e) for e in got_errors] == [str(e) for e in want_errors] and len(want_errors) == 3


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Traces of depth 3 and 4 (one depth bucket, so one part) in a 3 x 4 world, and EM's optimum."""
    from latentsel import World, default_world
    from tests.inference.test_exact import random_traces
    base = default_world()
    world = World(skills=[base.skills[base.skill_index(n)] for n in ("reverse", "rotl", "shift1", "dedup")],
                  routes=[base.routes[base.route_index(n)] for n in ("prev", "input", "cat_prev_input")],
                  alphabet="abcdef", max_len=8)
    truth = default_params("modular", 3, 4, fidelity=0.8, noise=0.05, off_module=0.05)
    traces = simulate(random_traces(np.random.default_rng(0), world, 600, max_depth=4), truth, "modular", world, seed=1)
    traces = [tr for tr in traces if tr.depth >= 3]
    path = tmp_path_factory.mktemp("small") / "t.jsonl"
    write_traces(path, traces, world=world)
    return path, world, fit_em("modular", build_data(traces, world), tol=1e-13, max_iter=5000)


def _svi_error(corpus, batch, n_traces, ref, **kw):
    from latentsel.inference.svi import fit_svi_batches
    got = fit_svi_batches("modular", corpus.minibatches(batch, seed=1), n_traces, corpus.n_routes, corpus.n_skills,
                          corpus.n_chars, corpus.max_len, **kw).params
    return max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(got, ref.params))


def test_svi_on_one_minibatch_of_the_corpus_reaches_the_em_optimum(small_corpus):
    """One minibatch holding the whole corpus: a deterministic loss, the objective EM maximizes
    (``fit_svi``'s), so the delta guide lands on EM's optimum."""
    path, world, ref = small_corpus
    with StreamedCorpus(path, world, cache="memory", chunk=1000) as c:
        assert c.n_parts == 1
        assert _svi_error(c, 1024, c.n_traces, ref, steps=600) < 1e-6


@pytest.mark.slow
def test_svi_on_small_minibatches_ends_near_the_optimum(small_corpus):
    """Minibatches of 32 traces, scaled by N / 32: noisy but unbiased steps, and the decayed step
    size ends near the optimum. With the scale left out (each minibatch counted as the corpus)
    the prior weighs N / 32 times as much and the fit ends farther off."""
    path, world, ref = small_corpus
    kw = dict(steps=800, lr=0.02, lr_final=0.0005)
    with StreamedCorpus(path, world, cache="memory", chunk=1000) as c:
        err = _svi_error(c, 32, c.n_traces, ref, **kw)
        assert err < 0.03
        assert _svi_error(c, 32, 32, ref, **kw) > 3 * err


def test_minibatches_are_unbiased_over_parts_of_any_size(world, tmp_path):
    """100 depth-1 traces and 4 depth-3 ones make two parts of very unequal size. The scaled
    minibatch evidence averages to the corpus's: each trace weighs 1 in expectation (a sampler
    that walks part by part would weigh the 4 deep traces about 9 times and the rest 0.7)."""
    from latentsel.inference.corpus import corpus_log_evidence
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.8, noise=0.05, off_module=0.05)
    deep = generate("eval-ood", 4, seed=6, world=world, depths=[3])
    for p in deep:
        p.id = "deep-" + p.id
    traces = simulate(generate("eval-ood", 100, seed=5, world=world, depths=[1]) + deep, truth, "modular", world,
                      seed=6)
    write_traces(tmp_path / "t.jsonl", traces, world=world)
    want = corpus_log_evidence("modular", truth, build_data(traces, world)).sum()
    with StreamedCorpus(tmp_path / "t.jsonl", world, cache="memory") as c:
        assert sorted(c._parts.sizes) == [4, 100]
        batches = c.minibatches(16, seed=0)
        estimates = [c.n_traces / n * corpus_log_evidence("modular", truth, data).sum()
                     for data, n in (next(batches) for _ in range(3000))]
    assert np.mean(estimates) == pytest.approx(want, rel=0.03)


def test_svi_refuses_blocks(corpus, world):
    from latentsel.analysis.fitting import fit_corpus
    with StreamedCorpus(corpus[0][1:], world) as c, pytest.raises(ValueError, match="hidden-step blocks"):
        fit_corpus(c, world, "modular", "svi", batch=16, progress=False)


@pytest.mark.slow
def test_the_streamed_cli_fits_by_svi(corpus, tmp_path):
    out = tmp_path / "fit"
    r = subprocess.run([sys.executable, "-m", "latentsel", "fit", str(corpus[0][0]), "--stream", "--method", "svi",
                        "--steps", "50", "--batch", "64", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "fit.json").read_text())
    assert rec["method"] == "svi" and rec["batch"] == 64 and len(rec["losses"]) == 50 and rec["corpus"]["traces"] == 150
