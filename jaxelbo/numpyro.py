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
``score`` and ``vimco``, and, beside reparameterised sites, with a per-site estimator such
as ``estimator={"continuous": "dreg", "discrete": "vimco"}`` (:mod:`jaxelbo.per_site`;
the bridge fills :attr:`~jaxelbo.Guide.reparameterized` from ``has_rsample`` and
:attr:`~jaxelbo.Guide.discrete_log_prob` from those sites' densities). A plain pathwise
estimator (``reparam``, ``stl``, ``dreg``) raises at trace time, naming the site. Such
values travel in ``z`` as floats and are cast back to the site's integer type inside the
model and the guide.

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
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

try:
    from numpyro import handlers
    from numpyro.distributions import Delta, constraints
    from numpyro.distributions.transforms import biject_to
    from numpyro.primitives import Messenger
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("jaxelbo.numpyro needs NumPyro: pip install 'jaxelbo[numpyro]'") from e

from jaxelbo.types import Guide, Model, PyTree

__all__ = ["constrained_params", "from_numpyro", "global_local_iwae", "unconstrained_params"]


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


class _LastSample(Messenger):
    """Remembers the sample site being processed (to name one that cannot be sampled)."""

    def __init__(self, fn: Callable) -> None:
        self.site: tuple[str, Any] | None = None
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "sample":
            self.site = (msg["name"], msg["fn"])


def _trace(fn: Callable, args: tuple, substitute_fn: Callable | None = None,
           rng: jax.Array | None = None) -> dict:
    if substitute_fn is not None:
        fn = handlers.substitute(fn, substitute_fn=substitute_fn)
    if rng is not None:
        fn = handlers.seed(fn, rng)
    last = _LastSample(fn)
    try:
        return handlers.trace(last).get_trace(*args)
    except NotImplementedError as e:  # a distribution without a sampler (ImproperUniform) raises it bare
        if str(e) or last.site is None:
            raise
        name, dist_fn = last.site
        raise ValueError(f"sample site {name!r} ({type(dist_fn).__name__}) cannot be sampled (an improper "
                         f"prior?): the bridge draws every latent from the guide, so the guide needs a proper site "
                         f"{name!r}") from None


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


class _Declaration(dict):
    """``{site: reparameterised?}``, hashable so that the bridged :class:`~jaxelbo.Guide` stays hashable."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


class _DataPlate(Messenger):
    """Sets the indices of the data plate: all of them, or the first only (one data point)."""

    def __init__(self, fn: Callable, name: str, one: bool) -> None:
        self.name, self.one = name, one
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "plate" and msg["name"] == self.name:
            size = msg["args"][0]
            msg["value"] = jnp.arange(1 if self.one else size)
            msg["args"] = (size, None)


class _Layout(NamedTuple):
    """How one example ``x`` of the losses becomes the arguments of a NumPyro call."""

    call_args: Callable[[Any], tuple]     # one example -> the model's arguments
    first: tuple                          # the arguments of the first example
    example_shapes: list                  # the shapes one example's arrays must have
    plate: str | None                     # the data plate, or None: no plate is read
    size: int                             # the data plate's size N (1 without one)
    wrap: Callable[[Callable], Callable]  # fn -> fn run at one data point


def _shapes(x: Any) -> list:
    return [tuple(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(x)]


def _check_example(x: Any, layout: _Layout) -> None:
    """Trace-time check that one example ``x`` has the shapes of the example given to the bridge."""
    layout.call_args(x)  # the number of arguments first
    got = _shapes(x)
    if got != layout.example_shapes:
        what = ("the data arguments' rows" if layout.plate else "the example given to from_numpyro")
        lost = len(got) == len(layout.example_shapes) and all(
            len(g) + 1 == len(w) for g, w in zip(got, layout.example_shapes, strict=True))
        hint = ("; the batch seems to have lost an axis: x needs a leading batch axis B on top of one example"
                if lost else "; is x a batch with a leading axis B, of examples shaped as the one given?")
        raise ValueError(f"one example of x has shapes {got}, but {what} had shapes {layout.example_shapes}{hint}")


def _example_layout(example_args: tuple) -> _Layout:
    num_args = len(example_args)
    return _Layout(call_args=lambda x: _call_args(x, num_args), first=example_args,
                   example_shapes=_shapes(example_args[0] if num_args == 1 else tuple(example_args)),
                   plate=None, size=1, wrap=lambda fn: fn)


def _is_data(arg: Any, size: int) -> bool:
    """An array (or a dict of arrays) with a leading axis of the data plate's size."""
    leaves = list(arg.values()) if isinstance(arg, dict) and arg else [arg]
    return all(hasattr(a, "shape") and len(a.shape) >= 1 and a.shape[0] == size for a in leaves)


def _plate_layout(model_fn: Callable, guide_fn: Callable, rng: jax.Array, args: tuple, plate: str) -> _Layout:
    """The data arguments (leading axis N = the data plate's size) and one-data-point calls."""
    model_trace, _ = _traces(_DataPlate(model_fn, plate, one=False), _DataPlate(guide_fn, plate, one=False),
                             rng, args)
    site = model_trace.get(plate)
    if site is None or site["type"] != "plate":
        plates = [n for n, s in model_trace.items() if s["type"] == "plate"]
        raise ValueError(f"data_plate={plate!r}, but the model has no plate of that name (its plates: {plates})")
    size = int(site["args"][0])
    positions = [i for i, a in enumerate(args) if _is_data(a, size)]
    if not positions:
        raise ValueError(f"no argument of the model has a leading axis of the data plate's size {size}: pass the "
                         f"whole data set (argument shapes: {[jnp.shape(a) for a in args]})")

    def call_args(x: Any) -> tuple:
        rows = (x,) if len(positions) == 1 else x
        if len(positions) > 1 and (not isinstance(x, tuple) or len(x) != len(positions)):
            raise ValueError(f"the model has {len(positions)} data arguments (positions {positions}), so x must be "
                             f"a tuple of {len(positions)} batches; got {type(x).__name__}")
        out = list(args)
        for i, row in zip(positions, rows, strict=True):
            out[i] = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], row)
        return tuple(out)

    first = tuple(jax.tree_util.tree_map(lambda a: a[0], args[i]) for i in positions)
    first_x = first[0] if len(positions) == 1 else first
    return _Layout(call_args=call_args, first=call_args(first_x), example_shapes=_shapes(first_x),
                   plate=plate, size=size, wrap=lambda fn: _DataPlate(fn, plate, one=True))


