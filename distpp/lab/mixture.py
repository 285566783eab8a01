"""Gaussian mixtures with exact diffusion quantities: the gmm lab's teacher and student Denoisers.

Data model: K isotropic Gaussians N(mu_k, std_k^2 I) in d dimensions, each mode owned by a class.
``class_weights`` [n_classes + 1, K] holds the mode weights of each class-conditional mixture (rows
0..n_classes-1) and of the unconditional mixture (last row), so a perturbed student mixture (class
leakage, wrong weights) is just another table over the same or shifted means.

Under the VP process x_t = a_t x0 + s_t e (a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t)) every quantity
is closed form or a 1-D ODE in sigma = s/a:
  * posterior mean E[x0 | x_t] (the exact denoiser: the teacher, predicting epsilon);
  * the probability-flow ODE map x_t -> x_0 (the student: what a consistency-distilled model learns,
    integrated numerically with Heun steps in float64; prediction type "sample").

Conditioning (a distpp.Cond): encoder_hidden_states [b, 1, n_classes + 1], a one-hot class in the
first n_classes columns and, for the unconditional ("null") row, all zeros there and 1 in the last
column. :func:`class_cond` and :func:`null_cond` build them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..denoiser import Cond, ModelSpec
from ..errors import ConfigError, InputError

F64 = torch.float64


@dataclass(frozen=True)
class Mixture:
    """A class-labelled isotropic Gaussian mixture (float64 CPU tensors).

    means:         [K, d] mode means.
    stds:          [K] per-mode standard deviations (> 0).
    class_weights: [n_classes + 1, K] mode weights per class; the last row is the unconditional mixture.
    mode_class:    [K] int64 owning class of each mode (for accuracy and coverage).
    """

    means: torch.Tensor
    stds: torch.Tensor
    class_weights: torch.Tensor
    mode_class: torch.Tensor

    def __post_init__(self):
        K = self.means.shape[0]
        if self.means.dim() != 2 or K < 1 or self.means.shape[1] < 1:
            raise ConfigError(f"means must be [K, d] with K, d >= 1, got {tuple(self.means.shape)}")
        if self.stds.shape != (K,) or not bool((self.stds > 0).all()):
            raise ConfigError(f"stds must be [K={K}] positive values")
        cw = self.class_weights
        if cw.dim() != 2 or cw.shape[1] != K or cw.shape[0] < 2:
            raise ConfigError(f"class_weights must be [n_classes + 1, K={K}], got {tuple(cw.shape)}")
        if bool((cw < 0).any()) or not torch.allclose(cw.sum(1), torch.ones(cw.shape[0], dtype=cw.dtype)):
            raise ConfigError("each class_weights row must be non-negative and sum to 1")

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.class_weights.shape[0]) - 1


CLASS_LAYOUTS = ("contiguous", "interleaved")


def ring_mixture(d: int = 2, modes: int = 8, n_classes: int = 2, radius: float = 1.0, std: float = 0.1,
                 class_layout: str = "contiguous") -> Mixture:
    """``modes`` equal-weight Gaussians on a circle of ``radius`` in the first two coordinates of R^d
    (mode k at angle k * 360/modes degrees), each owned by one of ``n_classes`` classes:

    contiguous:  mode k in class k // (modes / n_classes): each class owns an arc (with 8 modes and 2
                 classes, class 0 = modes 0-3, one half of the ring). ALGORITHM.md's reference figures use
                 this layout: the classes differ in mean, so a noised sample still says which half it came
                 from at the levels a 4-step teacher is asked, and CFG has something to amplify.
    interleaved: mode k in class k % n_classes: the classes share mean and covariance, so at t >= 499
                 P(class | x_t) ~ 1/n_classes, conditional and unconditional denoisers agree and CFG is
                 inert (the negative control)."""
    if class_layout not in CLASS_LAYOUTS:
        raise ConfigError(f"class_layout must be one of {', '.join(CLASS_LAYOUTS)}, got {class_layout!r}")
    if not isinstance(d, int) or d < 1:
        raise ConfigError(f"d (the data dimension) must be an integer >= 1, got {d!r}")
    if modes < 1 or n_classes < 1 or modes % n_classes:
        raise ConfigError(f"modes ({modes}) must be a positive multiple of n_classes ({n_classes})")
    if not (radius > 0 and std > 0):
        raise ConfigError(f"radius and std must be > 0, got radius={radius}, std={std}")
    ang = torch.arange(modes, dtype=F64) * (2 * math.pi / modes)
    means = torch.zeros(modes, d, dtype=F64)
    means[:, 0] = radius * ang.cos()
    if d > 1:
        means[:, 1] = radius * ang.sin()
    k = torch.arange(modes)
    mode_class = k // (modes // n_classes) if class_layout == "contiguous" else k % n_classes
    uncond = torch.full((modes,), 1.0 / modes, dtype=F64)
    rows = [_normalize(uncond * (mode_class == c)) for c in range(n_classes)]
    return Mixture(means, torch.full((modes,), float(std), dtype=F64), torch.stack(rows + [uncond]), mode_class)


def perturbed(mix: Mixture, *, leak: float = 0.0, shift: float = 0.0, weight_skew: float = 0.0) -> Mixture:
    """A student's wrong version of ``mix``.

    leak:        class leakage: each class row becomes (1 - leak) * its row + leak * the unconditional row.
    shift:       every mean rotated by ``shift`` radians in the plane of the first two coordinates.
    weight_skew: within each row, mode weights scaled by (1 + skew) and (1 - skew) alternately, renormalized.
    """
    for name, v in (("leak", leak), ("weight_skew", weight_skew)):
        if not (0.0 <= v <= 1.0):
            raise ConfigError(f"{name} must be in [0, 1], got {v}")
    cw = mix.class_weights.clone()
    cw[:-1] = (1 - leak) * cw[:-1] + leak * cw[-1:]
    if weight_skew:
        sign = 1.0 - 2.0 * (torch.arange(cw.shape[1]) // max(mix.n_classes, 1) % 2).to(F64)
        cw = cw * (1 + weight_skew * sign)
        cw = cw / cw.sum(1, keepdim=True)
    means = mix.means.clone()
    if shift and mix.dim > 1:
        c, s = math.cos(shift), math.sin(shift)
        x, y = means[:, 0].clone(), means[:, 1].clone()
        means[:, 0], means[:, 1] = c * x - s * y, s * x + c * y
    return Mixture(means, mix.stds.clone(), cw, mix.mode_class.clone())


def _normalize(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum()


# ---------------------------------------------------------------------------------------------------
def sample_mixture(mix: Mixture, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Exact samples [b, d] float64 of class ``labels`` ([b] int64; n_classes = the unconditional row)."""
    w = mix.class_weights[labels]
    comp = torch.multinomial(w, 1, generator=generator)[:, 0]
    e = torch.randn(labels.shape[0], mix.dim, generator=generator, dtype=F64)
    return mix.means[comp] + mix.stds[comp, None] * e


