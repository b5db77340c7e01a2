"""The model registry: every layer reads a model's facts from it, so each spec must agree with
its parameter class, its priors and the programs of both backends."""
import numpy as np
import pytest

from latentsel.models.numpyro_models import NUMPYRO_MODELS
from latentsel.models.params import Priors
from latentsel.models.pyro_models import PYRO_MODELS
from latentsel.models.registry import MODELS, default_params, model_spec, params_class, validate_params

R, K = 4, 5


def test_every_model_has_a_program_on_both_backends():
    assert set(NUMPYRO_MODELS) == set(PYRO_MODELS) == set(MODELS)


@pytest.mark.parametrize("model", list(MODELS))
def test_spec_agrees_with_its_parameters(model):
    spec = model_spec(model)
    assert spec.name == model and params_class(model) is spec.params
    assert spec.sites == spec.params._fields and spec.sites[2:] == ("noise", "off_module")
    params = default_params(model, R, K)
    assert tuple(np.shape(a) for a in params[:2]) == spec.row_shapes(R, K)
    validate_params(params, model, R, K)
    for conc, shape in zip(spec.concentration(Priors(), R, K), spec.row_shapes(R, K)):
        assert conc.shape == shape and (conc > 0).all()
    assert spec.uses_program is not spec.chain
    assert not (spec.chain and spec.context)


@pytest.mark.parametrize("model", list(MODELS))
def test_concentrations_follow_the_priors(model):
    spec = model_spec(model)
    conc_r, _ = spec.concentration(Priors(exec_diag=3.0, exec_off=0.25, trans=1.5), R, K)
    if spec.chain:
        assert (conc_r == 1.5).all()
    else:
        rows = conc_r.reshape(-1, R, R)
        assert (np.diagonal(rows, axis1=-2, axis2=-1) == 3.0).all()
        assert ((rows == 3.0).sum() == rows.shape[0] * R) and ((rows == 0.25).sum() == rows.shape[0] * R * (R - 1))


def test_an_unknown_model_is_named():
    with pytest.raises(KeyError, match="unknown model 'hmm'; choose from modular, entangled, grammar"):
        model_spec("hmm")
    with pytest.raises(KeyError, match="unknown model"):
        default_params("hmm", R, K)


@pytest.mark.parametrize("model", list(MODELS))
def test_default_params_of_a_world_with_one_routing(model):
    params = default_params(model, 1, 3, fidelity=0.9)
    validate_params(params, model, 1, 3)