def _in_plate(site: dict, plate: str | None) -> bool:
    return plate is not None and any(f.name == plate for f in site.get("cond_indep_stack", []))


def _plate_axis(site: dict, plate: str | None) -> int | None:
    """The axis of a site's value that the data plate adds (size 1 at one data point), or None."""
    frames = [f for f in site.get("cond_indep_stack", []) if plate is not None and f.name == plate]
    if not frames:
        return None
    axis = frames[0].dim - site["fn"].event_dim
    return axis if jnp.ndim(site["value"]) >= -axis else None


def _plate_factor(trace: dict, plate: str | None) -> float:
    """``N / 1``: the scale NumPyro gives the sites of the data plate at one data point."""
    if plate is None or plate not in trace:
        return 1.0
    site = trace[plate]
    return float(site["args"][0]) / float(jnp.shape(site["value"])[0])


def _check_no_subsampling(trace: dict) -> None:
    for name, site in trace.items():
        if site["type"] == "plate" and jnp.shape(site["value"])[0] != site["args"][0]:
            raise ValueError(f"the model subsamples plate {name!r} (size {site['args'][0]}, subsample_size "
                             f"{jnp.shape(site['value'])[0]}): pass the whole data set and data_plate={name!r}")


def from_numpyro(model_fn: Callable, guide_fn: Callable, rng: jax.Array,
                 *example_args: Any, data_plate: str | None = None) -> tuple[Model, Guide, dict]:
    r"""A jaxelbo model, guide and initial parameters from a NumPyro model and guide.

    The per-example log-weight is the NumPyro log-joint minus the guide's log-density,

    .. math:: \log \tilde w = \sum_{\text{latent } s} \log p(z_s \mid \cdot)
       + \sum_{\text{observed } s} \log p(x_s \mid \cdot) - \sum_{s \in \text{guide}} \log q(z_s \mid \cdot),

    each site scaled as NumPyro scales it (``handlers.scale``, masks). ``log_prior``
    evaluates the latent sites at the first example; when a latent site's distribution
    depends on the example's data, ``log_likelihood`` carries the difference, so
    ``log_prior + log_likelihood`` is always the exact log-joint of the example (when none
    does, as usual, that difference is exactly zero and ``log_likelihood`` is the sum of the
    observed sites).

    Two ways to write the model:

    - **for one example** (``data_plate=None``): ``example_args`` are one example's
      arguments; the losses take them with a leading batch axis B.
    - **for the whole data set**, as NumPyro users write it, with a data plate
      (``numpyro.plate("data", N)``, with or without ``subsample_size``):
      ``data_plate="data"`` and ``example_args`` the whole data set. The arguments with a
      leading axis of size N are the data; the others (eight schools' ``J``, sizes,
      flags) stay static Python values. One example is one data point: the sites inside
      the plate are local, each data point's log-weight is its own (unscaled; the
      subsampling scale ``N / B`` is NumPyro's, jaxelbo's losses average over the
      batch), sites outside the plate that are observed or ``numpyro.factor`` terms are
      shared out as ``1/N`` per data point, and ``z`` holds one data point's values
      (the plate axis removed). The losses take ``x`` as the data arguments' rows: an
      array, or a tuple in argument order for several. Latent sites outside the plate
      (global latents) are not one data point's: they are refused.

    Args:
      model_fn: a NumPyro model, called as ``model_fn(*example_args)``.
      guide_fn: a NumPyro guide with the same arguments: a function, or an autoguide such
        as ``numpyro.infer.autoguide.AutoNormal(model_fn)``. Every latent site of the model
        must be a site of the guide; extra guide sites (auxiliary ones) are allowed.
      rng: a PRNG key, used to run both once and initialise their parameters.
      *example_args: the arguments of one example, without a batch axis (at least one);
        with ``data_plate``, the arguments of the whole data set.
      data_plate: the name of the model's data plate, or None (the model is written for
        one example).

    Returns:
      ``(model, guide, params)``. ``params = {"model": {name: u}, "guide": {name: u}}``
      holds every ``numpyro.param`` of the model and the guide, unconstrained
      (``u = biject_to(constraint).inv(value)``). ``z`` is a dict ``{site: value}`` of
      the guide's latent sites.

    Raises:
      ValueError: no example arguments, no latent sites, a model latent site missing from
        the guide, a parameter name shared by the model and the guide, a guide site off
        its model site's support, an observed value its distribution broadcasts (a model
        written for a data set given one example), a subsampled plate without
        ``data_plate``, a ``data_plate`` the model lacks, or a global latent site.
    """
    if not example_args:
        raise ValueError("from_numpyro needs the arguments of one example (at least one), "
                         "e.g. from_numpyro(model, guide, rng, x_train[0])")
    if data_plate is None:
        layout = _example_layout(example_args)
    else:
        layout = _plate_layout(model_fn, guide_fn, rng, example_args, data_plate)
    plate = layout.plate
    model_fn, guide_fn = layout.wrap(model_fn), layout.wrap(guide_fn)
    model_trace, guide_trace = _traces(model_fn, guide_fn, rng, layout.first)
    if plate is None:
        _check_no_subsampling(model_trace)
    model_latents = [n for n, s in model_trace.items() if _is_latent(s)]
    guide_latents = [n for n, s in guide_trace.items() if _is_latent(s)]
    if not model_latents:
        raise ValueError("the model has no latent sample sites (every numpyro.sample site is observed)")
    missing = [n for n in model_latents if n not in guide_trace]
    if missing:
        raise ValueError(f"model latent sites {missing} have no site of the same name in the guide "
                         f"(guide sites: {guide_latents})")
    if plate is not None:
        global_latents = [n for n in model_latents if not _in_plate(model_trace[n], plate)]
        if global_latents:
            raise ValueError(f"latent sites {global_latents} lie outside the data plate {plate!r} (global "
                             "latents): from_numpyro(data_plate=...) bridges local latents only; use "
                             "jaxelbo.numpyro.global_local_iwae")
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
    model_axes = {n: a for n in model_latents if (a := _plate_axis(model_trace[n], plate)) is not None}
    guide_axes = {n: a for n in guide_latents if (a := _plate_axis(guide_trace[n], plate)) is not None}
    not_reparam = [n for n in guide_latents if not guide_trace[n]["fn"].has_rsample]
    guard = _pathwise_guard(not_reparam)
    float_dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    size = float(layout.size)

    def cast(z: dict, names: list[str], ints: dict, axes: dict) -> dict:
        missing_z = [n for n in names if n not in z]
        if missing_z:
            raise ValueError(f"z has no value for latent sites {missing_z}; z must be what guide.sample returns "
                             f"(sites {guide_latents})")
        out = {n: (z[n].astype(ints[n]) if n in ints else z[n]) for n in names}
        return {n: (jnp.expand_dims(v, axes[n]) if n in axes else v) for n, v in out.items()}

    def log_density(trace: dict, site: dict) -> jax.Array:
        term = _site_log_prob(site)
        if plate is None:
            return term
        return term / _plate_factor(trace, plate) if _in_plate(site, plate) else term / size

    def latent_log_prob(theta: dict, args: tuple, z: dict) -> tuple[jax.Array, dict]:
        trace = _trace(model_fn, args, _substitution(_constrain(theta, model_transforms),
                                                     cast(z, model_latents, model_ints, model_axes)))
        return _sum([log_density(trace, trace[n]) for n in model_latents]), trace

    def log_prior(theta: dict, z: dict) -> jax.Array:
        return latent_log_prob(theta, layout.first, z)[0]

    def log_likelihood(theta: dict, x: Any, z: dict) -> jax.Array:
        _check_example(x, layout)
        latent, trace = latent_log_prob(theta, layout.call_args(x), z)
        observed = _sum([log_density(trace, s) for s in trace.values() if s["type"] == "sample" and s["is_observed"]])
        return observed + (latent - log_prior(theta, z))

    def sample(phi: dict, rng: jax.Array, x: Any) -> dict:
        _check_example(x, layout)
        trace = _trace(guide_fn, layout.call_args(x), _substitution(_constrain(phi, guide_transforms), {}),
                       rng=rng)
        z = {n: (jnp.squeeze(v, guide_axes[n]) if n in guide_axes else v)
             for n in guide_latents for v in [trace[n]["value"]]}
        for n in not_reparam:
            z[n] = guard(jnp.asarray(z[n]).astype(float_dtype), phi)
        return z

    def guide_terms(phi: dict, x: Any, z: dict) -> dict:
        _check_example(x, layout)
        sub = cast(z, [n for n in guide_latents if not _is_delta(guide_trace[n]["fn"])], guide_ints, guide_axes)
        trace = _trace(guide_fn, layout.call_args(x),
                       _substitution(_constrain(phi, guide_transforms), sub, skip_delta=True))
        return {n: log_density(trace, trace[n]) for n in guide_latents}

    def discrete_log_prob(phi: dict, x: Any, z: dict) -> jax.Array:
        terms = guide_terms(phi, x, z)
        return _sum([terms[n] for n in not_reparam])

    def log_prob(phi: dict, x: Any, z: dict) -> jax.Array:
        total = _sum(list(guide_terms(phi, x, z).values()))
        # A path for a pathwise gradient to reach the guard of a discrete site (its value
        # enters the densities only through an integer cast, which has no derivative).
        for n in not_reparam:
            total = total + 0.0 * jnp.sum(z[n])
        return total

    params = {"model": _unconstrain(model_trace, model_transforms),
              "guide": _unconstrain(guide_trace, guide_transforms)}
    return (Model(log_prior=log_prior, log_likelihood=log_likelihood),
            Guide(sample=sample, log_prob=log_prob, discrete_log_prob=discrete_log_prob,
                  reparameterized=_Declaration({n: n not in not_reparam for n in guide_latents})), params)