def _log_resp(y: torch.Tensor, mix: Mixture, w: torch.Tensor, var: torch.Tensor, scale: torch.Tensor):
    """Responsibilities of the modes for y [b, d] under N(scale*mu_k, var_k I) with weights w [b, K]:
    var [b, K]; scale [b]. Returns (r [b, K], y - scale*mu [b, K, d])."""
    diff = y[:, None, :] - scale[:, None, None] * mix.means[None]
    logp = w.clamp_min(1e-300).log() - 0.5 * diff.pow(2).sum(-1) / var - 0.5 * mix.dim * var.log()
    logp = torch.where(w > 0, logp, torch.full_like(logp, -math.inf))
    return torch.softmax(logp, dim=1), diff


def posterior_mean(x: torch.Tensor, abar: torch.Tensor, mix: Mixture, w: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t = x] for VP input x [b, d] float64 at levels abar [b], mixture weights w [b, K]."""
    a, s2 = abar.sqrt(), 1.0 - abar
    v0 = mix.stds.pow(2)[None]  # [1, K]
    var = a[:, None] ** 2 * v0 + s2[:, None]
    r, diff = _log_resp(x, mix, w, var, a)
    post = mix.means[None] + (a[:, None] * v0 / var)[..., None] * diff
    return (r[..., None] * post).sum(1)


def flow_velocity(x: torch.Tensor, sig: torch.Tensor, mix: Mixture, w: torch.Tensor) -> torch.Tensor:
    """E[e - x0 | x] under rectified flow x = (1 - sig) x0 + sig e, for x [b, d] float64 at sig [b] in [0, 1]
    with mixture weights w [b, K]: the exact flow-matching velocity, which is also the probability-flow
    ODE's dx/dsig. The same posterior as the VP one with a = 1 - sig, s = sig; per mode,
    E[x0 | x] = mu + a v0 / var (x - a mu) and E[e | x] = s / var (x - a mu) with var = a^2 v0 + s^2, so
    v = -mu + (s - a v0) / var (x - a mu): no division by a or s, finite at sig = 1 (a = 0: v = x - E[x0])
    and at sig = 0 (v = -x)."""
    a, s = 1.0 - sig, sig
    v0 = mix.stds.pow(2)[None]  # [1, K]
    var = a[:, None] ** 2 * v0 + s[:, None] ** 2
    r, diff = _log_resp(x, mix, w, var, a)
    per_mode = -mix.means[None] + ((s[:, None] - a[:, None] * v0) / var)[..., None] * diff
    return (r[..., None] * per_mode).sum(1)


def flow_ode_map(x: torch.Tensor, sig: torch.Tensor, mix: Mixture, w: torch.Tensor, steps: int = 100,
                 rho: float = 3.0) -> torch.Tensor:
    """The probability-flow-ODE map x_sig -> x_0 of ``mix`` (weights w [b, K]) in rectified-flow variables, for
    x [b, d] float64 at sig [b] in (0, 1]: Heun steps of dx/dsig = flow_velocity on the grid
    sig_i = sig (1 - i/steps)^rho, ending exactly at sig = 0. Integrated in flow variables throughout, so
    sig = 1 (a = 0, where the VP / VE form x / a is undefined) is an ordinary start. Returns [b, d] float64."""
    return _heun_to_zero(x, sig, lambda y, lv: flow_velocity(y, lv, mix, w), steps, rho)


def _heun_to_zero(y: torch.Tensor, level: torch.Tensor, velocity, steps: int, rho: float) -> torch.Tensor:
    """Heun steps of dy/dlevel = velocity(y, level) from ``level`` [b] to 0 on the grid level (1 - i/steps)^rho."""
    if steps < 1:
        raise ConfigError(f"ode steps must be >= 1, got {steps}")
    frac = (1.0 - torch.arange(steps + 1, dtype=F64) / steps) ** rho
    for i in range(steps):
        s0, s1 = level * frac[i], level * frac[i + 1]
        h = (s1 - s0)[:, None]
        v0 = velocity(y, s0)
        y_e = y + h * v0
        y = y + 0.5 * h * (v0 + velocity(y_e, s1))
    return y


def class_posterior(x: torch.Tensor, abar: torch.Tensor, mix: Mixture) -> torch.Tensor:
    """P(class | x_t = x) under the unconditional mixture, [b, n_classes] float64, for VP input x [b, d] at
    levels abar [b]: how much a noised sample still says about its class (1/n_classes = nothing left, so
    the class-conditional and unconditional denoisers agree there and CFG has nothing to amplify)."""
    b = x.shape[0]
    a, s2 = abar.sqrt(), 1.0 - abar
    var = a[:, None] ** 2 * mix.stds.pow(2)[None] + s2[:, None]
    r, _ = _log_resp(x, mix, mix.class_weights[-1].expand(b, -1), var, a)
    onehot = torch.nn.functional.one_hot(mix.mode_class, mix.n_classes).to(F64)  # [K, n_classes]
    return r @ onehot


def _ode_velocity(y: torch.Tensor, sigma: torch.Tensor, mix: Mixture, w: torch.Tensor) -> torch.Tensor:
    """dy/dsigma of the probability-flow ODE in VE variables y = x/a, sigma = s/a: (y - D(y, sigma))/sigma,
    written as sigma * sum_k r_k (y - mu_k) / (std_k^2 + sigma^2), which stays finite at sigma = 0."""
    var = mix.stds.pow(2)[None] + sigma[:, None] ** 2
    r, diff = _log_resp(y, mix, w, var, torch.ones_like(sigma))
    return sigma[:, None] * (r[..., None] * diff / var[..., None]).sum(1)


def ode_map(x: torch.Tensor, abar: torch.Tensor, mix: Mixture, w: torch.Tensor, steps: int = 100,
            rho: float = 3.0) -> torch.Tensor:
    """The probability-flow-ODE map x_t -> x_0 of ``mix`` (weights w [b, K]) for VP input x [b, d] float64
    at levels abar [b]: Heun steps on the grid sigma_i = sigma_t (1 - i/steps)^rho, ending exactly at sigma = 0
    (rho = 3: on the 8-mode ring, 100 steps are within 1.5e-3 of a 1000-step solution; rho = 7 doubles that).
    Returns [b, d] float64."""
    y = x / abar.sqrt()[:, None]
    sig_t = ((1.0 - abar) / abar).sqrt()
    return _heun_to_zero(y, sig_t, lambda y, lv: _ode_velocity(y, lv, mix, w), steps, rho)


# ---------------------------------------------------------------------------------------------------
def class_cond(labels: torch.Tensor, n_classes: int) -> Cond:
    """Cond with encoder_hidden_states [b, 1, n_classes + 1]: one-hot labels, null flag 0."""
    e = torch.zeros(labels.shape[0], 1, n_classes + 1)
    e[torch.arange(labels.shape[0]), 0, labels] = 1.0
    return Cond(e)


def null_cond(batch: int, n_classes: int) -> Cond:
    """The unconditional rows: zero one-hot, null flag (last column) 1."""
    e = torch.zeros(batch, 1, n_classes + 1)
    e[:, 0, -1] = 1.0
    return Cond(e)


def decode_labels(cond: Cond, n_classes: int) -> torch.Tensor:
    """Row index into class_weights per sample ([b] int64): the class, or n_classes for null rows."""
    e = cond.encoder_hidden_states
    if e.dim() != 3 or e.shape[-1] != n_classes + 1:
        raise InputError(f"lab conditioning must be [b, 1, {n_classes + 1}] (one-hot class + null flag), "
                         f"got {tuple(e.shape)}")
    e = e[:, 0].double()
    return torch.where(e[:, -1] > 0.5, torch.full((e.shape[0],), n_classes, dtype=torch.long),
                       e[:, :-1].argmax(1))


def abar_at(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """abar at (possibly fractional) timesteps t [b]: linear interpolation of the table, float64."""
    acp = alphas_cumprod.double().cpu()
    tt = t.double().cpu().clamp(0, acp.shape[0] - 1)
    lo = tt.floor().long()
    hi = (lo + 1).clamp_max(acp.shape[0] - 1)
    f = tt - lo
    return acp[lo] * (1 - f) + acp[hi] * f


def _flat(x: torch.Tensor, d: int) -> torch.Tensor:
    if x.dim() != 4 or x.shape[1] * x.shape[2] * x.shape[3] != d:
        raise InputError(f"lab models take [b, {d}, 1, 1] latents, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], d).double().cpu()


class MixtureTeacher:
    """The exact denoiser of ``mix`` as a Denoiser predicting epsilon: eps = (x - a E[x0|x]) / s.

    Rows with the null flag use the unconditional mixture, the others their class's mixture; CFG is the
    sampler's job. ``alphas_cumprod`` [T]: the training schedule (the Schedule's table).
    """

    def __init__(self, mix: Mixture, alphas_cumprod: torch.Tensor):
        self.mix, self.acp = mix, alphas_cumprod.double().cpu()
        self.spec = ModelSpec(in_channels=mix.dim, cross_attention_dim=mix.n_classes + 1, dtype=torch.float32,
                              prediction_type="epsilon")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        xf = _flat(x, self.mix.dim)
        abar = abar_at(t, self.acp)
        w = self.mix.class_weights[decode_labels(cond, self.mix.n_classes)]
        x0 = posterior_mean(xf, abar, self.mix, w)
        eps = (xf - abar.sqrt()[:, None] * x0) / (1.0 - abar).sqrt()[:, None]
        return eps.to(x.device, torch.float32).reshape(x.shape)


class OdeMapStudent:
    """The probability-flow-ODE map of a (perturbed) mixture as a Denoiser predicting the sample x0:
    the model of a consistency-distilled student whose distillation error is the perturbation.
    Use with SamplerConfig(prediction_type="sample"); in the LCM family the sampler's boundary terms
    give x0 = c_out * m + c_skip * x with c_skip < 1e-7 at t >= 249, i.e. the map itself."""

    def __init__(self, mix: Mixture, alphas_cumprod: torch.Tensor, ode_steps: int = 100):
        if not isinstance(ode_steps, int) or ode_steps < 1:
            raise ConfigError(f"ode_steps must be an integer >= 1, got {ode_steps!r}")
        self.mix, self.acp, self.ode_steps = mix, alphas_cumprod.double().cpu(), ode_steps
        self.spec = ModelSpec(in_channels=mix.dim, cross_attention_dim=mix.n_classes + 1, dtype=torch.float32,
                              prediction_type="sample")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        xf = _flat(x, self.mix.dim)
        w = self.mix.class_weights[decode_labels(cond, self.mix.n_classes)]
        x0 = ode_map(xf, abar_at(t, self.acp), self.mix, w, self.ode_steps)
        return x0.to(x.device, torch.float32).reshape(x.shape)


def sigma_at(t: torch.Tensor, timestep_scale: float) -> torch.Tensor:
    """The flow level sig [b] float64 of a model timestep input t = sig * timestep_scale (the flow family's
    family option: 1000 as StableDiffusion3Pipeline passes it, 1 as FluxPipeline)."""
    return (t.double().cpu() / timestep_scale).clamp(0.0, 1.0)


def _check_timestep_scale(timestep_scale) -> float:
    if not isinstance(timestep_scale, (int, float)) or not (math.isfinite(timestep_scale) and timestep_scale > 0):
        raise ConfigError(f"timestep_scale must be a finite number > 0 (the flow family's option: 1000 for "
                          f"SD3-style timesteps, 1 for FLUX-style), got {timestep_scale!r}")
    return float(timestep_scale)


class FlowMixtureTeacher:
    """The exact flow-matching model of ``mix`` as a Denoiser predicting the velocity (prediction type
    "flow"): v = E[e - x0 | x] at sig = t / timestep_scale, so the sampler's x0 = x - sig v is the exact
    posterior mean. Null rows use the unconditional mixture; CFG is the sampler's job (linear in v, so the
    same combine as in x0). Takes any sig in [0, 1], including sig = 1 and the "random" rule's real draws."""

    def __init__(self, mix: Mixture, timestep_scale: float = 1000.0):
        self.mix, self.timestep_scale = mix, _check_timestep_scale(timestep_scale)
        self.spec = ModelSpec(in_channels=mix.dim, cross_attention_dim=mix.n_classes + 1, dtype=torch.float32,
                              prediction_type="flow")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        xf = _flat(x, self.mix.dim)
        w = self.mix.class_weights[decode_labels(cond, self.mix.n_classes)]
        v = flow_velocity(xf, sigma_at(t, self.timestep_scale), self.mix, w)
        return v.to(x.device, torch.float32).reshape(x.shape)


