"""jaxelbo: variational bounds and their gradient estimators in JAX.

Every objective is a factory returning a pure ``(params, rng, x) -> (loss, aux)``
whose value is minus the mean bound and whose ``jax.grad`` is the chosen estimator.
"""

from importlib import metadata as _metadata

from jaxelbo import models
from jaxelbo.ais import AISResult, BDMCResult, ais_log_likelihood, ais_schedule, bdmc, reverse_ais_log_likelihood
from jaxelbo.chi import cubo
from jaxelbo.diagnostics import (
    ElboSurgery,
    PairedBiasTest,
    elbo_surgery,
    gradient_replicates,
    gradient_snr,
    importance_resample,
    log_likelihood,
    paired_bias_test,
)
from jaxelbo.estimators import ESTIMATORS
from jaxelbo.gaps import InferenceGaps, amortisation_gap
from jaxelbo.objectives import OBJECTIVES, ciwae, elbo, iwae, jvi, make_objective, miwae, piwae, renyi, rws
from jaxelbo.psis import psis_khat
from jaxelbo.smc import Proposal, StateSpaceModel, smc_bound
from jaxelbo.thermodynamic import tvo
from jaxelbo.types import Aux, Estimator, Guide, LossFn, Model, log_joint
from jaxelbo.weights import effective_sample_size, log_weights, normalized_weights

try:  # the version lives in pyproject.toml only
    __version__ = _metadata.version("jaxelbo")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ESTIMATORS",
    "Aux",
    "Estimator",
    "OBJECTIVES",
    "AISResult",
    "BDMCResult",
    "ElboSurgery",
    "Guide",
    "InferenceGaps",
    "LossFn",
    "Model",
    "PairedBiasTest",
    "ais_log_likelihood",
    "ais_schedule",
    "amortisation_gap",
    "bdmc",
    "Proposal",
    "StateSpaceModel",
    "ciwae",
    "cubo",
    "effective_sample_size",
    "elbo",
    "elbo_surgery",
    "gradient_replicates",
    "gradient_snr",
    "importance_resample",
    "iwae",
    "jvi",
    "log_joint",
    "log_likelihood",
    "log_weights",
    "make_objective",
    "miwae",
    "models",
    "normalized_weights",
    "paired_bias_test",
    "piwae",
    "psis_khat",
    "renyi",
    "reverse_ais_log_likelihood",
    "rws",
    "smc_bound",
    "tvo",
]
