"""Statistics for the estimator tests: z-scores derived from standard errors."""

import jax
import numpy as np

from jaxelbo.diagnostics import paired_t_statistics


def flat(tree) -> np.ndarray:
    """Concatenate the leaves of a replicate pytree into ``(R, P)``."""
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1)


def z_scores(replicates, target) -> np.ndarray:
    """``(mean_R - target) / (std_R / sqrt(R))`` per element; 0 where both are exact."""
    reps = flat(replicates)
    tgt = np.concatenate([np.asarray(t, np.float64).ravel() for t in jax.tree_util.tree_leaves(target)])
    se = reps.std(axis=0, ddof=1) / np.sqrt(reps.shape[0])
    diff = reps.mean(axis=0) - tgt
    return np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(np.abs(diff) < 1e-6, 0.0, np.inf))


def paired_z_scores(a, b) -> np.ndarray:
    """z-scores of ``mean(a - b) = 0`` for replicates computed on the same noise, flattened.

    The statistics are :func:`jaxelbo.diagnostics.paired_t_statistics` (the engine of
    ``je.paired_bias_test``), for replicates the tests already hold: elements where ``a``
    and ``b`` agree to float precision in every replicate (theta's gradient, shared by
    every estimator) count as equal, ``z = 0``.
    """
    return flat(jax.tree_util.tree_map(lambda t: t[None], paired_t_statistics(a, b).t))[0]
