"""Plots of a training run: learning curves, reconstructions and prior samples (Agg backend)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and bool(np.isfinite(value))


#: Why the validation ELBO can fall while IWAE-64 rises (printed under curves.png when both are drawn).
ELBO_VS_IWAE_NOTE = ("Under IWAE-type training the guide is fitted to be a good importance sampler, not a good "
                     "ELBO guide:\nit grows wider than the posterior, so the validation ELBO can fall while IWAE-64 "
                     "rises (Rainforth et al. 2018; Cremer et al. 2017).")

#: The caption of reconstructions.png.
RECONSTRUCTION_NOTE = "each reconstruction is the decoder mean at ONE draw z ~ q(z|x), not at the guide's mean"


def running_mean(values, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start).

    ``out[i] = mean(values[max(0, i - window + 1) : i + 1])``.
    """
    values = np.asarray(values, dtype=float)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    sums = np.cumsum(np.concatenate([[0.0], values]))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (sums[idx] - sums[lo]) / (idx - lo)


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> None:
    """Training bound (per logged step, with its running mean) and validation bounds against the step.

    The training bound is one mini-batch's, so it is noisy: a running mean over about a twentieth of the
    logged records is drawn over it. When both a validation ELBO and an IWAE bound are drawn, a note
    below the axes says why they can move in opposite directions. Non-finite values (a diverging run)
    are left out of the curves and of the axis range.
    """
    plt = _plt()
    train = [r for r in records if r.get("split") == "train" and _finite(r.get("bound"))]
    val = [{k: v for k, v in r.items() if k == "step" or _finite(v)}
           for r in records if r.get("split") == "validation"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if train:
        steps, bounds = [r["step"] for r in train], [r["bound"] for r in train]
        window = max(1, len(train) // 20)
        ax.plot(steps, bounds, lw=0.8, alpha=0.35, color="C0", label="train bound (one batch)")
        if window > 1:
            ax.plot(steps, running_mean(bounds, window), lw=1.6, color="C0",
                    label=f"train bound, running mean of {window} records")
    for i, key in enumerate(sorted({k for r in val for k in r if k.startswith(("iwae_", "elbo"))})):
        pts = [(r["step"], r[key]) for r in val if key in r]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, color=f"C{i + 1}", label=f"validation {key}")
    if train or val:
        ys = [r["bound"] for r in train[len(train) // 10:]] + [r[k] for r in val for k in r
                                                               if k.startswith(("iwae_", "elbo"))]
        if ys:
            lo, hi = np.percentile(ys, 1), max(ys)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax.set_xlabel("step")
    ax.set_ylabel("nats per example")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing finite to draw: no legend (and no warning)
        ax.legend(fontsize=8)
    keys = {k for r in val for k in r}
    if any(k.startswith("elbo") for k in keys) and any(k.startswith("iwae_") for k in keys):
        fig.text(0.01, 0.01, ELBO_VS_IWAE_NOTE, fontsize=6.5, va="bottom", ha="left", color="0.3")
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _grid(images: np.ndarray, rows: int, cols: int, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    canvas = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 0.5)
    for i, img in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        canvas[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img.reshape(h, w)
    return canvas


def plot_reconstructions(x: np.ndarray, recon: np.ndarray, shape: tuple[int, int], path: str | Path,
                         num: int = 16) -> None:
    """Top row(s): data; bottom row(s): decoder means ``sigmoid(f(z))`` at one draw ``z ~ q(z|x)`` each."""
    plt = _plt()
    num = min(num, len(x))
    cols = min(num, 8)
    rows = -(-num // cols)
    fig, axes = plt.subplots(2, 1, figsize=(max(cols * 0.8, 5.0), rows * 1.7 + 0.7))
    for ax, imgs, name in zip(axes, (x[:num], recon[:num]), ("data", "reconstruction"), strict=True):
        ax.imshow(_grid(np.asarray(imgs), rows, cols, shape), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.text(0.5, 0.01, RECONSTRUCTION_NOTE, fontsize=7, ha="center", va="bottom", color="0.3")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(means: np.ndarray, shape: tuple[int, int], path: str | Path, cols: int = 8) -> None:
    """Decoder means at ``z ~ p(z)`` in a grid."""
    plt = _plt()
    rows = -(-len(means) // cols)
    fig, ax = plt.subplots(figsize=(cols * 0.8, rows * 0.8 + 0.3))
    ax.imshow(_grid(np.asarray(means), rows, cols, shape), cmap="gray", vmin=0, vmax=1)
    ax.set_title("samples: decoder mean at z ~ p(z)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(out_dir: str | Path, records: list[dict], encode: Callable, decode: Callable, params: dict,
             x: np.ndarray, image_shape: tuple[int, int], latent_dim: int, seed: int = 0,
             title: str = "", generate: Callable | None = None) -> None:
    """Writes ``curves.png``, ``reconstructions.png`` and ``samples.png`` into ``out_dir``.

    ``generate(theta, rng, n)`` (the VAE's ancestral sampler) draws the samples; without it
    they are ``decode(theta, z)`` at ``z ~ N(0, I_latent_dim)``.
    """
    import jax

    out = Path(out_dir)
    plot_curves(records, out / "curves.png", title)
    k1, k2 = jax.random.split(jax.random.key(seed))
    xs = np.asarray(x[:16])
    mean, std = encode(params["guide"], xs)
    z = mean + std * jax.random.normal(k1, mean.shape, mean.dtype)
    plot_reconstructions(xs, np.asarray(decode(params["model"], z)), image_shape, out / "reconstructions.png")
    if generate is not None:
        samples = generate(params["model"], k2, 64)
    else:
        samples = decode(params["model"], jax.random.normal(k2, (64, latent_dim), mean.dtype))
    plot_samples(np.asarray(samples), image_shape, out / "samples.png")
