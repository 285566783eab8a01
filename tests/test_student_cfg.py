import torch

from distpp import Sampler, SamplerConfig
from distpp.denoiser import CFGDenoiser
from helpers import GaussianDenoiser, assert_close, gaussian_conds
from distpp.schedules import build_schedule


def test_student_cfg_wrapper():
    acp = build_schedule("lcm", 4).alphas_cumprod
    model = GaussianDenoiser(acp, shift=2.0)
    cond, uncond = gaussian_conds(3)
    x, t = torch.randn(3, 4, 5, 5), torch.full((3,), 759.0)
    mu, mc = model(x, t, uncond.expand(3)), model(x, t, cond)
    for w in (1.0, 3.5):
        out = CFGDenoiser(model, w, uncond)(x, t, cond)
        assert_close(out, mu + w * (mc - mu), 1e-6, f"w={w}")
    assert model.calls[-1][0] == 6  # one batch-2b forward
    s = Sampler(CFGDenoiser(model, 2.0, uncond), None, SamplerConfig(guided_steps=0, kernel_impl="torch"))
    out = s.sample(cond, latent_shape=(4, 5, 5), seeds=[1, 2, 3])
    assert out.shape == (3, 4, 5, 5) and torch.isfinite(out).all()
