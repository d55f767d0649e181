"""Models with the contract's ``(Model, Guide, params)`` form.

- :mod:`jaxelbo.models.linear_gaussian`: the linear-Gaussian toy with closed forms.
- :mod:`jaxelbo.models.vae`: the Burda et al. (2016) VAE in flax NNX.
"""

from jaxelbo.models import linear_gaussian

__all__ = ["linear_gaussian"]

try:  # the VAE needs flax; the toy does not
    from jaxelbo.models import vae  # noqa: F401

    __all__ += ["vae"]
except ImportError:  # pragma: no cover - vae.py not present or flax missing
    pass
