"""Flow family x embedded-guidance teacher (issue 15: a FLUX.1-dev-style teacher for a flow student): an
embedded teacher computing the CFG combine of a flow model inside itself (w from Cond.guidance) gives the
same samples as the CFG teacher over [uncond; cond] with scale w, for the three teacher rules."""

import pytest
import torch

from distpp import Sampler
from distpp.denoiser import DenoiserBase
from helpers import FlowGaussianDenoiser, assert_close, flow_config, gaussian_conds

SHAPE = (4, 5, 3)
FP32_TOL = 1e-5


class EmbeddedFlowCFG(DenoiserBase):
    """One batch-b forward of ``base`` on the cond rows and on fixed uncond rows, combined inside with
    w = cond.guidance: what a guidance-distilled flow teacher computes in one forward."""

    def __init__(self, base: FlowGaussianDenoiser, uncond):
        self.base, self.uncond, self.spec = base, uncond, base.spec
        self.guidance = []

    def __call__(self, z, t, cond):
        assert cond.guidance is not None and cond.guidance.shape == (z.shape[0],)
        self.guidance.append(cond.guidance.clone())
        unc = self.uncond.expand(z.shape[0]).to(z.device, cond.encoder_hidden_states.dtype)
        vu, vc = self.base(z, t, unc).double(), self.base(z, t, cond).double()
        w = cond.guidance.double().view(-1, *([1] * (z.dim() - 1)))
        return (vu + w * (vc - vu)).to(z.dtype)


@pytest.mark.parametrize("style,rule,G", [("flux", "next", 1), ("flux", "random", 2), ("sd3", "same", 2)])
def test_embedded_flow_teacher_equals_cfg_flow_teacher(style, rule, G):
    scale = 1000.0 if style == "sd3" else 1.0
    student = FlowGaussianDenoiser(scale, mu=0.1, sigma=0.8, shift=0.5)
    teacher = FlowGaussianDenoiser(scale, mu=-0.2, sigma=0.6, shift=1.5)
    cond, uncond = gaussian_conds(3)
    w = [3.5, 1.0, 6.0]
    kw = dict(latent_shape=SHAPE, seeds=[4, 5, 6], cfg=w, lam=[0.3, 0.6, 0.9])
    common = dict(guided_steps=G, teacher_rule=rule, kernel_impl="torch")
    cfg_out = Sampler(student, teacher, flow_config(style, 4, **common)).sample(cond, uncond=uncond, **kw)
    embedded = EmbeddedFlowCFG(teacher, uncond)
    emb_out = Sampler(student, embedded, flow_config(style, 4, teacher_guidance="embedded", **common)).sample(
        cond, **kw)
    assert_close(emb_out, cfg_out, FP32_TOL, f"{style} {rule} embedded vs cfg")
    assert len(embedded.guidance) == G and all(torch.equal(g, torch.tensor(w)) for g in embedded.guidance)
    plain = Sampler(student, None, flow_config(style, 4, guided_steps=0, kernel_impl="torch")).sample(cond, **kw)
    assert (emb_out - plain).abs().max() > 1e-3
