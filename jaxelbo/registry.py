"""The objective registry: every objective's name, constructor, estimators and settings.

One entry per objective (an :class:`ObjectiveSpec`) says

* which constructor builds it (``je.iwae``, ...) and which estimators it supports;
* whether its sample budget is *nested*, i.e. split into ``num_outer x num_inner``
  (MIWAE, PIWAE), and so how a budget of ``num_samples`` draws per example becomes its
  keyword arguments (:func:`split_budget`: one rule for the command line, the benchmarks,
  the tests and the notebooks);
* its extra keywords (``beta``, ``alpha``) and their defaults;
* the direction of its bound (:func:`direction`): ``"lower"`` (``<= log p(x)``, maximised:
  ``loss == -mean(aux["bound"])``) or ``"upper"`` (``>= log p(x)``, minimised:
  ``loss == +mean(aux["bound"])``, e.g. CUBO and the right-hand TVO sum).

:data:`OBJECTIVES` (``je.OBJECTIVES``) is the table ``{name: estimators}`` read from it, and
:func:`check_estimator` words every unsupported pair the same way. The built-in objectives
register themselves at the end of :mod:`jaxelbo.objectives`; a new one is one call::

    registry.register("jvi", jvi, estimators=("reparam", "dreg"))

after which :func:`make`, ``jaxelbo train --objective jvi``, the throughput benchmark and the
conformance tests know it.

Example:
  >>> import jaxelbo as je
  >>> from jaxelbo import registry
  >>> registry.split_budget(512)
  (16, 32)
  >>> registry.objective_kwargs("miwae", num_samples=64)
  {'num_outer': 8, 'num_inner': 8}
  >>> registry.objective_kwargs("ciwae", num_samples=64)
  {'num_samples': 64, 'beta': 0.5}
  >>> je.OBJECTIVES["piwae"]
  ('reparam', 'dreg')
  >>> registry.direction("cubo"), registry.direction("tvo", {"integration": "right"})
  ('upper', 'upper')
  >>> registry.check_estimator("elbo", "dreg")
  Traceback (most recent call last):
  ...
  ValueError: objective 'elbo' does not support estimator 'dreg'; valid choices for elbo: reparam, stl, score
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from jaxelbo._validation import check_count
from jaxelbo.estimators import ESTIMATORS
from jaxelbo.types import Guide, LossFn, Model


class ObjectiveSpec(NamedTuple):
    """One registered objective.

    Attributes:
      name: the name used everywhere (``--objective``, ``je.OBJECTIVES``).
      constructor: ``(model, guide, *, estimator, **kwargs) -> LossFn``.
      estimators: the estimators it supports, in the order of the design's table.
      nested: True when the constructor takes ``num_outer`` and ``num_inner`` (a budget of
        ``num_outer * num_inner`` samples) instead of ``num_samples``.
      keywords: its extra keyword arguments and their defaults (e.g. ``{"beta": 0.5}``).
      direction: ``"lower"`` or ``"upper"``, the side of ``log p(x)`` its bound lies on, or a
        function of the constructor's keywords that returns one (TVO: its ``integration``);
        read it with :func:`direction`.
    """

    name: str
    constructor: Callable[..., LossFn]
    estimators: tuple[str, ...]
    nested: bool = False
    keywords: Mapping[str, Any] = MappingProxyType({})
    direction: str | Callable[[Mapping[str, Any]], str] = "lower"


_REGISTRY: dict[str, ObjectiveSpec] = {}

#: The two sides of ``log p(x)`` a bound can lie on.
DIRECTIONS = ("lower", "upper")


def register(name: str, constructor: Callable[..., LossFn], *, estimators: Iterable[str],
             nested: bool = False, keywords: Mapping[str, Any] | None = None,
             direction: str | Callable[[Mapping[str, Any]], str] = "lower",
             replace: bool = False) -> ObjectiveSpec:
    """Add an objective to the registry (``replace=True`` to redefine an existing name).

    Args:
      name: the objective's name.
      constructor: ``(model, guide, *, estimator, num_samples | num_outer, num_inner, **keywords)``.
      estimators: the estimators it supports; each must be one of ``je.ESTIMATORS``.
      nested: the budget splits as ``num_outer x num_inner`` (see :func:`split_budget`).
      keywords: extra keyword arguments and the defaults :func:`make` uses.
      direction: ``"lower"`` (default: a lower bound on ``log p(x)``, and the loss is minus
        the mean bound) or ``"upper"`` (an upper bound, minimised: the loss is plus the mean
        bound), or a function of the keywords that returns one of them.

    Returns:
      the registered :class:`ObjectiveSpec`.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"an objective's name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"objective {name!r} is already registered; pass replace=True to redefine it")
    estimators = tuple(estimators)
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if not estimators or unknown:
        raise ValueError(f"objective {name!r}: estimators must be a non-empty subset of "
                         f"{', '.join(ESTIMATORS)}, got {estimators}")
    if not callable(direction) and direction not in DIRECTIONS:
        raise ValueError(f"objective {name!r}: direction must be one of {', '.join(DIRECTIONS)} or a function "
                         f"of the keywords, got {direction!r}")
    spec = ObjectiveSpec(name, constructor, estimators, bool(nested), MappingProxyType(dict(keywords or {})),
                         direction)
    _REGISTRY[name] = spec
    return spec