# --------------------------------------------------------------------------------------
# Global and local latents
# --------------------------------------------------------------------------------------


def _global_sites(model_fn: Callable, guide_fn: Callable, rng: jax.Array, args: tuple,
                  plate: str) -> tuple[list[str], int]:
    """The model's latent sites outside the data plate, and the plate's size N."""
    full = (_DataPlate(model_fn, plate, one=False), _DataPlate(guide_fn, plate, one=False))
    model_trace, _ = _traces(*full, rng, args)
    if plate not in model_trace or model_trace[plate]["type"] != "plate":
        plates = [n for n, s in model_trace.items() if s["type"] == "plate"]
        raise ValueError(f"data_plate={plate!r}, but the model has no plate of that name (its plates: {plates})")
    names = [n for n, s in model_trace.items() if _is_latent(s) and not _in_plate(s, plate)]
    return names, int(model_trace[plate]["args"][0])


def global_local_iwae(model_fn: Callable, guide_fn: Callable, rng: jax.Array, *args: Any, data_plate: str,
                      num_samples: int, num_global_samples: int = 1,
                      estimator: str | Mapping[str, str] = "dreg") -> tuple[Callable, dict]:
    r"""A bound for a NumPyro model with global latents and a data plate of local ones.

    The model ``p(beta) prod_n p(z_n | beta) p(x_n | z_n, beta)`` has global latents
    ``beta`` (the latent sites outside the data plate) and local ones ``z_n`` (inside it);
    the guide is ``q(beta) prod_n q(z_n | x_n, beta)``. The bound is a
    ``num_global_samples``-sample ELBO over the globals with, given each global draw, an
    IWAE bound of ``num_samples`` samples per data point:

    .. math:: \mathcal{L} = \mathbb{E}_{q(\beta)}\Big[\log \frac{p(\beta)}{q(\beta)}
       + \sum_{n=1}^{N} \mathbb{E}\Big[\log \frac1K \sum_{k=1}^K
       \frac{p(x_n, z_{nk} \mid \beta)}{q(z_{nk} \mid x_n, \beta)}\Big]\Big] \le \log p(x_{1:N}),

    (Jensen twice: inside, ``E log mean_k w_nk <= log p(x_n | beta)``; outside, the ELBO
    of ``beta``). It equals ``log p(x_{1:N})`` when both guides are exact. A batch of B
    data points drawn uniformly from the N estimates the sum over n by ``N/B`` times the
    batch's sum, so the estimate is unbiased for the full-data bound under subsampling.
    Gradients: the locals get ``estimator``'s gradient of their IWAE given ``beta``
    (``dreg``, ``reparam``, ``stl``, or ``score`` / ``vimco`` for discrete locals); the
    global draw ``beta = t(eps, phi)`` is reparameterised and its gradient is the local
    bound's value differentiated through ``beta`` with the parameters held (through the
    guide's reparameterised local draws too) plus, when the local sites are discrete and
    ``q(z_n | x_n, beta)`` depends on ``beta``, their score term
    ``sum_k s_nk dlog q(z_nk | x_n, beta)/dbeta`` with the local estimator's own signal
    ``s`` (IWAE_{K-1}'s leave-one-out one for ``score``, VIMCO's for ``vimco``, also as
    the ``"discrete"`` entry of a per-site estimator): an unbiased gradient of the bound
    for the global guide's parameters. Discrete locals take ``score`` or ``vimco`` only
    (``ovis`` raises).

    Args:
      model_fn, guide_fn: a NumPyro model and guide written for the whole data set, as
        for :func:`from_numpyro` with ``data_plate``. The guide's global sites must be
        reparameterised and must not depend on the data.
      rng: a PRNG key, to run both once and initialise their parameters.
      *args: the model's arguments for the whole data set (static ones stay static).
      data_plate: the name of the data plate.
      num_samples: K, the importance samples per data point and global draw.
      num_global_samples: G, the draws of ``beta`` per step.
      estimator: the local latents' estimator, as for :func:`jaxelbo.iwae`.

    Returns:
      ``(loss_fn, params)``: ``loss_fn(params, rng, x)`` with ``x`` the data arguments'
      rows (a batch of data points, as with :func:`from_numpyro`), returning ``(loss,
      aux)``; ``aux["bound"]`` (B,) are the per-data-point shares
      ``mean_g [log p(beta_g)/q(beta_g) / N + IWAE_K(x_b | beta_g)]``, so
      ``N * mean_b aux["bound"]`` estimates :math:`\mathcal{L}` and ``loss`` is
      ``-mean_b aux["bound"]``; ``aux["log_weights"]`` is (B, G, K).

    Example:
      >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
      >>> from numpyro.infer.autoguide import AutoNormal
      >>> from jaxelbo.numpyro import global_local_iwae
      >>> def model(x):
      ...     mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
      ...     with numpyro.plate("data", x.shape[0]):
      ...         z = numpyro.sample("z", dist.Normal(mu, 1.0))
      ...         numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
      >>> x = jnp.linspace(-1.0, 2.0, 10)
      >>> loss_fn, params = global_local_iwae(model, AutoNormal(model), jax.random.key(0), x,
      ...                                     data_plate="data", num_samples=4)
      >>> loss, aux = jax.jit(loss_fn)(params, jax.random.key(1), x[:5])   # a minibatch of 5
      >>> aux["bound"].shape, aux["log_weights"].shape
      ((5,), (5, 1, 4))

    References:
      Burda, Grosse & Salakhutdinov (2016), arXiv:1509.00519 (the local IWAE bound);
      Hoffman, Blei, Wang & Paisley (2013), "Stochastic variational inference", JMLR 14
      (global and local latents, the N/B scaling of a minibatch).
    """
    from jaxelbo import iwae

    if num_global_samples < 1:
        raise ValueError(f"num_global_samples must be >= 1; got {num_global_samples}")
    names, size = _global_sites(model_fn, guide_fn, rng, args, data_plate)
    if not names:
        raise ValueError(f"the model has no latent site outside the data plate {data_plate!r}: use "
                         f"from_numpyro(..., data_plate={data_plate!r}) and any jaxelbo objective")
    one_guide = _DataPlate(guide_fn, data_plate, one=True)

    def given(fn: Callable) -> Callable:
        def conditioned(*call_args):
            *rest, beta = call_args
            return handlers.condition(fn, data=jax.tree_util.tree_map(lambda a: a[0], beta))(*rest)

        return conditioned

    # the globals' first values, one per data point, travel as an extra data argument
    first_args = _plate_layout(model_fn, guide_fn, rng, args, data_plate).first
    guide_trace = _trace(one_guide, first_args, rng=rng)
    missing = [n for n in names if n not in guide_trace]
    if missing:
        raise ValueError(f"model latent sites {missing} have no site of the same name in the guide")
    not_reparam = [n for n in names if not guide_trace[n]["fn"].has_rsample]
    if not_reparam:
        raise ValueError(f"global guide sites {not_reparam} are not reparameterisable: global_local_iwae needs "
                         "reparameterised globals")
    beta0 = {n: jnp.broadcast_to(guide_trace[n]["value"], (size, *jnp.shape(guide_trace[n]["value"])))
             for n in names}
    model, guide, params = from_numpyro(given(model_fn), given(guide_fn), rng, *args, beta0,
                                        data_plate=data_plate)
    guide_transforms = _param_transforms(guide_trace)
    discrete_signal = _discrete_signal(guide, estimator)
    local = iwae(model, guide, num_samples=num_samples, estimator=estimator)
    num_data_args = sum(_is_data(a, size) for a in args)

    def sample_globals(phi: dict, key: jax.Array) -> tuple[dict, jax.Array]:
        trace = _trace(one_guide, first_args, _substitution(_constrain(phi, guide_transforms), {}), rng=key)
        return {n: trace[n]["value"] for n in names}, _sum([_site_log_prob(trace[n]) for n in names])

    def loss_fn(params: dict, rng: jax.Array, x: Any) -> tuple[jax.Array, dict]:
        rows = (x,) if num_data_args == 1 else tuple(x)
        batch = jax.tree_util.tree_leaves(rows)[0].shape[0]
        rng_global, rng_local = jax.random.split(rng)

        def one_draw(key_global, key_local):
            beta, log_q = sample_globals(params["guide"], key_global)
            beta_rows = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (batch, *jnp.shape(a))), beta)
            # beta enters the local bound through its x, whose gradient is plain autodiff for every
            # estimator: beta's path derivative of the local bound, parameters held; discrete local
            # draws move with beta through q(z | x, beta) only, hence their score term below
            loss, aux = local(params, key_local, (*rows, beta_rows))
            if discrete_signal is not None:
                loss = loss - _local_score_term(guide, params["guide"], key_local, rows, beta_rows,
                                                aux["log_weights"], discrete_signal)
            return loss + log_q / size, aux["bound"] - log_q / size, aux["log_weights"]

        keys = (jax.random.split(rng_global, num_global_samples), jax.random.split(rng_local, num_global_samples))
        losses, bounds, log_weights = jax.vmap(one_draw)(*keys)
        bound = jnp.mean(bounds, axis=0)
        aux = {"bound": bound, "log_weights": jnp.moveaxis(log_weights, 0, 1)}
        return jnp.mean(losses), aux

    return loss_fn, params


