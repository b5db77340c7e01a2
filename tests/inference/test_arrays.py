"""Exact inference on bare arrays against a brute force over every hidden path (DESIGN §4).

The corpora are random :class:`HLSMData` built directly, with no world and no traces: random
intended modules, lengths and match counts (-1 = the lengths differ; steps that no module
explains, steps that one or two modules explain), traces of different depths, unobserved
steps that nothing reads, and blocks of hidden steps built by hand. Random arrays reach
corners that strings from a world rarely do, and the check does not rest on the code that
turns traces into arrays.

The brute force knows only the definition. For every trace it enumerates every joint
assignment of (r_t, k_t, u_t) of every step, scores it as prior × emission in log space (so
exact zeros, off_module down to 1e-300 and noise down to 1e-200 stay exact), and sums: the log evidence, the
marginals of r_t, k_t and u_t, and the probability of every path of (r_t, k_t) with the off
flags summed out (for the MAP). An unobserved step is on-module and contributes a factor 1; a
step that reads hidden entries takes its match counts from the node of the block's tree that
the executed hidden selections reach.
"""
import itertools

import jax
import numpy as np
import pytest

from latentsel.inference.corpus import corpus_posterior
from latentsel.inference.exact import exact_posterior
from latentsel.models.data import HiddenBlocks, HLSMData
from latentsel.models.params import EntangledParams, GrammarParams, ModularParams
from latentsel.models.registry import MODELS

REL = 1e-6
ATOL = 1e-12  # on probabilities (a unit scale), for entries that are zero in one of the two
N, T, R, K = 3, 3, 3, 4
N_CHARS, MAX_LEN = 4, 5

# name: (exact zeros in the rows, noise, off_module); None draws it uniformly
CASES = {
    "dirichlet-a": (False, None, None),
    "dirichlet-b": (False, None, None),
    "zeros": (True, None, None),
    "tiny-noise": (False, 1e-200, None),
    "tiny-off": (True, None, 1e-200),
    "off-1e-300": (True, 1e-3, 1e-300),  # p(y_t) below 1e-280: the log-space path
    "near-one": (False, 1 - 1e-9, 1 - 1e-9),
}


def random_rows(rng, shape, zeros):
    """Rows ``[..., n]`` from Dirichlet(0.7); with ``zeros``, about a third of each row's
    entries set to exactly 0 (never the whole row) and the rest renormalized."""
    rows = rng.dirichlet(np.full(shape[-1], 0.7), size=shape[:-1])
    if zeros:
        drop = rng.random(shape) < 0.35
        drop[..., 0] &= ~drop[..., 1:].all(axis=-1)
        rows = np.where(drop, 0.0, rows)
        rows /= rows.sum(axis=-1, keepdims=True)
    return rows


def random_params(rng, model, case):
    """The parameters of ``model`` for one of :data:`CASES`."""
    zeros, noise, off = CASES[case]
    # numpy scalars, as corpus_posterior passes them: both calls share one compilation
    noise = np.float64(rng.uniform(0.02, 0.4) if noise is None else noise)
    off = np.float64(rng.uniform(0.02, 0.4) if off is None else off)
    if model == "modular":
        return ModularParams(random_rows(rng, (R, R), zeros), random_rows(rng, (K, K), zeros), noise, off)
    if model == "entangled":
        return EntangledParams(random_rows(rng, (R + 1, R, R), zeros), random_rows(rng, (K + 1, K, K), zeros),
                               noise, off)
    return GrammarParams(random_rows(rng, (R + 1, R), zeros), random_rows(rng, (K + 1, K), zeros), noise, off)


def random_match(rng, length, mismatch=(1.0, 0.85, 0.3)):
    """int8[..., R, K]: the match counts of steps of length ``length: int[...]`` under every
    module. Per step, each module's length differs (-1) with a probability drawn from
    ``mismatch``: every module (only the off-module branch explains the step), most of them,
    or some."""
    length = np.asarray(length)[..., None, None]
    m = rng.integers(0, length + 1, size=length.shape[:-2] + (R, K))
    p = rng.choice(mismatch, size=length.shape)
    return np.where(rng.random(m.shape) < p, -1, m).astype(np.int8)