def names() -> tuple[str, ...]:
    """Every registered objective, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> ObjectiveSpec:
    """The :class:`ObjectiveSpec` of ``name``; ``ValueError`` naming the valid choices if unknown."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; valid choices: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def direction(objective: str, keywords: Mapping[str, Any] | None = None) -> str:
    """``"lower"`` or ``"upper"``: which side of ``log p(x)`` the bound of ``objective`` lies on.

    A lower bound is maximised (``loss == -mean(aux["bound"])``), an upper bound minimised
    (``loss == +mean(aux["bound"])``). ``keywords`` are the constructor's (missing ones take
    the registered defaults); they matter for TVO, whose right-hand sum is an upper bound.

    Example:
      >>> direction("iwae"), direction("tvo"), direction("tvo", {"integration": "right"})
      ('lower', 'lower', 'upper')
    """
    spec = get(objective)
    if not callable(spec.direction):
        return spec.direction
    side = spec.direction({**spec.keywords, **{k: v for k, v in (keywords or {}).items() if v is not None}})
    if side not in DIRECTIONS:
        raise ValueError(f"objective {objective!r}: its direction function returned {side!r}, "
                         f"not one of {', '.join(DIRECTIONS)}")
    return side


def loss_sign(objective: str, keywords: Mapping[str, Any] | None = None) -> float:
    """``-1.0`` for a lower bound, ``+1.0`` for an upper one: ``loss == sign * mean(aux["bound"])``."""
    return -1.0 if direction(objective, keywords) == "lower" else 1.0


def _unsupported(objective: str, estimators: Iterable[str]) -> ValueError:
    named = " or ".join(repr(e) for e in estimators)
    return ValueError(f"objective {objective!r} does not support estimator {named}; "
                      f"valid choices for {objective}: {', '.join(get(objective).estimators)}")


def check_estimator(objective: str, estimator: str) -> None:
    """Raise the one error message for an unknown objective or estimator or an unsupported pair.

    ``TypeError`` for an estimator that is not a string; ``ValueError`` otherwise, naming
    the valid choices.
    """
    spec = get(objective)
    if not isinstance(estimator, str):
        raise TypeError(f"estimator must be a string, got {estimator!r}; valid choices: {', '.join(ESTIMATORS)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid choices: {', '.join(ESTIMATORS)}")
    if estimator not in spec.estimators:
        raise _unsupported(objective, [estimator])


