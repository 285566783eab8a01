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

    def predict(self, z, t, cond) -> torch.Tensor:
        """The exact prediction in float64."""
        x0, eps, a, s = self.posterior(z, t, cond)
        if self.pt == "epsilon":
            return eps
        if self.pt == "v_prediction":
            return a * eps - s * x0
        return x0

    def __call__(self, z, t, cond):
        self.calls.append((z.shape[0], t.clone()))
        return self.predict(z, t, cond).to(z.dtype)


class EmbeddedCFGDenoiser(DenoiserBase):
    """A guidance-distilled stand-in (FLUX.1-dev style): one batch-b forward that computes, inside the model,
    the CFG of the exact denoiser ``base`` between its fixed ``uncond`` and the given cond, with the scale
    w = ``cond.guidance`` ([b], per sample). So it equals a CFG teacher over [uncond; cond] with scale w:
    m = m_u + w (m_c - m_u), combined in float64 here (in float32 by guided_update for the CFG teacher).

    The uncond rows are materialized on the model's device once per (batch, device) and kept, so the
    forward makes no host-to-device copy (it can be captured in a CUDA graph).
    """

    def __init__(self, base: GaussianDenoiser, uncond: Cond):
        self.base, self.uncond, self.spec = base, uncond, base.spec
        self.calls = []  # (rows, t, guidance) per forward
        self._unc = {}

    def prepare(self, cond: Cond) -> Cond:
        dev = cond.encoder_hidden_states.device
        key = (cond.batch, str(dev))
        if key not in self._unc:
            self._unc[key] = self.uncond.expand(cond.batch).to(dev, cond.encoder_hidden_states.dtype)
        return cond

    def __call__(self, z, t, cond):
        if cond.guidance is None or cond.guidance.shape != (z.shape[0],):
            raise AssertionError(f"an embedded-guidance teacher needs cond.guidance [{z.shape[0]}], got "
                                 f"{None if cond.guidance is None else tuple(cond.guidance.shape)}")
        self.calls.append((z.shape[0], t.clone(), cond.guidance.clone()))
        unc = self._unc[(z.shape[0], str(z.device))]
        mu, mc = self.base.predict(z, t, unc), self.base.predict(z, t, cond)
        w = cond.guidance.double().view(-1, *([1] * (z.dim() - 1)))
        return (mu + w * (mc - mu)).to(z.dtype)


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


class FlowGaussianDenoiser(DenoiserBase):
    """Exact velocity v = e - x0 of Gaussian data x0 ~ N(mean_b, sigma^2 I) under rectified-flow noising
    x = (1 - sig) x0 + sig e, predicting prediction type "flow" (any dtype).

    sig = t / timestep_scale: the timestep as a pipeline passes it (StableDiffusion3Pipeline sig * 1000,
    FluxPipeline sig, timestep_scale 1). mean_b as GaussianDenoiser's. Records each call's (input, t).
    """

    def __init__(self, timestep_scale=1000.0, mu=0.3, sigma=0.7, shift=1.0, channels=4, width=8):
        self.scale, self.mu, self.sigma, self.shift = float(timestep_scale), mu, sigma, shift
        self.spec = ModelSpec(in_channels=channels, cross_attention_dim=width, prediction_type="flow")
        self.calls = []

    def __call__(self, z, t, cond):
        self.calls.append((z.detach().clone(), t.detach().clone()))
        zd = z.double()
        s = (t.double() / self.scale).view(-1, *([1] * (z.dim() - 1)))
        a = 1 - s
        mean = (self.mu + self.shift * cond.encoder_hidden_states[:, 0, 0].double()).view_as(s)
        v = self.sigma**2
        x0 = mean + a * v / (a * a * v + s * s) * (zd - a * mean)
        return ((zd - x0) / s).to(z.dtype)  # e - x0 = (x - x0) / sig, since x - x0 = sig (e - x0)


# Flow students. FLUX.1-dev's scheduler config (dynamic shifting); SD3.5's is shift 3 (the flow family's
# default). Latents are drawn unpacked [C, H, W]; FLUX packs 2x2 patches: (6 / 2) * (8 / 2) = 12 tokens.
FLUX_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096)
FLOW_SHAPE = (4, 6, 8)
SEQ_LEN = (FLOW_SHAPE[1] // 2) * (FLOW_SHAPE[2] // 2)


def flow_scheduler(style, steps, stochastic=False, mu=None):
    """diffusers' scheduler set as StableDiffusion3Pipeline ("sd3") or FluxPipeline ("flux") sets it, written
    from their sources (FLUX: sigmas linspace(1, 1/N, N), mu from the image sequence length), and the
    transformer's timestep input timestep(t, latents) (SD3: t; FLUX: t / 1000)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if style == "sd3":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
        sched.set_timesteps(steps)
        return sched, lambda t, x: t.expand(x.shape[0])
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG, stochastic_sampling=stochastic)
    if mu is None:
        c = sched.config
        mu = calculate_shift(SEQ_LEN, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched, lambda t, x: t.expand(x.shape[0]).to(x.dtype) / 1000


def flow_config(style, steps, stochastic=False, mu=None, **kw):
    """The SamplerConfig of flow_scheduler's setting."""
    from distpp import SamplerConfig

    if style == "sd3":
        return SamplerConfig(family="flow", steps=steps, family_options=dict(stochastic_sampling=stochastic), **kw)
    opts = dict(sigmas="linspace", timestep_scale=1.0, stochastic_sampling=stochastic)
    opts.update(dict(mu=mu) if mu is not None else dict(image_seq_len=SEQ_LEN))
    return SamplerConfig(family="flow", steps=steps, scheduler_config=FLUX_CONFIG, family_options=opts, **kw)
