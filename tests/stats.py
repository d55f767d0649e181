"""Statistics for the estimator tests: z-scores derived from standard errors."""

import jax
import numpy as np


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
    """z-scores of ``mean(a - b) = 0`` for replicates computed on the same noise.

    Elements where ``a`` and ``b`` agree to float precision in every replicate (theta's
    gradient, shared by every estimator) count as equal: their difference is rounding,
    not a statistic.
    """
    fa, fb = flat(a), flat(b)
    diff = fa - fb
    scale = np.abs(fa).mean(axis=0) + np.abs(fb).mean(axis=0) + 1e-12
    se = diff.std(axis=0, ddof=1) / np.sqrt(diff.shape[0])
    z = diff.mean(axis=0) / np.where(se > 0, se, 1.0)
    rounding = np.abs(diff).max(axis=0) <= 1e-4 * scale
    return np.where(rounding, 0.0, z)
