"""The guided step: float64 transcription of the spec, no-op settings, x0/epsilon forms, exact lam."""

import pytest
import torch

from distpp import Sampler, SamplerConfig, run_loop
from distpp.kernels import guided_update_ref, student_update_ref
from distpp.schedules import NUM_COLS, build_schedule, teacher_coefficients
from helpers import GaussianDenoiser, assert_close, gaussian_conds
from reference import reference_sample

SHAPE = (4, 5, 3)  # odd sizes on purpose


def make(family, pt="epsilon", tpt="epsilon", **kw):
    acp = build_schedule(family, 4).alphas_cumprod
    student = GaussianDenoiser(acp, mu=0.1, sigma=0.8, shift=0.5, prediction_type=pt)
    teacher = GaussianDenoiser(acp, mu=-0.2, sigma=0.6, shift=1.5, prediction_type=tpt)
    cfg = SamplerConfig(family=family, prediction_type=pt, teacher_prediction_type=tpt, kernel_impl="torch", **kw)
    return Sampler(student, teacher, cfg), student, teacher


@pytest.mark.parametrize("family,pt,tpt,rule,G,steps,timesteps", [
    ("lcm", "epsilon", "epsilon", "next", 1, 4, None),
    ("lcm", "v_prediction", "epsilon", "same", 2, 4, None),
    ("dmd2", "epsilon", "v_prediction", "random", 2, None, (999, 749, 499, 249)),
    ("dmd2", "sample", "epsilon", "next", 1, None, (399,)),
    ("euler", "epsilon", "epsilon", "next", 2, 4, None),
    ("euler", "v_prediction", "sample", "random", 4, 4, None),
    ("euler_a", "epsilon", "epsilon", "next", 4, 4, None),
    ("ddim", "epsilon", "epsilon", "next", 4, 4, None),
    ("ddim", "v_prediction", "v_prediction", "same", 1, 3, None),
])
def test_guided_matches_float64_spec(family, pt, tpt, rule, G, steps, timesteps):
    B = 3
    s, student, teacher = make(family, pt, tpt, steps=steps, timesteps=timesteps, guided_steps=G, lam=0.3,
                               cfg=4.0, teacher_rule=rule)
    cond, uncond = gaussian_conds(B)
    lam = [0.3, 0.05, 0.9]
    plan = s.prepare(cond, uncond=uncond, latent_shape=SHAPE, seeds=[1, 2, 3], lam=lam)
    x_init, z, n = plan.x.clone(), plan.z.clone(), plan.n.clone()
    levels = plan.t_teacher[:, :B].clone()
    with torch.inference_mode():
        ours = run_loop(s.student, s.teacher, s.ops, s.schedule, plan)
    ref = reference_sample(family, student, teacher, steps=steps, timesteps=timesteps, pt=pt, tpt=tpt,
                           x_init=x_init, z=z, n=n, G=G, lam=torch.tensor(lam), w=torch.full((B,), 4.0),
                           rule=rule, cond=plan.cond_s, cond_t=plan.cond_t, levels=levels)
    assert_close(ours, ref, 2e-5, f"{family} {rule}")
    if rule == "random":
        lo_hi = s.schedule.level_bounds
        for k in range(G):
            assert all(lo_hi[k][0] <= int(v) <= lo_hi[k][1] for v in levels[k])


@pytest.mark.parametrize("family", ["lcm", "euler", "euler_a", "ddim"])
def test_lam0_and_G0_reproduce_plain_student(family):
    cond, uncond = gaussian_conds(2)
    plain = make(family, guided_steps=0)[0].sample(cond, latent_shape=SHAPE, seeds=[4, 5])
    lam0 = make(family, guided_steps=2, lam=0.0)[0].sample(cond, uncond=uncond, latent_shape=SHAPE, seeds=[4, 5])
    assert torch.equal(plain, lam0)
    guided = make(family, guided_steps=2, lam=0.2)[0].sample(cond, uncond=uncond, latent_shape=SHAPE, seeds=[4, 5])
    assert not torch.allclose(plain, guided)


def test_guided_and_unguided_share_base_noise():
    cond, uncond = gaussian_conds(2)
    p1 = make("lcm", guided_steps=0)[0].prepare(cond, latent_shape=SHAPE, seeds=[3, 9])
    p2 = make("lcm", guided_steps=2, lam=0.5)[0].prepare(cond, uncond=uncond, latent_shape=SHAPE, seeds=[3, 9])
    drawn = [k for k, d in enumerate(make("lcm")[0].schedule.draws_noise) if d]
    assert torch.equal(p1.x, p2.x) and torch.equal(p1.z[drawn], p2.z[drawn])
    assert not torch.equal(p2.n[0], p2.z[0])  # the re-noise has its own generator


def test_teacher_called_once_per_guided_step_with_batch_2B():
    s, student, teacher = make("lcm", guided_steps=2)
    cond, uncond = gaussian_conds(3)
    s.sample(cond, uncond=uncond, latent_shape=SHAPE)
    assert [b for b, _ in teacher.calls] == [6, 6]
    assert [b for b, _ in student.calls] == [3, 3, 3, 3]
    assert teacher.calls[0][1].tolist() == [759.0] * 6  # "next": LCM's second timestep


