"""The conjugate posterior of the global parameters given the exact E-step.

Given the selections, the execution (or transition) rows, ``noise`` and ``off_module`` are
conjugate: a row's posterior is Dirichlet(prior + counts of the selections it generated), and
``noise`` / ``off_module`` are Beta(prior + counts). The selections are latent, so the counts
are replaced by their expectations under the exact posterior at a point estimate θ̂ (the EM
MAP): q(θ) = Π_rows Dirichlet(α + E[n | D, θ̂]) · Beta(·) · Beta(·), one variational-Bayes update
of θ with the selections at their exact posterior under θ̂. It is the exact posterior when the
selections are known (every step has a single consistent module); where they are not, it ignores
how the selections' posterior moves with θ, which is why the identifiability experiments check it
against NUTS.

A row the data never reach gets zero counts, so it stays exactly at its prior.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import digamma, gammaln

from latentsel.inference.corpus import CHUNK
from latentsel.inference.em import e_step
from latentsel.models.data import HLSMData
from latentsel.models.params import Priors
from latentsel.models.registry import model_spec, params_class

__all__ = ["ConjugatePosterior", "conjugate_posterior", "dirichlet_kl", "beta_kl"]


class ConjugatePosterior(NamedTuple):
    """Concentrations of q(θ).

    Attributes:
        model: "modular", "entangled" or "grammar".
        route: Dirichlet concentrations shaped like the model's routing rows
            (``[R, R]``, ``[R + 1, R, R]`` or ``[R + 1, R]``); skill: likewise for skills.
        noise: ``[2]``, Beta(a, b) of noise; off_module: ``[2]``, Beta(a, b) of off_module.
        prior: the same four arrays for the prior (a :class:`ConjugatePosterior` with
            ``prior=None``).
    """

    model: str
    route: np.ndarray
    skill: np.ndarray
    noise: np.ndarray
    off_module: np.ndarray
    prior: "ConjugatePosterior | None" = None

    def mean(self):
        """E_q[θ] as the model's parameter NamedTuple."""
        return params_class(self.model)(self.route / self.route.sum(-1, keepdims=True),
                                        self.skill / self.skill.sum(-1, keepdims=True),
                                        float(self.noise[0] / self.noise.sum()),
                                        float(self.off_module[0] / self.off_module.sum()))

    def sd(self):
        """The marginal standard deviation of every entry, shaped like :meth:`mean`."""
        def dirichlet_sd(a):
            a0 = a.sum(-1, keepdims=True)
            m = a / a0
            return np.sqrt(m * (1 - m) / (a0 + 1))

        def beta_sd(ab):
            a0 = ab.sum()
            m = ab[0] / a0
            return float(np.sqrt(m * (1 - m) / (a0 + 1)))

        return params_class(self.model)(dirichlet_sd(self.route), dirichlet_sd(self.skill), beta_sd(self.noise),
                                        beta_sd(self.off_module))

    def sample(self, shape: tuple[int, ...], seed: int = 0):
        """Independent draws of θ: the parameter NamedTuple with ``shape`` prepended to every field
        (rows by normalized Gamma variates)."""
        rng = np.random.default_rng(seed)
        shape = tuple(shape)

        def dirichlet(a):
            g = rng.standard_gamma(np.broadcast_to(a, shape + a.shape))
            return g / g.sum(-1, keepdims=True)

        return params_class(self.model)(dirichlet(self.route), dirichlet(self.skill),
                                        rng.beta(self.noise[0], self.noise[1], size=shape),
                                        rng.beta(self.off_module[0], self.off_module[1], size=shape))

    def kl_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """KL(q ‖ prior) of every routing row and every skill row: the contraction per row,
        shaped like the rows' leading axes (``[R]`` and ``[K]`` for modular)."""
        if self.prior is None:
            raise ValueError("this is the prior itself; it has no prior to compare with")
        return dirichlet_kl(self.route, self.prior.route), dirichlet_kl(self.skill, self.prior.skill)


def prior_concentrations(model: str, n_routes: int, n_skills: int, priors: Priors = Priors()) -> ConjugatePosterior:
    conc_r, conc_k = model_spec(model).concentration(priors, n_routes, n_skills)
    return ConjugatePosterior(model, conc_r, conc_k, np.asarray(priors.noise, float), np.asarray(priors.off_module, float))


def conjugate_posterior(model: str, params, data: HLSMData, priors: Priors = Priors(), *, chunk: int = CHUNK
                        ) -> ConjugatePosterior:
    """q(θ) = Dirichlet / Beta(prior + E[counts | D, params]), the counts from the exact E-step
    (hidden-step blocks included)."""
    prior = prior_concentrations(model, data.n_routes, data.n_skills, priors)
    stats = e_step(model, params, data, chunk)
    return ConjugatePosterior(
        model,
        prior.route + np.asarray(stats.route_counts, float),
        prior.skill + np.asarray(stats.skill_counts, float),
        prior.noise + np.asarray(stats.noise_counts, float),
        prior.off_module + np.asarray(stats.off_counts, float),
        prior,
    )


def dirichlet_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KL(Dirichlet(a) ‖ Dirichlet(b)) over the last axis: ``[..., n], [..., n] -> [...]``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    a0, b0 = a.sum(-1), b.sum(-1)
    return (gammaln(a0) - gammaln(a).sum(-1) - gammaln(b0) + gammaln(b).sum(-1)
            + ((a - b) * (digamma(a) - digamma(a0)[..., None])).sum(-1))


def beta_kl(a: np.ndarray, b: np.ndarray) -> float:
    """KL(Beta(a) ‖ Beta(b)) for ``a``, ``b`` = (α, β) pairs."""
    return float(dirichlet_kl(np.asarray(a, float), np.asarray(b, float)))
