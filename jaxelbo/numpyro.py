r"""NumPyro models and guides as a jaxelbo :class:`~jaxelbo.Model` and :class:`~jaxelbo.Guide`.

Write the model and the guide as ordinary NumPyro functions for ONE example (local latents
as ``numpyro.sample`` sites, the data as observed sites, ``numpyro.param`` sites in the
guide and, if it has parameters, in the model), hand them to :func:`from_numpyro`, and
every jaxelbo objective and estimator applies: IWAE with DReG, VIMCO for discrete
latents, and the rest. How the pieces map:

- ``Model.log_prior(theta, z)`` sums the log-densities of the model's latent sites;
- ``Model.log_likelihood(theta, x, z)`` sums its observed sites (``numpyro.factor`` sites
  count as observed);
- ``Guide.sample(phi, rng, x)`` runs the guide under ``numpyro.handlers.seed`` and returns
  ``z``, a dict ``{site name: value}`` of its latent sites (a pytree);
- ``Guide.log_prob(phi, x, z)`` runs the guide with the values of ``z`` substituted and
  sums the log-densities of its sites;
- every ``numpyro.param`` travels *unconstrained* in ``params``, mapped to its constraint
  by NumPyro's own ``biject_to`` (as NumPyro's SVI does): ``params = {"model": {name: u},
  "guide": {name: u}}``. :func:`constrained_params` maps them to NumPyro's values and
  :func:`unconstrained_params` back.

The batch ``x`` that the losses take is the example arguments with a leading batch axis
B: an array when the model takes one argument, a tuple of arrays when it takes several.

Global latents (one set of latents for a whole data set, e.g. the weights of a Bayesian
regression) are one example: pass the whole data set as a batch of one, ``X[None]``.

Discrete latents: a guide site whose distribution is not reparameterisable
(``has_rsample`` is false, e.g. ``Categorical``) works with the score-function estimators
``score`` and ``vimco``; a pathwise estimator (``reparam``, ``stl``, ``dreg``) raises an
error naming the site when it is differentiated. Such values travel in ``z`` as floats and
are cast back to the site's integer type inside the model and the guide.

Example:
  >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
  >>> import jaxelbo as je
  >>> from jaxelbo.numpyro import from_numpyro
  >>> def model(x):                                   # one example x of shape (2,)
  ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
  ...     numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
  >>> def guide(x):
  ...     a = numpyro.param("a", 0.5)
  ...     s = numpyro.param("s", 0.7, constraint=dist.constraints.positive)
  ...     numpyro.sample("z", dist.Normal(a * x, s).to_event(1))
  >>> model_, guide_, params = from_numpyro(model, guide, jax.random.key(0), jnp.zeros(2))
  >>> sorted(params["guide"])                         # "s" is stored as log(s)
  ['a', 's']
  >>> loss_fn = je.iwae(model_, guide_, num_samples=8, estimator="dreg")
  >>> x = jnp.ones((16, 2))                           # a batch of 16 examples
  >>> loss, aux = jax.jit(loss_fn)(params, jax.random.key(1), x)
  >>> aux["bound"].shape
  (16,)

References:
  Phan, Pradhan & Jankowiak (2019), "Composable effects for flexible and accelerated
  probabilistic programming in NumPyro", arXiv:1912.11554.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

try:
    from numpyro import handlers
    from numpyro.distributions import Delta, constraints
    from numpyro.distributions.transforms import biject_to
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("jaxelbo.numpyro needs NumPyro: pip install 'jaxelbo[numpyro]'") from e

from jaxelbo.types import Guide, Model, PyTree

__all__ = ["constrained_params", "from_numpyro", "unconstrained_params"]


# --------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------


def _call_args(x: Any, num_args: int) -> tuple:
    """The example arguments of one example ``x`` (one argument, or a tuple of them)."""
    if num_args == 1:
        return (x,)
    if not isinstance(x, tuple) or len(x) != num_args:
        raise ValueError(f"the model takes {num_args} example arguments, so x must be a tuple of {num_args} "
                         f"batches; got {type(x).__name__}")
    return x


def _trace(fn: Callable, args: tuple, substitute_fn: Callable | None = None,
           rng: jax.Array | None = None) -> dict:
    if substitute_fn is not None:
        fn = handlers.substitute(fn, substitute_fn=substitute_fn)
    if rng is not None:
        fn = handlers.seed(fn, rng)
    return handlers.trace(fn).get_trace(*args)


def _is_latent(site: dict) -> bool:
    return site["type"] == "sample" and not site["is_observed"]


def _is_delta(fn: Any) -> bool:
    """A (possibly masked, expanded or independent-wrapped) ``Delta``: a deterministic site."""
    while fn is not None:
        if isinstance(fn, Delta):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def _site_log_prob(site: dict) -> jax.Array:
    """``sum log p(value)`` of one sample site, scaled as NumPyro scales it (plates, ``scale``)."""
    fn, value = site["fn"], site["value"]
    log_prob = fn.log_prob(value, site["intermediates"]) if site.get("intermediates") else fn.log_prob(value)
    if site.get("scale") is not None:
        log_prob = site["scale"] * log_prob
    return jnp.sum(log_prob)


def _sum(terms: list[jax.Array]) -> jax.Array:
    return sum(terms, start=jnp.zeros((), jax.dtypes.canonicalize_dtype(jnp.float64)))


def _substitution(params: dict, z: dict, skip_delta: bool = False, params_too: bool = True) -> Callable:
    """Values for ``param`` sites from ``params`` and for latent sites from ``z``."""
    def fn(msg: dict):
        if msg["type"] == "param":
            if not params_too:
                return None
            return params.get(msg["name"])
        if msg["type"] == "sample" and not msg["is_observed"]:
            if skip_delta and _is_delta(msg["fn"]):
                return None  # recomputed from the sites it depends on
            return z.get(msg["name"])
        return None

    return fn


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


def _param_transforms(trace: dict) -> dict[str, Any]:
    """``{name: biject_to(constraint)}`` for the ``numpyro.param`` sites of a trace."""
    return {name: biject_to(site["kwargs"].get("constraint", constraints.real))
            for name, site in trace.items() if site["type"] == "param"}


def _apply(transform: Any, value: PyTree) -> PyTree:
    return jax.tree_util.tree_map(transform, value)


def _constrain(unconstrained: dict, transforms: dict) -> dict:
    return {name: _apply(transforms[name], u) for name, u in unconstrained.items()}


def _strong(a: Any) -> jax.Array:
    """An array with a fixed dtype (a Python-float init value would give a weakly typed one)."""
    a = jnp.asarray(a)
    return jnp.array(a, dtype=a.dtype)


def _unconstrain_value(transform: Any, value: PyTree) -> PyTree:
    """``transform.inv`` leaf by leaf: a parameter may be any pytree (``numpyro.module``'s are)."""
    return _apply(lambda v: _strong(transform.inv(_strong(v))), value)


def _unconstrain(trace: dict, transforms: dict) -> dict:
    return {name: _unconstrain_value(transforms[name], trace[name]["value"]) for name in transforms}


def _traces(model_fn: Callable, guide_fn: Callable, rng: jax.Array, example_args: tuple) -> tuple[dict, dict]:
    """The guide's trace, and the model's with the guide's latent values substituted.

    The model's latent sites are never sampled, so an improper prior (``ImproperUniform``,
    which has no sampler) traces as well as a proper one.
    """
    rng_model, rng_guide = jax.random.split(rng)
    guide_trace = _trace(guide_fn, example_args, rng=rng_guide)
    values = {n: s["value"] for n, s in guide_trace.items() if _is_latent(s)}
    model_trace = _trace(model_fn, example_args, _substitution({}, values, params_too=False), rng=rng_model)
    return model_trace, guide_trace


def _unwrap(constraint: Any) -> Any:
    while hasattr(constraint, "base_constraint"):
        constraint = constraint.base_constraint
    return constraint


def _check_supports(model_trace: dict, guide_trace: dict, names: list[str]) -> None:
    """Refuse a guide site whose support is not the model site's (a Normal for a HalfNormal)."""
    for name in names:
        model_fn, guide_fn = model_trace[name]["fn"], guide_trace[name]["fn"]
        if _is_delta(guide_fn):
            continue  # a point value (AutoDelta): its support says nothing
        want, have = _unwrap(model_fn.support), _unwrap(guide_fn.support)
        if isinstance(want, type(constraints.real)) or constraints.is_dependent(want):
            continue
        try:
            same = bool(want == have)
        except Exception:  # constraints with array bounds: do not guess
            continue
        if not same:
            raise ValueError(f"guide site {name!r} has support {have} but the model's {type(model_fn).__name__} "
                             f"site has support {want}: samples outside it give -inf or NaN log-weights; give the "
                             f"guide a distribution on {want} (e.g. a LogNormal or a TransformedDistribution with "
                             f"biject_to(support)), or use an autoguide")


def _check_observed_shapes(trace: dict) -> None:
    """Refuse an observed value that its distribution broadcasts (its log-density counted many times)."""
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        fn = site["fn"]
        value_shape = tuple(jnp.shape(site["value"]))
        dist_shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
        if value_shape != dist_shape and math.prod(dist_shape) > math.prod(value_shape):
            plates = [f.name for f in site.get("cond_indep_stack", [])]
            inside = f" (inside plates {plates})" if plates else ""
            raise ValueError(f"observed site {name!r} has shape {value_shape} but its distribution{inside} has "
                             f"shape {dist_shape}: its log-density would be counted "
                             f"{math.prod(dist_shape) // max(math.prod(value_shape), 1)} times; a model written for a "
                             f"whole data set takes the data set, with data_plate= naming its data plate")


def constrained_params(params: dict, model_fn: Callable, guide_fn: Callable, *example_args: Any) -> dict:
    """Map ``params`` from :func:`from_numpyro` to NumPyro's constrained parameter values.

    Args:
      params: ``{"model": {name: u}, "guide": {name: u}}`` with unconstrained values.
      model_fn, guide_fn, example_args: as given to :func:`from_numpyro`.

    Returns:
      One flat dict ``{name: value}`` of constrained values, the layout NumPyro's
      ``SVI.get_params``, ``Predictive(params=...)`` and ``ELBO.loss(rng, params, ...)``
      use.
    """
    model_trace, guide_trace = _traces(model_fn, guide_fn, jax.random.key(0), example_args)
    return {**_constrain(params["model"], _param_transforms(model_trace)),
            **_constrain(params["guide"], _param_transforms(guide_trace))}


def unconstrained_params(values: dict, model_fn: Callable, guide_fn: Callable, *example_args: Any) -> dict:
    """The inverse of :func:`constrained_params`: NumPyro's parameter values in jaxelbo's layout.

    Takes a flat dict of constrained values (e.g. ``svi.get_params(svi_state)`` from a NumPyro
    SVI run of the same model and guide, written for a batch inside a plate) and returns
    ``{"model": {name: u}, "guide": {name: u}}`` as :func:`from_numpyro` lays it out, so a
    NumPyro-trained guide can be scored with jaxelbo's bounds and diagnostics, or training can
    continue with another estimator.

    Args:
      values: ``{name: constrained value}`` for every parameter of the model and the guide.
      model_fn, guide_fn, example_args: as given to :func:`from_numpyro`.

    Returns:
      ``{"model": {name: u}, "guide": {name: u}}``, with ``u = biject_to(constraint).inv(value)``.
    """
    model_trace, guide_trace = _traces(model_fn, guide_fn, jax.random.key(0), example_args)
    out = {}
    for group, trace in (("model", model_trace), ("guide", guide_trace)):
        transforms = _param_transforms(trace)
        missing = sorted(set(transforms) - set(values))
        if missing:
            raise ValueError(f"values has no entry for the {group} parameters {missing}")
        out[group] = {name: _unconstrain_value(t, values[name]) for name, t in transforms.items()}
    return out


# --------------------------------------------------------------------------------------
# The bridge
# --------------------------------------------------------------------------------------


def _pathwise_guard(sites: list[str]) -> Callable:
    """Identity whose backward pass raises: pathwise gradients cannot flow through these sites."""
    message = (f"guide sites {sites} are not reparameterisable (has_rsample is False): a pathwise "
               "estimator (reparam, stl, dreg) cannot differentiate through them; use estimator='score' "
               "or 'vimco'")

    @jax.custom_vjp
    def guard(value, phi):  # phi: so that differentiating with respect to phi reaches the backward pass
        return value

    def fwd(value, phi):
        return value, None

    def bwd(_, cotangent):
        raise ValueError(message)

    guard.defvjp(fwd, bwd)
    return guard


def from_numpyro(model_fn: Callable, guide_fn: Callable, rng: jax.Array,
                 *example_args: Any) -> tuple[Model, Guide, dict]:
    r"""A jaxelbo model, guide and initial parameters from a NumPyro model and guide.

    The per-example log-weight is the NumPyro log-joint minus the guide's log-density,

    .. math:: \log \tilde w = \sum_{\text{latent } s} \log p(z_s \mid \cdot)
       + \sum_{\text{observed } s} \log p(x_s \mid \cdot) - \sum_{s \in \text{guide}} \log q(z_s \mid \cdot),

    each site scaled as NumPyro scales it (plates with ``subsample_size``,
    ``handlers.scale``, masks). ``log_prior`` evaluates the latent sites at
    ``example_args``; when a latent site's distribution depends on the example's data,
    ``log_likelihood`` carries the difference, so ``log_prior + log_likelihood`` is always
    the exact log-joint of the example (when none does, as usual, that difference is
    exactly zero and ``log_likelihood`` is the sum of the observed sites).

    Args:
      model_fn: a NumPyro model for one example, called as ``model_fn(*example_args)``.
      guide_fn: a NumPyro guide with the same arguments: a function, or an autoguide such
        as ``numpyro.infer.autoguide.AutoNormal(model_fn)``. Every latent site of the model
        must be a site of the guide; extra guide sites (auxiliary ones) are allowed.
      rng: a PRNG key, used to run both once and initialise their parameters.
      *example_args: the arguments of one example, without a batch axis (at least one).

    Returns:
      ``(model, guide, params)``. ``params = {"model": {name: u}, "guide": {name: u}}``
      holds every ``numpyro.param`` of the model and the guide, unconstrained
      (``u = biject_to(constraint).inv(value)``). The losses take ``x`` as the example
      arguments with a leading batch axis: the array itself for one argument, a tuple for
      several. ``z`` is a dict ``{site: value}`` of the guide's latent sites.

    Raises:
      ValueError: no example arguments, no latent sites, a model latent site missing from
        the guide, or a parameter name shared by the model and the guide.
    """
    if not example_args:
        raise ValueError("from_numpyro needs the arguments of one example (at least one), "
                         "e.g. from_numpyro(model, guide, rng, x_train[0])")
    num_args = len(example_args)
    model_trace, guide_trace = _traces(model_fn, guide_fn, rng, example_args)
    model_latents = [n for n, s in model_trace.items() if _is_latent(s)]
    guide_latents = [n for n, s in guide_trace.items() if _is_latent(s)]
    if not model_latents:
        raise ValueError("the model has no latent sample sites (every numpyro.sample site is observed)")
    missing = [n for n in model_latents if n not in guide_trace]
    if missing:
        raise ValueError(f"model latent sites {missing} have no site of the same name in the guide "
                         f"(guide sites: {guide_latents})")
    _check_supports(model_trace, guide_trace, model_latents)
    _check_observed_shapes(model_trace)
    model_transforms, guide_transforms = _param_transforms(model_trace), _param_transforms(guide_trace)
    shared = sorted(set(model_transforms) & set(guide_transforms))
    if shared:
        raise ValueError(f"numpyro.param names {shared} appear in both the model and the guide; "
                         "give the model's and the guide's parameters different names")

    def integer_dtype(site):
        dtype = jnp.result_type(site["value"])
        return dtype if (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_) else None

    model_ints = {n: d for n in model_latents if (d := integer_dtype(model_trace[n])) is not None}
    guide_ints = {n: d for n in guide_latents if (d := integer_dtype(guide_trace[n])) is not None}
    not_reparam = [n for n in guide_latents if not guide_trace[n]["fn"].has_rsample]
    guard = _pathwise_guard(not_reparam)
    float_dtype = jax.dtypes.canonicalize_dtype(jnp.float64)

    def cast(z: dict, names: list[str], ints: dict) -> dict:
        missing_z = [n for n in names if n not in z]
        if missing_z:
            raise ValueError(f"z has no value for latent sites {missing_z}; z must be what guide.sample returns "
                             f"(sites {guide_latents})")
        return {n: (z[n].astype(ints[n]) if n in ints else z[n]) for n in names}

    def latent_log_prob(theta: dict, args: tuple, z: dict) -> tuple[jax.Array, dict]:
        trace = _trace(model_fn, args, _substitution(_constrain(theta, model_transforms),
                                                     cast(z, model_latents, model_ints)))
        return _sum([_site_log_prob(trace[n]) for n in model_latents]), trace

    def log_prior(theta: dict, z: dict) -> jax.Array:
        return latent_log_prob(theta, example_args, z)[0]

    def log_likelihood(theta: dict, x: Any, z: dict) -> jax.Array:
        latent, trace = latent_log_prob(theta, _call_args(x, num_args), z)
        observed = _sum([_site_log_prob(s) for s in trace.values() if s["type"] == "sample" and s["is_observed"]])
        return observed + (latent - log_prior(theta, z))

    def sample(phi: dict, rng: jax.Array, x: Any) -> dict:
        trace = _trace(guide_fn, _call_args(x, num_args), _substitution(_constrain(phi, guide_transforms), {}),
                       rng=rng)
        z = {n: trace[n]["value"] for n in guide_latents}
        for n in not_reparam:
            z[n] = guard(jnp.asarray(z[n]).astype(float_dtype), phi)
        return z

    def log_prob(phi: dict, x: Any, z: dict) -> jax.Array:
        sub = cast(z, [n for n in guide_latents if not _is_delta(guide_trace[n]["fn"])], guide_ints)
        trace = _trace(guide_fn, _call_args(x, num_args),
                       _substitution(_constrain(phi, guide_transforms), sub, skip_delta=True))
        total = _sum([_site_log_prob(trace[n]) for n in guide_latents])
        # A path for a pathwise gradient to reach the guard of a discrete site (its value
        # enters the densities only through an integer cast, which has no derivative).
        for n in not_reparam:
            total = total + 0.0 * jnp.sum(z[n])
        return total

    params = {"model": _unconstrain(model_trace, model_transforms),
              "guide": _unconstrain(guide_trace, guide_transforms)}
    return (Model(log_prior=log_prior, log_likelihood=log_likelihood),
            Guide(sample=sample, log_prob=log_prob), params)

