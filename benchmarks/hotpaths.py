"""The hot paths of a fit, each against its anchor measured in the same run (depth-4 modular traces).

Rows (traces per second; best of ``--repeat``; warm JIT unless said):

* read: the chunked columnar reader (:func:`latentsel.traces.stream.iter_chunks`: blocks parsed
  by pyarrow into Arrow columns) against the validating line reader (``read_traces``), on the
  same file;
* build: :func:`~latentsel.traces.emission.build_data` with the compiled executor (numba)
  against the vectorized numpy executor, on the same records, and on the reader's columns chunk
  by chunk, as a streamed fit builds them (the statistics asserted equal);
* exact from statistics: the evidence alone, the evidence with marginals and MAP, and the EM
  E-step, each jitted (JAX) and compiled (numba), against a plain numpy baseline (the emission
  by table lookup, the evidence by ``einsum``, float64);
* end to end: read + build from the columns + exact posterior (compiled);
* grammar forward-backward: the factorized chain (O(RK(R+K)) a step) against dynamax's dense
  ``hmm_smoother`` over the R*K = 240 states on the same emissions, and hmmlearn's C forward and
  backward passes (``_hmmc.forward_scaling`` / ``backward_scaling``, one trace at a time, on
  fewer traces);
* Pyro: the Pyro program's enumerated evidence against the closed form;
* first call: ``latentsel fit`` on 1,000 traces, wall time of the command (a fresh process: imports,
  reading, JIT compilation, fit, writing), and in one process the first and second ``fit_em``.

dynamax and hmmlearn are optional (``pip install dynamax hmmlearn``; dynamax's fitting UI module
``fastprogress`` is not needed by its inference functions and is stubbed if missing).

    python benchmarks/hotpaths.py --traces 100000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _results import timed, write_results  # noqa: E402

from latentsel.analysis.posterior import log_evidence_from_data, posterior_from_data  # noqa: E402
from latentsel.inference.em import e_step, fit_em  # noqa: E402
from latentsel.inference.exact import forward_backward  # noqa: E402
from latentsel.models.data import emission_table, log_emission  # noqa: E402
from latentsel.models.registry import default_params  # noqa: E402
from latentsel.traces.emission import build_data  # noqa: E402
from latentsel.traces.format import read_traces, write_traces  # noqa: E402
from latentsel.traces.regimes import generate  # noqa: E402
from latentsel.traces.simulate import simulate  # noqa: E402
from latentsel.traces.stream import iter_chunks  # noqa: E402
from latentsel.world import default_world  # noqa: E402


@contextmanager
def compiled(value):
    """``LATENTSEL_COMPILED`` set to ``value`` inside the block."""
    before = os.environ.get("LATENTSEL_COMPILED")
    os.environ["LATENTSEL_COMPILED"] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ["LATENTSEL_COMPILED"]
        else:
            os.environ["LATENTSEL_COMPILED"] = before


def numpy_evidence(data, params):
    """The plain baseline: per-step emission by table lookup, evidence by einsum (float64)."""
    table = emission_table(float(params.noise), float(params.off_module), data.n_chars, data.max_len, xp=np)
    total = 0.0
    for lo in range(0, data.n_traces, 1024):
        sl = slice(lo, lo + 1024)
        e = table[data.length[sl][..., None, None], data.match[sl].astype(np.int64) + 1]
        rho, kappa = np.asarray(params[0])[data.route_intended[sl]], np.asarray(params[1])[data.skill_intended[sl]]
        p_y = np.einsum("ntr,ntr->nt", np.einsum("ntrk,ntk->ntr", e, kappa), rho)
        total += np.log(np.where(data.emit[sl], p_y, 1.0)).sum()
    return total


def _dynamax():
    if "fastprogress" not in sys.modules:
        try:
            import fastprogress  # noqa: F401
        except ImportError:  # only dynamax's fitting loops use it
            stub = types.ModuleType("fastprogress.fastprogress")
            stub.progress_bar = lambda it, *a, **k: it
            sys.modules["fastprogress"] = types.ModuleType("fastprogress")
            sys.modules["fastprogress"].fastprogress = stub
            sys.modules["fastprogress.fastprogress"] = stub
    from dynamax.hidden_markov_model.inference import hmm_smoother

    return hmm_smoother


def grammar_rows(world, data, args):
    rows = []
    r_n, k_n = world.n_routes, world.n_skills
    gp = default_params("grammar", r_n, k_n, fidelity=0.85, noise=0.03, off_module=0.03)
    n = min(args.grammar_traces, data.n_traces)
    sub = data.take(slice(0, n))
    log_emit = log_emission(sub, gp.noise, gp.off_module)  # [N, T, R, K]
    mask = jnp.asarray(sub.step_mask)
    rt, st = jnp.asarray(gp.route_trans), jnp.asarray(gp.skill_trans)
    ours = jax.jit(lambda le, m: forward_backward(rt, st, le, m))

    def run_ours():
        out = [ours(log_emit[lo:lo + 1024], mask[lo:lo + 1024]) for lo in range(0, n, 1024)]
        return jax.block_until_ready(out)

    run_ours()
    ours_s, res = timed(run_ours, args.repeat)
    ours_ev = np.concatenate([np.asarray(r.log_evidence) for r in res])
    rows.append({"path": "grammar FB, factorized (ours)", "traces": n, "seconds": ours_s, "traces_per_s": n / ours_s})
    dense = (rt[:r_n, None, :, None] * st[None, :k_n, None, :]).reshape(r_n * k_n, r_n * k_n)
    init = (rt[r_n][:, None] * st[k_n][None, :]).reshape(-1)
    try:
        hmm_smoother = _dynamax()
    except ImportError as e:
        rows.append({"path": "dynamax hmm_smoother (dense)", "skipped": str(e)})
    else:
        flat = log_emit.reshape(n, -1, r_n * k_n)
        # every trace here has depth 4: dynamax runs fixed-length sequences
        smoother = jax.jit(jax.vmap(lambda le: hmm_smoother(init, dense, le)))

        def run_dyn():
            return jax.block_until_ready([smoother(flat[lo:lo + 1024]) for lo in range(0, n, 1024)])

        run_dyn()
        dyn_s, post = timed(run_dyn, args.repeat)
        dyn_ev = np.concatenate([np.asarray(p.marginal_loglik) for p in post])
        rows.append({"path": "dynamax hmm_smoother (dense)", "traces": n, "seconds": dyn_s, "traces_per_s": n / dyn_s,
                     "max_abs_diff_log_evidence": float(np.max(np.abs(dyn_ev - ours_ev)))})
    try:
        from hmmlearn import _hmmc
    except ImportError as e:
        rows.append({"path": "hmmlearn forward+backward (C)", "skipped": str(e)})
    else:
        m = min(n, args.hmmlearn_traces)
        frames = np.exp(np.asarray(log_emit[:m]).reshape(m, -1, r_n * k_n))
        start, trans = np.asarray(init), np.asarray(dense)

        def run_hl():
            out = []
            for f in frames:
                log_p, fwd, scaling = _hmmc.forward_scaling(start, trans, f)
                _hmmc.backward_scaling(start, trans, f, scaling)
                out.append(log_p)
            return np.array(out)

        hl_s, hl_ev = timed(run_hl, args.repeat)
        rows.append({"path": "hmmlearn forward+backward (C)", "traces": m, "seconds": hl_s, "traces_per_s": m / hl_s,
                     "max_abs_diff_log_evidence": float(np.max(np.abs(hl_ev - ours_ev[:m])))})
    for r in rows[1:]:
        if "seconds" in r:
            r["ours_speedup"] = (r["seconds"] / r["traces"]) / (ours_s / n)
    return rows


def first_call(world, traces):
    """Wall seconds of ``latentsel fit`` on 1,000 traces in a fresh process, of importing the
    fitting code alone, and of the first and the second ``fit_em`` in one process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jsonl"
        write_traces(path, traces[:1000], world=world)
        cli = {}
        cache = str(Path(tmp) / "jax-cache")
        # no compilation cache; then a fresh one, filled by the first command and read by the second
        for label, value in (("cold, no cache", "off"), ("first, empty cache", cache), ("later, warm cache", cache)):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "latentsel", "fit", str(path), "--out", str(Path(tmp) / "fit")],
                               capture_output=True, text=True, env={**os.environ, "LATENTSEL_JAX_CACHE": value})
            cli[label] = time.perf_counter() - t0
            if r.returncode:
                raise RuntimeError(r.stderr)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import latentsel.analysis.fitting"], check=True)
        import_s = time.perf_counter() - t0
        code = ("import time, jax; jax.config.update('jax_enable_x64', True)\n"
                "from latentsel.traces.format import read_traces\n"
                "from latentsel.traces.emission import build_data\n"
                "from latentsel.inference.em import fit_em\n"
                "from latentsel.world import default_world\n"
                f"w = default_world(); d = build_data(read_traces({str(path)!r}, world=w), w)\n"
                "t = time.perf_counter(); fit_em('modular', d); a = time.perf_counter() - t\n"
                "t = time.perf_counter(); fit_em('modular', d); b = time.perf_counter() - t\n"
                "print(a, b)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"cli_fit_1000_s": cli, "import_s": import_s, "first_fit_em_s": float(out[0]),
            "second_fit_em_s": float(out[1])}