def pairs(objectives: Iterable[str] | None = None,
          estimators: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Every supported ``(objective, estimator)``, optionally restricted to the given names.

    Names are validated, and nothing named is dropped silently: an objective given that
    supports none of the estimators given (``elbo`` with ``dreg``), or an estimator that
    none of the objectives given supports, raises the error of :func:`check_estimator`.

    Example:
      >>> pairs(["iwae", "rws"], ["dreg"])
      [('iwae', 'dreg'), ('rws', 'dreg')]
    """
    objectives = None if objectives is None else list(dict.fromkeys(objectives))
    estimators = None if estimators is None else list(dict.fromkeys(estimators))
    for name in objectives or []:
        get(name)
    for name in estimators or []:
        if name not in ESTIMATORS:
            raise ValueError(f"unknown estimator {name!r}; valid choices: {', '.join(ESTIMATORS)}")
    chosen = [(o, e) for o, spec in _REGISTRY.items() for e in spec.estimators
              if (objectives is None or o in objectives) and (estimators is None or e in estimators)]
    for o in objectives or []:
        if estimators is not None and not any(p[0] == o for p in chosen):
            raise _unsupported(o, estimators)
    for e in estimators or []:
        if objectives is not None and not any(p[1] == e for p in chosen):
            raise _unsupported(objectives[0], [e])
    return chosen


def split_budget(num_samples: int, num_outer: int | None = None) -> tuple[int, int]:
    """``(M, K)`` with ``M * K == num_samples`` for a nested objective.

    By default ``M`` is the largest divisor of the budget that is at most its square root,
    so the split is as square as the budget allows: 64 -> 8 x 8, 512 -> 16 x 32,
    8 -> 2 x 4, a prime p -> 1 x p. An explicit ``num_outer`` must divide the budget.

    Example:
      >>> [split_budget(n) for n in (1, 8, 64, 512, 7)]
      [(1, 1), (2, 4), (8, 8), (16, 32), (1, 7)]
    """
    num_samples = check_count("num_samples", num_samples)
    if num_outer is None:
        num_outer = max(d for d in range(1, math.isqrt(num_samples) + 1) if num_samples % d == 0)
    else:
        num_outer = check_count("num_outer", num_outer)
        if num_samples % num_outer:
            raise ValueError(f"num_outer ({num_outer}) must be a positive divisor of num_samples ({num_samples})")
    return num_outer, num_samples // num_outer


def objective_kwargs(objective: str, *, num_samples: int, num_outer: int | None = None,
                     **keywords: Any) -> dict[str, Any]:
    """The constructor's keyword arguments for a budget of ``num_samples`` draws per example.

    ``{"num_samples": K}``, or ``{"num_outer": M, "num_inner": K / M}`` for a nested
    objective (:func:`split_budget`), followed by the objective's extra keywords: the value
    given, or its default where the value is missing or None. A keyword the objective does
    not take must be None (so a caller may pass every flag it has), and ``num_outer`` must
    be None or 1 for an objective that is not nested.
    """
    spec = get(objective)
    nested_names = [n for n, s in _REGISTRY.items() if s.nested]
    if spec.nested:
        m, k = split_budget(num_samples, num_outer)
        out: dict[str, Any] = {"num_outer": m, "num_inner": k}
    else:
        if num_outer not in (None, 1):
            raise ValueError(f"num_outer is only used by {', '.join(nested_names)}, not by {objective!r}")
        out = {"num_samples": check_count("num_samples", num_samples)}
    for key, value in keywords.items():
        if key not in spec.keywords and value is not None:
            takers = [n for n, s in _REGISTRY.items() if key in s.keywords]
            raise ValueError(f"{key} is not a setting of {objective!r}"
                             + (f"; it is used by {', '.join(takers)}" if takers else ""))
    for key, default in spec.keywords.items():
        value = keywords.get(key)
        out[key] = default if value is None else value
    return out


def make(objective: str, model: Model, guide: Guide, *, estimator: str, num_samples: int,
         num_outer: int | None = None, **keywords: Any) -> LossFn:
    """The loss of ``objective`` with ``estimator`` at a budget of ``num_samples`` per example.

    Validates the pair first (:func:`check_estimator`), then calls the registered
    constructor with :func:`objective_kwargs`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxelbo as je
      >>> lg = je.models.linear_gaussian
      >>> loss_fn = make("miwae", lg.model(), lg.guide(), estimator="dreg", num_samples=8)
      >>> params = lg.optimal_params(jnp.zeros(2))
      >>> loss_fn(params, jax.random.key(0), jnp.ones((3, 2)))[1]["log_weights"].shape
      (3, 2, 4)
    """
    check_estimator(objective, estimator)
    kwargs = objective_kwargs(objective, num_samples=num_samples, num_outer=num_outer, **keywords)
    return get(objective).constructor(model, guide, estimator=estimator, **kwargs)


class _EstimatorTable(Mapping):
    """Read-only ``{objective: supported estimators}``, always in step with the registry."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return _REGISTRY[name].estimators

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr({name: spec.estimators for name, spec in _REGISTRY.items()})


#: ``{objective: estimators it supports}``, read from the registry (``je.OBJECTIVES``).
OBJECTIVES: Mapping[str, tuple[str, ...]] = _EstimatorTable()