def random_data(rng, hidden_p=0.25, min_len=0, mismatch=(1.0, 0.85, 0.3)):
    """N traces of depth 1..T (the first of depth T), each step unobserved with probability
    ``hidden_p`` and then read by nothing (no blocks)."""
    depth = rng.integers(1, T + 1, size=N)
    depth[0] = T
    step_mask = np.arange(T)[None] < depth[:, None]  # [N, T]
    observed = step_mask & (rng.random((N, T)) >= hidden_p)  # [N, T]
    length = np.where(observed, rng.integers(min_len, MAX_LEN + 1, size=(N, T)), 0).astype(np.int32)
    match = np.where(observed[..., None, None], random_match(rng, length, mismatch), -1).astype(np.int8)
    route = np.where(step_mask, rng.integers(0, R, size=(N, T)), 0).astype(np.int32)
    skill = np.where(step_mask, rng.integers(0, K, size=(N, T)), 0).astype(np.int32)
    return HLSMData(match, length, step_mask, route, skill, N_CHARS, MAX_LEN, emit_mask=observed,
                    free_mask=step_mask)


def hand_group(rng, length, plans):
    """One :class:`HiddenBlocks` group from ``plans = [(trace, hidden steps, {level: reading
    steps})]`` (the same number J of hidden steps each): below the nodes, in turn 1, 2 or 3
    distinct hidden outputs (a fixed shape, so that the jitted functions compile once), each
    reached by at least one random (r, k); random match counts at every read row."""
    b_n, j = len(plans), len(plans[0][1])
    trace = np.array([p[0] for p in plans], dtype=np.int32)  # [B]
    owner = np.arange(b_n)  # the block of each node of the current level
    nodes, parents, owners, read_node, read_step, read_match = [], [], [], [], [], []
    for level in range(j):
        n_children = 1 + np.arange(owner.size) % 3
        first = np.concatenate([[0], np.cumsum(n_children)[:-1]])
        table = np.empty((owner.size, R * K), dtype=np.int32)  # [n_l, R K]
        for v, (lo, c) in enumerate(zip(first, n_children)):
            table[v, rng.permutation(R * K)] = lo + np.concatenate([np.arange(c), rng.integers(0, c, R * K - c)])
        parent = np.repeat(np.arange(owner.size), n_children)  # [n_{l+1}]
        owner = owner[parent]
        rows = [(v, s) for v in range(parent.size) for s in plans[owner[v]][2].get(level + 1, [])]
        node_q = np.array([v for v, _ in rows], dtype=np.int32).reshape(-1)  # [Q]
        step_q = np.array([s for _, s in rows], dtype=np.int32).reshape(-1)  # [Q]
        nodes.append(table.reshape(-1, R, K))
        parents.append(parent.astype(np.int32))
        owners.append(owner.astype(np.int32))
        read_node.append(node_q)
        read_step.append(step_q)
        read_match.append(random_match(rng, length[trace[owner[node_q]], step_q], mismatch=(0.85, 0.3, 0.0)))
    hidden = np.array([p[1] for p in plans], dtype=np.int32).reshape(b_n, j)
    return HiddenBlocks(trace, hidden, tuple(nodes), tuple(parents), tuple(owners), tuple(read_node),
                        tuple(read_step), tuple(read_match))


# (trace, hidden steps, {level: steps that read the hidden entries after `level` of them})
BLOCK_PLANS = (
    [(0, (0,), {1: [1, 2]}),  # a hidden first step read by the two steps after it
     (2, (1,), {1: [2]})],  # an observed step outside the block, then a hidden one read by the last
    [(1, (0, 1), {2: [2]})],  # two hidden steps in a row, both read by the last
)


def block_data(rng):
    """N traces of depth T with the blocks of ``BLOCK_PLANS`` (the shapes of
    :func:`random_data`, so that the free steps share its compilation)."""
    in_block = np.zeros((N, T), dtype=bool)
    hidden = np.zeros((N, T), dtype=bool)
    for group in BLOCK_PLANS:
        for i, steps, reads in group:
            hidden[i, list(steps)] = True
            in_block[i, list(steps) + [s for ss in reads.values() for s in ss]] = True
    length = np.where(hidden, 0, rng.integers(0, MAX_LEN + 1, size=(N, T))).astype(np.int32)
    emit = ~in_block
    match = np.where(emit[..., None, None], random_match(rng, length), -1).astype(np.int8)
    blocks = tuple(hand_group(rng, length, group) for group in BLOCK_PLANS)
    return HLSMData(match, length, np.ones((N, T), dtype=bool), rng.integers(0, R, size=(N, T)).astype(np.int32),
                    rng.integers(0, K, size=(N, T)).astype(np.int32), N_CHARS, MAX_LEN, emit_mask=emit,
                    free_mask=~in_block, blocks=blocks)


