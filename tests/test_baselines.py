"""The eager and research baselines compute the same guided algorithm as distpp (same seeds)."""

import pytest

from distpp import Sampler, SamplerConfig
from distpp.baselines import baseline_sample
from helpers import assert_close


@pytest.mark.parametrize("family,G", [("lcm", 2), ("dmd2", 1), ("euler", 2), ("euler_a", 2), ("ddim", 3)])
def test_baselines_equal_distpp(tiny_pair, family, G):
    cond, uncond = tiny_pair.random_cond(2, seed=1)
    cfg = SamplerConfig(family=family, guided_steps=G, lam=0.3, cfg=5.0, kernel_impl="torch")
    shape = tiny_pair.info.latent_shape
    ours = Sampler(tiny_pair.student, tiny_pair.teacher, cfg).sample(cond, uncond=uncond, latent_shape=shape,
                                                                     seeds=[3, 4])
    for research in (False, True) if family in ("lcm", "euler_a") else (False,):
        base = baseline_sample(tiny_pair.student, tiny_pair.teacher, cfg, cond, uncond, shape, [3, 4],
                               device="cpu", dtype=tiny_pair.dtype, research=research)
        assert_close(base, ours, 1e-5, f"{family} research={research}")
