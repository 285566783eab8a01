"""Sample-quality metrics of the labs, all in float64.

energy_distance:  2 E|X - Y| - E|X - X'| - E|Y - Y'| (within-set terms over distinct pairs, so the
                  estimate for two samples of one distribution is ~0, either sign).
sliced_wasserstein: W1 averaged over random 1-D projections.
mode_stats:       nearest-mode assignment against a known mixture: class accuracy, mode-weight error
                  (total variation to the target weights), mode coverage, in-mode fraction.
frechet_distance: the FID formula between two feature sets.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InputError


def _as2d(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 2:
        raise InputError(f"{name} must be a [n >= 2, d] tensor of samples, got {getattr(x, 'shape', type(x))}")
    return x.double()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance between samples x [n, d] and y [m, d] (the squared form, unbiased within-set)."""
    x, y = _as2d(x, "x"), _as2d(y, "y")
    n, m = x.shape[0], y.shape[0]
    dxy = torch.cdist(x, y).mean()
    dxx = torch.cdist(x, x).sum() / (n * (n - 1))
    dyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * dxy - dxx - dyy)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 128, seed: int = 0) -> float:
    """Mean 1-D Wasserstein-1 distance over ``projections`` random unit directions (quantiles matched on
    a common grid, so n and m may differ)."""
    x, y = _as2d(x, "x"), _as2d(y, "y")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    q = torch.linspace(0, 1, max(x.shape[0], y.shape[0]), dtype=torch.float64)
    px = torch.quantile((x @ dirs), q, dim=0)
    py = torch.quantile((y @ dirs), q, dim=0)
    return float((px - py).abs().mean())


def mode_stats(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, target_weights: torch.Tensor,
               mode_class: torch.Tensor, target_class: int) -> dict:
    """Nearest-mode statistics of samples x [n, d] against modes means [K, d] (stds [K]).

    accuracy:       share of samples whose nearest mode belongs to ``target_class``.
    mode_weight_tv: total variation between the share of samples per nearest mode and target_weights [K].
    coverage:       share of target modes (weight > 0) holding at least half their expected share.
    in_mode:        share of samples within the 99.9% radius of their nearest mode (chi quantile * std).
    """
    x = _as2d(x, "x")
    dist = torch.cdist(x, means.double())
    nearest = dist.argmin(1)
    K = means.shape[0]
    share = torch.bincount(nearest, minlength=K).double() / x.shape[0]
    tw = target_weights.double()
    from scipy.stats import chi2

    radius = math.sqrt(chi2.ppf(0.999, means.shape[1])) * stds.double()[nearest]
    target = tw > 0
    return {
        "accuracy": float((mode_class[nearest] == target_class).double().mean()),
        "mode_weight_tv": float(0.5 * (share - tw).abs().sum()),
        "coverage": float((share[target] >= 0.5 * tw[target]).double().mean()),
        "in_mode": float((dist.gather(1, nearest[:, None])[:, 0] <= radius).double().mean()),
    }


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between feature sets [n, k] (float64)."""
    from scipy import linalg

    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise InputError(f"feature sets must be [n >= 2, k] with equal k, got {f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def paired_effect(base: list[float], new: list[float]) -> dict:
    """Seed-paired effect of ``new`` vs ``base`` (one value per seed): mean and std of the per-seed
    difference, and d_z = mean / std (inf-safe: 0 spread gives None)."""
    diff = np.asarray(new, np.float64) - np.asarray(base, np.float64)
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else float("nan")
    return {"delta_mean": float(diff.mean()), "delta_std": sd,
            "d_z": float(diff.mean() / sd) if len(diff) > 1 and sd > 0 else None}
