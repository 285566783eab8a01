"""The guided flow step (ALGORITHM.md "Flow-matching students"): a float64 transcription of the spec for a
CFG teacher and the three teacher rules, no-op settings, the epsilon form, and the sig = 1 first level."""

import pytest
import torch

from distpp import Sampler, run_loop
from distpp.families import teacher_rows
from helpers import FlowGaussianDenoiser, assert_close, flow_config, flow_scheduler, gaussian_conds
from reference import reference_flow_sample

SHAPE = (4, 5, 3)  # odd sizes on purpose


def make(style, steps, **kw):
    scale = 1000.0 if style == "sd3" else 1.0
    student = FlowGaussianDenoiser(scale, mu=0.1, sigma=0.8, shift=0.5)
    teacher = FlowGaussianDenoiser(scale, mu=-0.2, sigma=0.6, shift=1.5)
    return Sampler(student, teacher, flow_config(style, steps, kernel_impl="torch", **kw)), student, teacher, scale


@pytest.mark.parametrize("style,rule,G,steps,stochastic", [
    ("sd3", "next", 1, 4, False),
    ("sd3", "same", 2, 4, False),
    ("sd3", "random", 4, 4, False),
    ("sd3", "next", 4, 4, True),
    ("flux", "next", 2, 4, False),
    ("flux", "same", 1, 1, False),
    ("flux", "random", 2, 3, True),
])
def test_guided_flow_matches_float64_spec(style, rule, G, steps, stochastic):
    B = 3
    s, student, teacher, scale = make(style, steps, stochastic=stochastic, guided_steps=G, lam=0.3, cfg=4.0,
                                      teacher_rule=rule)
    cond, uncond = gaussian_conds(B)
    lam = [0.3, 0.05, 0.9]
    plan = s.prepare(cond, uncond=uncond, latent_shape=SHAPE, seeds=[1, 2, 3], lam=lam)
    x_init, z, n = plan.x.clone(), plan.z.clone(), plan.n.clone()
    levels = plan.t_teacher[:, :B].double() / scale  # the drawn sigmas (random rule)
    if rule == "same":  # sig = 1 is a real first level: a = 0, x0_T = x_s - v_T
        assert plan.gcoef[0].tolist() == [[0.0, 1.0, 1.0, -1.0]] * B
    with torch.inference_mode():
        ours = run_loop(s.student, s.teacher, s.ops, s.schedule, plan)
    sched, timestep = flow_scheduler(style, steps, stochastic)
    t_model = timestep(sched.timesteps, sched.timesteps)
    ref = reference_flow_sample(student, teacher, sigmas=sched.sigmas.double(), t_model=t_model, timestep_scale=scale,
                                stochastic=stochastic, x_init=x_init, z=z, n=n, G=G, lam=torch.tensor(lam),
                                w=torch.full((B,), 4.0), rule=rule, cond=plan.cond_s, cond_t=plan.cond_t,
                                levels=levels)
    assert_close(ours, ref, 2e-5, f"{style} {rule}")
    if rule == "random":  # a real sigma in [sig_next, sig_k] per sample, not a grid point
        for k in range(G):
            lo, hi = s.schedule.level_bounds[k]
            assert all(lo - 1e-6 <= float(v) <= hi + 1e-6 for v in levels[k])
        open_ = levels[: min(G, steps - 1)]  # the last step's range is its own sigma
        assert len({round(float(v), 6) for v in open_.flatten()}) == open_.numel()


@pytest.mark.parametrize("style,stochastic", [("sd3", False), ("flux", True)])
def test_flow_lam0_and_G0_reproduce_plain_student(style, stochastic):
    cond, uncond = gaussian_conds(2)

    def run(**kw):
        return make(style, 4, stochastic=stochastic, **kw)[0].sample(cond, uncond=uncond, latent_shape=SHAPE,
                                                                     seeds=[4, 5])

    plain = run(guided_steps=0)
    assert torch.equal(plain, run(guided_steps=2, lam=0.0))
    assert not torch.allclose(plain, run(guided_steps=2, lam=0.2))


def test_flow_teacher_called_at_next_sigma_with_pipeline_timesteps():
    s, student, teacher, _ = make("flux", 4, guided_steps=2)
    cond, uncond = gaussian_conds(3)
    s.sample(cond, uncond=uncond, latent_shape=SHAPE)
    sched, _ = flow_scheduler("flux", 4)
    assert [x.shape[0] for x, _ in teacher.calls] == [6, 6]
    for k in range(2):  # FLUX's timestep input is sigma: the next listed one
        assert teacher.calls[k][1].tolist() == [float((sched.timesteps[k + 1] / 1000).float())] * 6


def test_flow_epsilon_form_equals_x0_form():
    """x0 + lam k_s (n - e_T) == (1 - lam) x0 + lam x0_T in flow variables (k_s = sig/(1 - sig), e_T = x_s +
    (1 - sig) v_T; sig_s < 1), with x0_T from the guidance rows the sampler uses; float64."""
    g = torch.Generator().manual_seed(1)
    x0, n, vT = (torch.randn(3, 4, 7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for sig in (0.03, 0.5, 0.97):
        a_s, s_s, tpx, tpm = teacher_rows(torch.tensor(1 - sig, dtype=torch.float64),
                                          torch.tensor(sig, dtype=torch.float64), "flow").tolist()
        assert (tpx, tpm) == pytest.approx((1.0, -sig), rel=1e-15)
        xs = a_s * x0 + s_s * n
        x0T = tpx * xs + tpm * vT
        eT = xs + (1 - sig) * vT
        for lam in (0.01, 0.3):
            assert_close(x0 + lam * sig / (1 - sig) * (n - eT), (1 - lam) * x0 + lam * x0T, 1e-13)
