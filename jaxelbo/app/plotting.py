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


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> None:
    """Training bound (per logged step) and validation bounds against the step.

    Non-finite values (a diverging run) are left out of the curves and of the axis range.
    """
    plt = _plt()
    train = [r for r in records if r.get("split") == "train" and _finite(r.get("bound"))]
    val = [{k: v for k, v in r.items() if k == "step" or _finite(v)}
           for r in records if r.get("split") == "validation"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if train:
        ax.plot([r["step"] for r in train], [r["bound"] for r in train], lw=1, label="train bound (batch)")
    for key in sorted({k for r in val for k in r if k.startswith(("iwae_", "elbo"))}):
        pts = [(r["step"], r[key]) for r in val if key in r]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"validation {key}")
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
    """Top row(s): data; bottom row(s): decoder means ``sigmoid(f(z))`` at ``z ~ q(z|x)``."""
    plt = _plt()
    num = min(num, len(x))
    cols = min(num, 8)
    rows = -(-num // cols)
    fig, axes = plt.subplots(2, 1, figsize=(cols * 0.8, rows * 1.7 + 0.4))
    for ax, imgs, name in zip(axes, (x[:num], recon[:num]), ("data", "reconstruction"), strict=True):
        ax.imshow(_grid(np.asarray(imgs), rows, cols, shape), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
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