def _log(x):
    with np.errstate(divide="ignore"):
        return np.log(x)


def log_selection(model, params, data, i, t, r, k):
    """log p(r_t, k_t | ·) of every path (``r, k: int[P, depth]``): ``[P]``."""
    cr, ck = data.route_intended[i], data.skill_intended[i]
    if model == "modular":
        pr, pk = params.route_exec[cr[t], r[:, t]], params.skill_exec[ck[t], k[:, t]]
    elif model == "entangled":  # context: the previous intended module, R / K at the first step
        xr, xk = (R, K) if t == 0 else (cr[t - 1], ck[t - 1])
        pr, pk = params.route_exec_ctx[xr, cr[t], r[:, t]], params.skill_exec_ctx[xk, ck[t], k[:, t]]
    else:  # the previous executed module, the start rows R / K at the first step
        xr, xk = (R, K) if t == 0 else (r[:, t - 1], k[:, t - 1])
        pr, pk = params.route_trans[xr, r[:, t]], params.skill_trans[xk, k[:, t]]
    return _log(pr) + _log(pk)


def log_emission(params, m, y_len, u):
    """log of the on-module ((1 - off) p_on(y | e), u = 0) or off-module (off p_off(y), u = 1)
    term of a step of length ``y_len`` with match counts ``m: [P]``: ``[P]``.

    p_on = 0 if the lengths differ (m = -1), else (1 - noise)^m (noise / (A - 1))^(len - m);
    p_off = A^(-len) / (MAX_LEN + 1)."""
    noise, off = params.noise, params.off_module
    on = np.where(m >= 0, np.log1p(-off) + m * np.log1p(-noise) + (y_len - m) * np.log(noise / (N_CHARS - 1)),
                  -np.inf)
    return np.where(u == 1, np.log(off) - y_len * np.log(N_CHARS) - np.log(MAX_LEN + 1), on)


def brute_force(model, params, data, i):
    """Enumerate every joint assignment of (r_t, k_t, u_t) of trace ``i``'s ``d`` steps.

    Returns ``(log p(D_i), joint [d, R, K] = p(r_t, k_t | D), p_off [d] = p(u_t = 1 | D),
    path [(R K)^d] = p(z_1..z_d | D)`` with z_t = r_t K + k_t, the off flags summed out)."""
    d = int(data.step_mask[i].sum())
    assignments = list(itertools.product(range(R), range(K), (0, 1)))  # (r, k, u)
    paths = np.array(list(itertools.product(assignments, repeat=d)))  # [P, d, 3]
    r, k, u = paths[..., 0], paths[..., 1], paths[..., 2]  # [P, d]
    blocks = [(g, b) for g in data.blocks for b in np.flatnonzero(g.trace == i)]
    g, b = blocks[0] if blocks else (None, None)
    hidden = [] if g is None else g.hidden[b].tolist()
    reads = {} if g is None else {s: level for level, s in g.reads()[b]}  # reading step: its level
    node = np.full(paths.shape[0], b)  # [P], the node of the block's tree that the path has reached
    log_p = np.zeros(paths.shape[0])  # [P], log p(path, D_i)
    for t in range(d):
        log_p += log_selection(model, params, data, i, t, r, k)
        m = None
        if t in hidden:  # the executed output moves the path down the tree
            node = g.nodes[hidden.index(t)][node, r[:, t], k[:, t]]
        elif t in reads:  # the match counts on the history the path has built
            level = reads[t] - 1
            rows = zip(g.read_node[level].tolist(), g.read_step[level].tolist())
            row_of = {(v, s): q for q, (v, s) in enumerate(rows)}  # (node, step): read row
            m = g.read_match[level][[row_of[v, t] for v in node.tolist()], r[:, t], k[:, t]]
        elif data.emit[i, t]:
            m = data.match[i, t, r[:, t], k[:, t]]
        if m is None:  # unobserved: on-module, a factor 1
            log_p += np.where(u[:, t] == 1, -np.inf, 0.0)
        else:
            log_p += log_emission(params, m, data.length[i, t], u[:, t])
    top = log_p.max()
    log_z = top + np.log(np.exp(log_p - top).sum())
    w = np.exp(log_p - log_z)  # [P], p(path | D_i)
    z = r * K + k  # [P, d]
    joint = np.stack([np.bincount(z[:, t], w, R * K) for t in range(d)]).reshape(d, R, K)
    p_off = np.array([w[u[:, t] == 1].sum() for t in range(d)])
    path = np.bincount(z @ (R * K) ** np.arange(d - 1, -1, -1), w, (R * K) ** d)
    return log_z, joint, p_off, path


