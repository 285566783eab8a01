"""The digits lab in miniature: training, caching, sampler wiring and its metrics."""

import numpy as np
import pytest
import torch

from distpp import ConfigError
from distpp.cache import ArtifactCache
from distpp.lab import digits

MINI = dict(teacher_steps=20, student_steps=5, classifier_steps=150, batch=16, samples=3, seeds=2, lams=(0.3,),
            guided=(1,), ceiling_steps=3)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    cache = ArtifactCache(tmp_path_factory.mktemp("cache"))
    cfg = digits.DigitsLabConfig(**MINI)
    return cfg, cache, digits.run_digits(cfg, cache, log=lambda s: None)


def test_mini_lab_runs_and_writes(mini, tmp_path):
    cfg, cache, res = mini
    names = [r["name"] for r in res["rows"]]
    assert names[0] == "student" and "effect" in res["rows"][1] and "ceiling" in names[-1]
    for r in res["rows"]:
        assert np.isfinite(r["fd"]["mean"]) and 0 <= r["accuracy"]["mean"] <= 1
    paths = digits.write_outputs(res, tmp_path)
    assert paths["json"].stat().st_size > 0 and paths["png"].stat().st_size > 1000


def test_checkpoints_come_back_from_the_cache(mini):
    cfg, cache, _ = mini
    a = digits.build_models(cfg, cache, log=lambda s: None)
    b = digits.build_models(cfg, cache, log=lambda s: None)
    for m1, m2 in zip(a[:3], b[:3]):
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(p1, p2)
    assert b[3]["teacher_s"] < 5.0  # loaded, not retrained


def test_metrics_real_data_scores_near_zero_and_noise_worse(mini):
    cfg, cache, _ = mini
    clf = digits.build_models(cfg, cache, log=lambda s: None)[0]
    x, y = digits.load_data()
    with torch.no_grad():
        acc = float((clf(x).argmax(1) == y).double().mean())
        real = clf.features(x).double().numpy()
    assert acc > 0.9
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:500]
    good = digits.evaluate(x[idx], y[idx], clf, real)
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    bad = digits.evaluate(noise, y[idx], clf, real)
    assert good["fd"] < 0.2 * bad["fd"] and good["accuracy"] > 0.9 and bad["accuracy"] < 0.5


def test_consistency_fn_matches_the_samplers_lcm_x0():
    """The student is trained with the same c_skip/c_out the lcm family applies at sampling time."""
    from distpp.schedules import COL_PM, COL_PX, build_schedule

    sch = build_schedule("lcm", 4)
    t = torch.tensor([int(v) for v in sch.timesteps])
    c_skip, c_out = digits.lcm_boundary(t)
    acp = sch.alphas_cumprod
    a, s = acp[t].sqrt(), (1 - acp[t]).sqrt()
    torch.testing.assert_close(sch.coef[:, COL_PX], c_skip.flatten() + c_out.flatten() / a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sch.coef[:, COL_PM], -c_out.flatten() * s / a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(steps=0), dict(lams=(1.5,)), dict(teacher_steps=0), dict(guided=(9,)),
                                dict(channels=(12, 24))])
def test_bad_settings_raise_config_error(kw):
    with pytest.raises(ConfigError):
        digits.DigitsLabConfig(**kw)
