"""Shared test helpers: error metrics and analytic denoisers."""

from __future__ import annotations

import torch

from distpp import Cond, ModelSpec
from distpp.denoiser import DenoiserBase


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; raises with the first bad index on NaN/inf."""
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    bad = ~torch.isfinite(o)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{int(bad.sum())} non-finite outputs, first at {idx}")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def assert_close(out, ref, rtol, what=""):
    e = rel_err(out, ref)
    assert e <= rtol, f"{what} relative error {e:.3e} > {rtol:.1e}"


class GaussianDenoiser(DenoiserBase):
    """Exact denoiser of Gaussian data x0 ~ N(mean_b, sigma^2 I) under VP noising (any dtype).

    mean_b = mu + shift * cond.encoder_hidden_states[b, 0, 0]; predicts ``prediction_type``.
    abar is read from ``alphas_cumprod`` at round(t) for VP timesteps.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, mu=0.3, sigma=0.7, shift=1.0, prediction_type="epsilon",
                 channels=4, width=8):
        self.acp = alphas_cumprod.double()
        self.mu, self.sigma, self.shift, self.pt = mu, sigma, shift, prediction_type
        self.spec = ModelSpec(in_channels=channels, cross_attention_dim=width, prediction_type=prediction_type)
        self.calls = []

    def posterior(self, z, t, cond):
        zd = z.double()
        abar = self.acp.to(z.device)[t.round().long()].view(-1, *([1] * (z.dim() - 1)))
        a, s = abar.sqrt(), (1 - abar).sqrt()
        mean = (self.mu + self.shift * cond.encoder_hidden_states[:, 0, 0].double()).view_as(a)
        v = self.sigma**2
        x0 = mean + a * v / (a * a * v + s * s) * (zd - a * mean)
        eps = (zd - a * x0) / s
        return x0, eps, a, s

    def __call__(self, z, t, cond):
        self.calls.append((z.shape[0], t.clone()))
        x0, eps, a, s = self.posterior(z, t, cond)
        if self.pt == "epsilon":
            out = eps
        elif self.pt == "v_prediction":
            out = a * eps - s * x0
        else:
            out = x0
        return out.to(z.dtype)


def gaussian_conds(B, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = Cond(torch.randn(B, 3, width, generator=g))
    uncond = Cond(torch.zeros(1, 3, width))
    return cond, uncond


def channels_last_pair(pair):
    """(student, teacher) Denoisers over copies of ``pair``'s UNets moved to ``torch.channels_last`` (a common
    speed setting; their predictions come back channels_last, i.e. not contiguous). ``pair`` is untouched."""
    import copy

    from distpp.denoiser import UNetDenoiser

    def moved(d):
        unet = copy.deepcopy(d.unet).to(memory_format=torch.channels_last)
        return UNetDenoiser(unet, w_embed=d.w_embed, prediction_type=d.spec.prediction_type)

    return moved(pair.student), moved(pair.teacher)
