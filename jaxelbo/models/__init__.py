"""Models with the contract's ``(Model, Guide, params)`` form.

- :mod:`jaxelbo.models.linear_gaussian`: the linear-Gaussian toy with closed forms (core: jax only).
- :mod:`jaxelbo.models.hierarchical_gaussian`: its two-layer version, ``q(z1|x) q(z2|z1)``, with
  closed forms (core: jax only).
- :mod:`jaxelbo.models.linear_gaussian_ssm`: a linear-Gaussian state-space model with the Kalman
  filter and the exact smoothing proposal, for :func:`jaxelbo.smc_bound` (core: jax only).
- :mod:`jaxelbo.models.vae`: the Burda et al. (2016) VAE in flax NNX. It is imported on first
  access (``jaxelbo.models.vae`` or ``from jaxelbo.models import vae``), so that
  ``import jaxelbo`` never imports flax.
"""

import importlib

from jaxelbo.models import hierarchical_gaussian, linear_gaussian, linear_gaussian_ssm

__all__ = ["hierarchical_gaussian", "linear_gaussian", "linear_gaussian_ssm", "vae"]


def __getattr__(name: str):
    if name == "vae":
        return importlib.import_module("jaxelbo.models.vae")
    raise AttributeError(f"module 'jaxelbo.models' has no attribute {name!r}")