def assert_equals_brute_force(post, model, params, data):
    post = jax.tree.map(np.asarray, post)
    assert post.log_evidence.dtype == np.float64
    for name in ("log_evidence", "route_probs", "skill_probs", "p_off"):
        assert np.isfinite(getattr(post, name)).all(), name
    for i in range(data.n_traces):
        log_z, joint, p_off, path = brute_force(model, params, data, i)
        d = joint.shape[0]
        msg = f"trace {i}"
        np.testing.assert_allclose(post.log_evidence[i], log_z, rtol=REL, atol=ATOL, err_msg=msg)
        np.testing.assert_allclose(post.route_probs[i, :d], joint.sum(-1), rtol=REL, atol=ATOL, err_msg=msg)
        np.testing.assert_allclose(post.skill_probs[i, :d], joint.sum(-2), rtol=REL, atol=ATOL, err_msg=msg)
        np.testing.assert_allclose(post.p_off[i, :d], p_off, rtol=REL, atol=ATOL, err_msg=msg)
        if post.joint_probs is not None:
            np.testing.assert_allclose(post.joint_probs[i, :d], joint, rtol=REL, atol=ATOL, err_msg=msg)
        # a MAP path (ties are real: two selections with equal prior and emission)
        got = post.map_route[i, :d] * K + post.map_skill[i, :d]
        assert path[got @ (R * K) ** np.arange(d - 1, -1, -1)] >= path.max() * (1 - 1e-9), msg
        # padding past the depth
        for probs in (post.route_probs, post.skill_probs, post.p_off):
            assert (probs[i, d:] == 0).all(), msg
        assert (post.map_route[i, d:] == -1).all() and (post.map_skill[i, d:] == -1).all(), msg


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model", MODELS)
def test_exact_equals_brute_force(model, case):
    rng = np.random.default_rng(list(CASES).index(case))
    params = random_params(rng, model, case)
    data = random_data(rng)
    assert_equals_brute_force(exact_posterior(model, params, data), model, params, data)
    assert_equals_brute_force(corpus_posterior(model, params, data), model, params, data)


@pytest.mark.parametrize("case", ["dirichlet-a", "zeros", "tiny-off"])
@pytest.mark.parametrize("model", MODELS)
def test_hidden_blocks_equal_brute_force(model, case):
    rng = np.random.default_rng(100 + list(CASES).index(case))
    params = random_params(rng, model, case)
    data = block_data(rng)
    assert_equals_brute_force(corpus_posterior(model, params, data), model, params, data)


@pytest.mark.parametrize("model", MODELS)
def test_a_changed_parameter_fails_the_comparison(model):
    """The comparison is not vacuous: changing any one parameter (the row of the first step of
    trace 0, noise, off_module) moves the brute-force evidence far outside the tolerance, so
    the implementation at the old parameters fails it."""
    rng = np.random.default_rng(7)
    params = random_params(rng, model, "dirichlet-a")
    # every step observed, of length >= 1, with a match count under every module
    data = random_data(rng, hidden_p=0.0, min_len=1, mismatch=(0.0,))
    got = np.asarray(exact_posterior(model, params, data).log_evidence)  # [N]
    first = {"modular": (data.route_intended[0, 0],), "entangled": (R, data.route_intended[0, 0]),
             "grammar": (R,)}[model]
    route = params[0].copy()
    route[first] = np.roll(route[first], 1)
    for change in ({params._fields[0]: route}, {"noise": params.noise / 2}, {"off_module": params.off_module / 2}):
        changed = params._replace(**change)
        want = np.array([brute_force(model, changed, data, i)[0] for i in range(N)])
        assert not np.allclose(got, want, rtol=REL, atol=ATOL), change.keys()
