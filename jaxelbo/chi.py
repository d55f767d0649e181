r"""The chi upper bound, CUBO (Dieng, Tran, Ranganath, Paisley & Blei 2017).

For ``n >= 1``,

.. math:: \mathrm{CUBO}_n(x) = \frac1n \log \mathbb{E}_{q}\big[\tilde w^{\,n}\big]
   = \log p(x) + \frac{n-1}{n} D_n\big(p(z|x) \,\|\, q(z|x)\big) \;\ge\; \log p(x),

with ``D_n`` the Renyi divergence of order n (``n = 2``: the chi-square divergence,
``CUBO_2 = 1/2 log (1 + chi^2(p || q)) + log p(x)``). With the ELBO it brackets the
evidence, ``ELBO <= log p(x) <= CUBO_n`` (the "sandwich").

The Monte Carlo estimate ``1/n log mean_k w~_k^n`` is the variational Renyi bound of
order ``alpha = 1 - n`` (:func:`jaxelbo.renyi`), and :func:`cubo` is built on it with
the sign of the loss turned: an upper bound is *minimised*.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

from jaxelbo import per_site, registry
from jaxelbo._validation import check_count, check_model_guide, check_real
from jaxelbo.objectives import renyi
from jaxelbo.types import Guide, LossFn, Model, PyTree

__all__ = ["CUBO_ESTIMATORS", "cubo"]

#: The estimators of :func:`cubo`.
CUBO_ESTIMATORS = ("reparam", "dreg")


def cubo(model: Model, guide: Guide, *, num_samples: int, n: float = 2.0,
         estimator: str | Mapping[str, str] = "reparam") -> LossFn:
    r"""The chi upper bound ``CUBO_n`` (Dieng et al. 2017, arXiv:1611.00328), to be minimised.

    .. math:: \widehat{\mathrm{CUBO}}_n = \frac1n \log \frac1K \sum_k \tilde w_k^{\,n},
       \qquad \tilde w_k = \frac{p_\theta(x, z_k)}{q_\phi(z_k|x)} .

    **The Monte Carlo estimate is biased low**: by Jensen,
    ``E[CUBO^_n] <= CUBO_n``, so with few samples (or a guide far from the posterior) the
    estimate can fall *below* ``log p(x)``. It converges to ``CUBO_n`` as K grows. The exact
    quantity ``E_q[w~^n] = exp(n CUBO_n)`` is what training drives down; its gradient
    ``n E_q[w~^n grad log w~]`` is estimated in log space.

    Gradients (for ``phi``; ``theta`` always gets ``v_k grad log p(x, z_k)`` with
    ``v = softmax(n log w~)``, although training the model on an upper bound is rarely
    what one wants, so usually only ``params["guide"]`` is stepped):

    - ``reparam``: autodiff of the estimate, ``sum_k v_k d log w~_k / d phi``
      (total derivative through ``z_k``). Per example this is the unbiased gradient
      estimate ``n mean_k w~_k^n grad log w~_k`` of ``E_q[w~^n]`` divided by its own
      positive estimate ``n mean_k w~_k^n`` (the log-sum-exp scaling of Dieng et al.), so
      it is consistent in K, not unbiased.
    - ``dreg``: the doubly-reparameterised form of the same gradient,
      ``sum_k ((1 - n) v_k + n v_k^2) g_k`` with ``g_k = d log w~_k/dz_k dz_k/dphi``,
      from ``d_k = c_k - dc_k/dlog w~_k`` with ``c = v`` (Tucker et al. 2019's identity;
      the Renyi-DReG weights at ``alpha = 1 - n``). It has the same expectation as
      ``reparam`` and is exactly zero at the exact posterior, where every ``g_k`` vanishes.

    Args:
      model: a :class:`~jaxelbo.Model`.
      guide: a reparameterised :class:`~jaxelbo.Guide`.
      num_samples: K >= 1 samples per example.
      n: the order, a float ``>= 1`` (default 2: the chi-square upper bound; 1 gives the
        IWAE estimate of ``log p(x)`` itself).
      estimator: ``reparam`` (default) or ``dreg``; or per site for a mixed guide
        (:mod:`jaxelbo.per_site`), ``{"continuous": "reparam" | "dreg", "discrete": "score" | "vimco"}``:
        the discrete sites get the score-function gradient of the estimate with the baselines
        of :func:`jaxelbo.renyi` at ``alpha = 1 - n`` (unbiased for the gradient of
        ``E[CUBO^_n]``, as ``reparam`` is).

    Returns:
      ``loss_fn(params, rng, x) -> (loss, aux)``, pure and ``jit``-able. **``loss`` is
      ``+mean_b CUBO^_n(x_b)``** (an upper bound is minimised), and ``jax.grad`` of it is the
      chosen estimator; ``aux`` holds ``bound`` ``(B,)`` (the estimate
      ``1/n log mean_k w~_k^n`` per example), ``log_weights`` ``(B, K)``, ``ess`` ``(B,)`` of
      the plain weights and, with >= 25 samples, ``khat`` ``(B,)``, all without gradients.
      Gradients with respect to ``x`` or closed-over arrays are those of the loss value.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> loss_fn = je.cubo(lg.model(), lg.guide(), num_samples=16, n=2.0)
      >>> loss, aux = loss_fn(params, jax.random.key(0), jnp.ones((3, 2)))
      >>> bool(jnp.allclose(aux["bound"], lg.log_marginal(params["model"], jnp.ones((3, 2)))))
      True

    References:
      Dieng, Tran, Ranganath, Paisley & Blei (2017). Variational inference via chi upper
      bound minimization. NeurIPS. arXiv:1611.00328.
      Tucker, Lawson, Gu & Maddison (2019). Doubly reparameterized gradient estimators for
      Monte Carlo objectives. ICLR. arXiv:1810.04152.
    """
    check_model_guide(model, guide)
    k = check_count("num_samples", num_samples)
    n = check_real("n", n)
    if n < 1.0:
        raise ValueError(f"cubo: the order n must be >= 1 (an upper bound), got {n}; "
                         "for orders below 1 use je.renyi, a lower bound")
    if isinstance(estimator, Mapping):  # a per-site estimator: the pathwise part among cubo's, renyi's signals
        spelled = per_site.parse(estimator, CUBO_ESTIMATORS, objective="cubo").name
    elif not isinstance(estimator, str) or estimator not in CUBO_ESTIMATORS:
        raise ValueError(f"objective 'cubo' does not support estimator {estimator!r}; "
                         f"valid choices for cubo: {', '.join(CUBO_ESTIMATORS)}")
    else:
        spelled = estimator
    lower = renyi(model, guide, num_samples=k, alpha=1.0 - n, estimator=estimator)

    def loss_fn(params: dict, rng: jax.Array, x: PyTree) -> tuple[jax.Array, dict]:
        loss, aux = lower(params, rng, x)
        return -loss, aux

    loss_fn.__name__ = f"cubo_{spelled}_loss"
    loss_fn.__doc__ = f"+mean CUBO_{n:g} estimate (minimised); gradient: {spelled} estimator. Returns (loss, aux)."
    return loss_fn


# An upper bound: registry.direction("cubo") == "upper", so the loss is +mean(aux["bound"]).
registry.register("cubo", cubo, estimators=CUBO_ESTIMATORS, keywords={"n": 2.0}, direction="upper")
