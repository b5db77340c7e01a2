"""The entanglement ρ: zero under a modular truth, away from zero under an entangled one."""
import numpy as np
import pytest

from latentsel.analysis.entanglement import dm_loglik, entanglement
from latentsel.analysis.stepwise import fit_steps
from latentsel.models.registry import default_params
from latentsel.traces.emission import build_data
from latentsel.traces.regimes import bigram_split, generate
from latentsel.traces.simulate import simulate
from latentsel.world import default_world

WORLD = default_world()


def test_dm_loglik_tends_to_the_multinomial():
    rng = np.random.default_rng(0)
    rows = rng.dirichlet(np.ones(4), size=3)
    counts = np.stack([[rng.multinomial(20, r) for r in rows] for _ in range(5)]).astype(float)
    limit = dm_loglik(counts, rows, np.inf)
    assert dm_loglik(counts, rows, 1e9) == pytest.approx(limit, rel=1e-6)
    assert dm_loglik(counts, rows, 1.0) < limit  # overdispersion costs where the counts follow the rows


def _entangled_truth(strength: float):
    """Faithful (0.9) in every context, except that in held-out skill bigrams a share
    ``strength`` of the row moves to another skill."""
    params = default_params("entangled", WORLD, fidelity=0.9, noise=0.05, off_module=0.02)
    rows = np.array(params.skill_exec_ctx)
    held = bigram_split(WORLD.n_skills, 0).labels == 2
    rng = np.random.default_rng(0)
    for p, c in zip(*np.nonzero(held)):
        other = (c + 1 + rng.integers(WORLD.n_skills - 1)) % WORLD.n_skills
        rows[p, c] *= 1 - strength
        rows[p, c, other] += strength
    return params._replace(skill_exec_ctx=rows)


@pytest.mark.parametrize("truth", ["modular", "entangled"])
def test_rho_comes_out_either_way(truth):
    prompts = generate("eval-seen", 300, seed=1) + generate("eval-unseen", 300, seed=2)
    params = (default_params("modular", WORLD, fidelity=0.9, noise=0.05, off_module=0.02) if truth == "modular"
              else _entangled_truth(0.9))
    data = build_data(simulate(prompts, params, truth, WORLD, seed=3), WORLD)
    res = entanglement(data, fit_steps(data, rows="modular").params)
    assert res["converged"] and res["rho_lower"] <= res["rho"] <= res["rho_upper"]
    if truth == "modular":
        assert res["rho_lower"] == 0.0 and res["rho_upper"] < 0.002
    else:
        assert res["rho_lower"] > 0.002  # the modular limit lies outside the interval