def main(args):
    world = default_world()
    truth = default_params("modular", world.n_routes, world.n_skills, fidelity=0.85, noise=0.03, off_module=0.03)
    tmp = Path(tempfile.mkdtemp(prefix="latentsel-hot-"))
    path = tmp / "traces.jsonl"
    traces = simulate(generate("eval-ood", args.traces, seed=0, world=world), truth, "modular", world, seed=0)
    write_traces(path, traces, world=world)
    n = len(traces)
    rows = []

    def row(path_, seconds, anchor=None, **extra):
        r = {"path": path_, "traces": extra.pop("traces", n), "seconds": seconds}
        r["traces_per_s"] = r["traces"] / seconds
        if anchor is not None:
            r["anchor"], r["x_anchor"] = anchor[0], anchor[1] / seconds
        r.update(extra)
        rows.append(r)
        print(f"{r['path']:<44} {r['traces']:>8} {seconds:>9.3f} s {r['traces_per_s']:>12.0f}/s"
              + (f"   {r['x_anchor']:.2f}x {r['anchor']}" if anchor else ""), flush=True)

    read_s, _ = timed(lambda: read_traces(path, world=world), 1)
    row("read: read_traces (anchor)", read_s)
    stream_s, chunks = timed(lambda: [c for c in iter_chunks(path, world=world)], args.repeat)
    row("read: iter_chunks (Arrow columns)", stream_s, ("read_traces", read_s))
    records = [tr for c in chunks for tr in c]
    with compiled("never"):
        vec_s, vec = timed(lambda: build_data(records, world), 1)
    row("build_data: vectorized executor (anchor)", vec_s)
    with compiled("always"):
        build_data(records[:100], world)  # numba's start (the kernel is cached on disk)
        build_s, data = timed(lambda: build_data(records, world), args.repeat)
    assert all(np.array_equal(a, b) for a, b in zip(data.arrays(), vec.arrays()))
    row("build_data: compiled executor", build_s, ("vectorized executor", vec_s))
    del vec
    with compiled("always"):
        cols_s, parts = timed(lambda: [build_data(c, world) for c in chunks], args.repeat)
    lo = 0
    for c, part in zip(chunks, parts):  # each chunk's statistics are its rows of the whole corpus's
        assert all(np.array_equal(a, b) for a, b in zip(part.arrays(), data.take(slice(lo, lo + len(c))).arrays()))
        lo += len(c)
    del parts
    row("build_data: compiled, from the reader's columns", cols_s, ("vectorized executor", vec_s))
    base_s, base = timed(lambda: numpy_evidence(data, truth), args.repeat)
    row("exact: numpy table + einsum evidence (anchor)", base_s)
    with compiled("never"):
        posterior_from_data(data.take(slice(0, 1024)), truth, "modular", joint=False)
        jit_s, post = timed(lambda: posterior_from_data(data, truth, "modular", joint=False), args.repeat)
        jit_ev_s, _ = timed(lambda: log_evidence_from_data(data, truth, "modular"), args.repeat)
    row("exact: evidence, jitted", jit_ev_s, ("numpy evidence", base_s))
    row("exact: evidence + marginals + MAP, jitted", jit_s, ("numpy evidence", base_s))
    with compiled("always"):
        log_evidence_from_data(data.take(slice(0, 64)), truth, "modular")
        posterior_from_data(data.take(slice(0, 64)), truth, "modular", joint=False)
        ev_s, ev = timed(lambda: log_evidence_from_data(data, truth, "modular"), args.repeat)
        exact_s, post_c = timed(lambda: posterior_from_data(data, truth, "modular", joint=False), args.repeat)
    assert abs(ev.sum() - base) <= 1e-9 * abs(base) and abs(post_c.log_evidence.sum() - base) <= 1e-9 * abs(base)
    assert np.allclose(post_c.route_probs, post.route_probs, rtol=1e-9, atol=1e-12)
    row("exact: evidence, compiled", ev_s, ("numpy evidence", base_s))
    row("exact: evidence + marginals + MAP, compiled", exact_s, ("numpy evidence", base_s))
    with compiled("never"):
        e_step("modular", truth, data.take(slice(0, 2048)))
        estep_s, counts = timed(lambda: e_step("modular", truth, data), args.repeat)
    row("exact: EM E-step (counts + evidence), jitted", estep_s, ("numpy evidence", base_s))
    with compiled("always"):
        e_step("modular", truth, data.take(slice(0, 64)))
        estep_c_s, counts_c = timed(lambda: e_step("modular", truth, data), args.repeat)
    assert all(np.allclose(a, b, rtol=1e-10) for a, b in zip(counts_c, counts))
    row("exact: EM E-step (counts + evidence), compiled", estep_c_s, ("numpy evidence", base_s))
    row("end to end: iter_chunks + build from columns + exact (compiled)", stream_s + cols_s + exact_s)
    for r in grammar_rows(world, data, args):
        rows.append(r)
        print(r, flush=True)
    if args.pyro_traces:
        from latentsel.inference.pyro_enum import pyro_log_evidence

        sub = data.take(slice(0, args.pyro_traces))
        # the closed form as a fit of this size runs it (jitted below the compiled kernels' threshold)
        closed_s, ref = timed(lambda: posterior_from_data(sub, truth, "modular", joint=False), args.repeat)
        pyro_log_evidence("modular", truth, sub.take(slice(0, 64)))
        pyro_s, got = timed(lambda: pyro_log_evidence("modular", truth, sub), args.repeat)
        assert np.allclose(got, ref.log_evidence, rtol=1e-6)
        row("Pyro enumeration evidence", pyro_s, ("closed form", closed_s), traces=args.pyro_traces)
        rows[-1]["x_closed_form"] = pyro_s / closed_s
    fc = first_call(world, traces)
    print(fc, flush=True)
    result = {"benchmark": "hotpaths", "traces": n, "rows": rows, "first_call": fc}
    write_results(args.json, result, jax=jax.__version__, numpy=np.__version__)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", type=int, default=100_000)
    p.add_argument("--grammar-traces", type=int, default=20_480)
    p.add_argument("--hmmlearn-traces", type=int, default=2_000)
    p.add_argument("--pyro-traces", type=int, default=2_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "hotpaths.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
    os._exit(0)