class FlowOdeMapStudent:
    """The probability-flow-ODE map of a (perturbed) mixture in rectified-flow variables as a Denoiser
    predicting the velocity: the map x_sig -> x0 (flow_ode_map), returned as v = (x - x0) / sig so that the
    flow family's x0 = x - sig v is the map itself (students are asked at sig > 0: the schedule's sigmas)."""

    def __init__(self, mix: Mixture, timestep_scale: float = 1000.0, ode_steps: int = 100):
        if not isinstance(ode_steps, int) or ode_steps < 1:
            raise ConfigError(f"ode_steps must be an integer >= 1, got {ode_steps!r}")
        self.mix, self.timestep_scale, self.ode_steps = mix, _check_timestep_scale(timestep_scale), ode_steps
        self.spec = ModelSpec(in_channels=mix.dim, cross_attention_dim=mix.n_classes + 1, dtype=torch.float32,
                              prediction_type="flow")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        xf = _flat(x, self.mix.dim)
        sig = sigma_at(t, self.timestep_scale)
        if bool((sig <= 0).any()):
            raise InputError("the flow ODE-map student is asked at sig > 0 only (its velocity is (x - x0) / sig); "
                             f"got timesteps {t.tolist()}")
        w = self.mix.class_weights[decode_labels(cond, self.mix.n_classes)]
        x0 = flow_ode_map(xf, sig, self.mix, w, self.ode_steps)
        return ((xf - x0) / sig[:, None]).to(x.device, torch.float32).reshape(x.shape)


class CFGDenoiser:
    """``model`` with classifier-free guidance folded in (eps_u + w (eps_c - eps_u)): lets the teacher be
    sampled on its own (many steps, guided_steps = 0) as the ceiling. Null rows pass through."""

    def __init__(self, model, w: float, n_classes: int):
        self.model, self.w, self.n_classes = model, float(w), n_classes
        self.spec = getattr(model, "spec", None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        b = x.shape[0]
        both = Cond.cat(null_cond(b, self.n_classes).to(x.device, cond.encoder_hidden_states.dtype), cond)
        m = self.model(torch.cat([x, x]), torch.cat([t, t]), both)
        mu, mc = m[:b], m[b:]
        return mu + self.w * (mc - mu)
