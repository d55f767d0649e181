"""PyTorch reference: the Burda VAE's IWAE and IWAE-DReG in the common hook style.

This is how the estimators are usually written in PyTorch (CPU, float32):

* IWAE (Burda et al. 2016, arXiv:1509.00519): ``-mean_b(logsumexp_k log w~ - log K)``,
  plain autograd.
* DReG (Tucker et al. 2019, arXiv:1810.04152): ``log q`` evaluated with *detached* guide
  outputs, surrogate ``-mean_b sum_k w_k log w~_k`` with ``w = softmax(log w~)`` detached,
  and a gradient hook on ``z`` that multiplies its gradient by ``w`` once more, so the
  encoder receives ``sum_k w_k^2 dlog w~_k/dz dz/dphi`` and the decoder
  ``sum_k w_k dlog p/dtheta``.

The module takes the same parameters (``{"model": theta, "guide": phi}`` of
``(in, out)`` matrices, see :mod:`references.burda`) and the same noise ``eps`` (B, K, 50)
as the JAX code, so its gradients can be compared with jaxelbo's before it is timed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_LAYERS = ("hidden0", "hidden1", "out")
_Z_DIM = 50


def _linear(p: dict) -> nn.Linear:
    w = np.asarray(p["kernel"], dtype=np.float32)
    layer = nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.array(w.T)))
        layer.bias.copy_(torch.from_numpy(np.array(p["bias"], dtype=np.float32)))
    return layer


class BurdaVAE(nn.Module):
    """784-200-200-50 tanh encoder (Gaussian), 50-200-200-784 tanh decoder (Bernoulli)."""

    def __init__(self, params: dict):
        super().__init__()
        self.encoder = nn.ModuleList(_linear(params["guide"]["net"][k]) for k in _LAYERS)
        self.decoder = nn.ModuleList(_linear(params["model"]["net"][k]) for k in _LAYERS)

    @staticmethod
    def _mlp(layers: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(layers[0](h))
        h = torch.tanh(layers[1](h))
        return layers[2](h)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._mlp(self.encoder, x)
        return h[..., :_Z_DIM], h[..., _Z_DIM:]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._mlp(self.decoder, z)

    def log_weights(self, x: torch.Tensor, eps: torch.Tensor, *, detach_guide: bool):
        """``(z, log w~)`` with ``z = mu + sigma * eps`` of shape (B, K, 50)."""
        mu, log_sigma = self.encode(x)
        mu, log_sigma = mu.unsqueeze(1), log_sigma.unsqueeze(1)
        z = mu + torch.exp(log_sigma) * eps
        if detach_guide:
            mu, log_sigma = mu.detach(), log_sigma.detach()
        log_q = torch.distributions.Normal(mu, torch.exp(log_sigma)).log_prob(z).sum(-1)
        log_pz = (-0.5 * z * z - 0.5 * math.log(2 * math.pi)).sum(-1)
        logits = self.decode(z)
        log_px = -F.binary_cross_entropy_with_logits(
            logits, x.unsqueeze(1).expand_as(logits), reduction="none").sum(-1)
        return z, log_pz + log_px - log_q

    def iwae_loss(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        _, log_w = self.log_weights(x, eps, detach_guide=False)
        return -(torch.logsumexp(log_w, 1) - math.log(eps.shape[1])).mean()

    def dreg_loss(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        z, log_w = self.log_weights(x, eps, detach_guide=True)
        with torch.no_grad():
            w = torch.softmax(log_w, 1)
        if z.requires_grad:
            z.register_hook(lambda grad: grad * w.unsqueeze(-1))
        return -(w * log_w).sum(1).mean()

    def gradients(self) -> dict:
        """Gradients in jaxelbo's layout: ``{"model": theta, "guide": phi}`` of numpy arrays."""
        def net(layers):
            return {"net": {k: {"kernel": layer.weight.grad.numpy().T.copy(),
                                "bias": layer.bias.grad.numpy().copy()}
                            for k, layer in zip(_LAYERS, layers, strict=True)}}
        return {"model": net(self.decoder), "guide": net(self.encoder)}


def make_step(params: dict, x: np.ndarray, eps: np.ndarray, estimator: str, *, draw_noise: bool = False):
    """A zero-argument callable doing one forward + backward pass; returns ``(module, step)``.

    With ``draw_noise`` every call draws fresh ``eps ~ N(0, I)`` of ``eps``'s shape with
    ``torch.randn`` (what a training step does, and what the JAX steps pay for too);
    otherwise it reuses ``eps`` (for gradient checks against JAX on identical noise).
    """
    module = BurdaVAE(params)
    xt = torch.from_numpy(np.array(x, dtype=np.float32))
    et = torch.from_numpy(np.array(eps, dtype=np.float32))
    loss_fn = {"reparam": module.iwae_loss, "dreg": module.dreg_loss}[estimator]

    def step():
        for p in module.parameters():
            p.grad = None
        loss = loss_fn(xt, torch.randn_like(et) if draw_noise else et)
        loss.backward()
        return loss

    return module, step


def gradients(params: dict, x: np.ndarray, eps: np.ndarray, estimator: str) -> dict:
    """The reference gradient for ``estimator`` in ``{"reparam", "dreg"}`` on noise ``eps``."""
    module, step = make_step(params, x, eps, estimator)
    step()
    return module.gradients()


def versions() -> dict:
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