def _discrete_signal(guide: Guide, estimator: Any) -> Callable | None:
    """The local estimator's learning signal of the discrete local sites, or None without such sites.

    ``score``: IWAE_{K-1}'s leave-one-out signal, ``vimco``: VIMCO's, as :func:`jaxelbo.iwae`
    gives them; a per-site estimator's ``"discrete"`` entry names one of the two.
    """
    from jaxelbo import estimators as est

    declared = guide.reparameterized
    if declared is None or all(dict(declared).values()):
        return None
    name = estimator.get("discrete") if isinstance(estimator, Mapping) else estimator
    signals: dict[Any, Callable] = {"score": est.iwae_score_signal, "vimco": est.vimco_signal}
    if name in ("ovis", "ovis-mc"):
        sites = sorted(n for n, flag in dict(declared).items() if not flag)
        raise ValueError(f"global_local_iwae with discrete local sites {sites} supports the local estimators "
                         f"'score' and 'vimco' (the globals get their score term with the same signal), not "
                         f"{name!r}")
    return signals.get(name)  # a pathwise estimator: the local loss itself refuses the discrete sites


def _local_score_term(guide: Guide, phi: dict, key: jax.Array, rows: tuple, beta_rows: dict,
                      log_weights: jax.Array, signal_fn: Callable) -> jax.Array:
    """``mean_b sum_k sg(s_bk) (log q_D(z_bk | x_b, beta) - sg(...))``: zero in value, beta's score term.

    The local loss takes ``beta`` in its ``x``, whose gradient is the plain derivative of the
    value at fixed ``z``; a discrete ``z_bk`` drawn from ``q(z | x_b, beta)`` also moves with
    ``beta`` through its distribution, which gives the term ``sum_k s_bk dlog q_D(z_bk)/dbeta``
    (``s`` the local estimator's signal). Its draws are the local loss's own (the same keys);
    only ``beta`` is differentiated (the guide's parameters got their score term in the local loss).
    """
    from jaxelbo.weights import _per_example, sample_keys, sample_latents

    batch, k = log_weights.shape
    phi_held = jax.lax.stop_gradient(phi)
    data = jax.lax.stop_gradient(tuple(rows))
    keys = sample_keys(key, batch, k)
    z = jax.lax.stop_gradient(sample_latents(guide, phi_held, keys, (*data, jax.lax.stop_gradient(beta_rows))))
    assert guide.discrete_log_prob is not None
    log_q = _per_example(guide.discrete_log_prob, None, "example", "sample")(phi_held, (*data, beta_rows), z)
    signal = jax.lax.stop_gradient(signal_fn(log_weights))
    return jnp.mean(jnp.sum(signal * (log_q - jax.lax.stop_gradient(log_q)), axis=-1))