def _one_step_tables(family, tpt="epsilon"):
    """A schedule row with A=1, B=C=0 so the op's output is x0' itself."""
    sch = build_schedule(family, 4)
    coef = sch.coef.clone()
    coef[:, 4], coef[:, 5], coef[:, 6] = 1.0, 0.0, 0.0
    return sch, coef


def test_proximal_step_moves_x0_by_exactly_lam_toward_teacher():
    """Analytic Gaussian student and teacher: x0' - x0 == lam * (x0_T - x0), x0_T the teacher's posterior mean."""
    torch.manual_seed(0)
    sch, coef = _one_step_tables("ddim")
    B, k = 2, 2  # t = 499: moderate 1/a_t, so fp32 rounding of x0 stays far below the lam-sized move
    acp = sch.alphas_cumprod.double()
    student = GaussianDenoiser(acp, mu=0.2, sigma=0.9)
    teacher = GaussianDenoiser(acp, mu=-0.5, sigma=0.4, shift=2.0)
    cond, uncond = gaussian_conds(B)
    from distpp import Cond

    cond2 = Cond.cat(uncond.expand(B), cond)
    x = torch.randn(B, *SHAPE)
    t = sch.t_model[k].expand(B)
    x0 = student.posterior(x, t, cond)[0]
    m_s = student(x, t, cond)
    gcoef = teacher_coefficients(sch.abar_next.double()[:, None].expand(4, B), "epsilon").float().contiguous()
    n = torch.randn(B, *SHAPE)
    t_in = torch.full((2 * B,) + SHAPE, float("nan"))
    student_update_ref(x, m_s, n, coef, gcoef, k, t_in)
    ts = sch.t_next[k].expand(2 * B)
    m_t = teacher(t_in, ts, cond2)
    x0T_u = teacher.posterior(t_in[:B], ts[:B], uncond.expand(B))[0]
    x0T_c = teacher.posterior(t_in[B:], ts[B:], cond)[0]
    # CFG in epsilon space is CFG in x0 space for an epsilon teacher at one level (a linear map).
    x0T = x0T_u + 3.0 * (x0T_c - x0T_u)
    w = torch.full((B,), 3.0)
    for lam in (0.0, 0.01, 0.3, 1.0):
        out = torch.full((B,) + SHAPE, float("nan"))
        guided_update_ref(x, m_s, n, m_t, None, coef, gcoef, torch.full((B,), lam), w, k, out, None)
        assert_close(out, x0 + lam * (x0T - x0), 2e-6, f"lam={lam}")
        if lam > 0:  # the move itself, to 0.1% even at lam = 0.01
            assert_close(out.double() - x0, lam * (x0T - x0), 1e-3, f"move at lam={lam}")


def test_epsilon_form_equals_x0_form():
    """x0 + lam * k_s * (n - e_T) == (1 - lam) x0 + lam x0_T (ALGORITHM.md's epsilon form), float64."""
    g = torch.Generator().manual_seed(1)
    x0, n, eT = (torch.randn(3, 4, 7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for abar in (0.05, 0.4, 0.97):
        a_s, s_s = abar**0.5, (1 - abar) ** 0.5
        xs = a_s * x0 + s_s * n
        x0T = (xs - s_s * eT) / a_s
        for lam in (0.01, 0.3):
            x0_form = (1 - lam) * x0 + lam * x0T
            eps_form = x0 + lam * (s_s / a_s) * (n - eT)
            assert_close(eps_form, x0_form, 1e-13)


def test_fused_ref_matches_float64_on_random_tables():
    """guided_update_ref in fp32 vs a float64 evaluation of the same formula, random coefficients."""
    g = torch.Generator().manual_seed(2)
    B, N = 3, 4
    shape = (B, 4, 9, 7)
    coef = torch.randn(N, NUM_COLS, generator=g)
    gcoef = torch.randn(N, B, 4, generator=g)
    x, n, z = (torch.randn(shape, generator=g) for _ in range(3))
    m_s = torch.randn(shape, generator=g)
    m_t = torch.randn((2 * B,) + shape[1:], generator=g)
    lam, cfg = torch.rand(B, generator=g), torch.rand(B, generator=g) * 8
    for k in range(N):
        out = torch.full(shape, float("nan"))
        xin = torch.full(shape, float("nan"))
        guided_update_ref(x, m_s, n, m_t, z, coef, gcoef, lam, cfg, k, out, xin)
        c, gg = coef[k].double(), gcoef[k].double()
        v = lambda q: q.double().view(B, 1, 1, 1)  # noqa: E731
        x0 = c[0] * x.double() + c[1] * m_s.double()
        e = c[2] * x.double() + c[3] * m_s.double()
        xs = v(gg[:, 0]) * x0 + v(gg[:, 1]) * n.double()
        mT = m_t[:B].double() + v(cfg) * (m_t[B:].double() - m_t[:B].double())
        x0T = v(gg[:, 2]) * xs + v(gg[:, 3]) * mT
        x0n = (1 - v(lam)) * x0 + v(lam) * x0T
        ref = c[4] * x0n + c[5] * e + c[6] * z.double()
        assert_close(out, ref, 1e-5)
        assert_close(xin, c[7] * ref, 1e-5)
