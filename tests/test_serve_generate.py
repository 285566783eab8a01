"""Pipeline mode of distpp.serve without Ray: the PipelineWorker a replica holds (a tiny full text-to-image
Pipeline built from configs: real tokenizer files written by the test, tiny CLIP text encoder, VAE and
UNets, loaded offline through from_pretrained), /generate validation, and batching padded to the warmed
buckets. Every served image is compared with a direct single-image ``Pipeline(...)`` call of its own
(graphs off): float32 within 1e-5 relative, the PNG within 1/255."""

from __future__ import annotations

import io

import numpy as np
import pytest

from distpp import Pipeline
from distpp.errors import ConfigError, InputError
from distpp.serve import (GenerateRequest, PipelineWorker, ServeSettings, image_png, parse_generate,
                          settings_from_strings)
from tiny_repos import tiny_repos_for

RTOL_F32 = 1e-5
STEPS, GUIDED = 2, 1


@pytest.fixture(scope="session")
def repos(tmp_path_factory):
    return tiny_repos_for(tmp_path_factory)


def pipeline_settings(repos, **kw) -> ServeSettings:
    base = dict(student=repos["sd_lcm"], teacher=repos["sd_teacher"], family="lcm", local_files_only=True,
                device="cpu", steps=STEPS, guided_steps=GUIDED, max_batch_size=4, sizes=((32, 32), (32, 48)),
                graphs=True)  # graphs=True: the GraphRunner path off CUDA too, so batches pad to the buckets
    return ServeSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def gen_worker(repos) -> PipelineWorker:
    w = PipelineWorker(pipeline_settings(repos))
    w.warm()  # as a replica does at start: every (size, bucket) of the default guided_steps
    return w


@pytest.fixture(scope="module")
def reference_pipe(repos) -> Pipeline:
    """An independent Pipeline of the same folders, graphs off: the reference of every served image."""
    return Pipeline.from_pretrained(repos["sd_lcm"], repos["sd_teacher"], "lcm", local_files_only=True, device="cpu",
                                    steps=STEPS, guided_steps=GUIDED, graphs=False)


def reference_image(pipe: Pipeline, req: GenerateRequest) -> np.ndarray:
    """The single-request Pipeline result: [H, W, 3] float32 in [0, 1]."""
    x = pipe([req.prompt], [req.negative_prompt], height=req.height, width=req.width, seeds=[req.seed],
             guided_steps=req.guided_steps, lam=req.lam, cfg=req.cfg, output_type="pt")
    return x[0].permute(1, 2, 0).numpy()


def assert_image_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{what}: NaN/inf"
    assert want.std() > 0.01, f"{what}: the reference image is flat; the comparison would prove nothing"
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert rel <= RTOL_F32, f"{what}: relative error {rel:.2e} > {RTOL_F32:.0e}"


def assert_png_close(png: bytes, want: np.ndarray, what: str) -> None:
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    assert img.shape == want.shape, f"{what}: PNG shape {img.shape} != {want.shape}"
    err = float(np.abs(img - want).max())
    assert err <= 1 / 255 + 1e-6, f"{what}: PNG differs from the float image by {err * 255:.2f}/255"


BODIES = [
    {"prompt": "a cat", "seed": 1},
    {"prompt": "a red cat", "seed": 2, "lam": 0.4, "cfg": 3.0, "negative_prompt": "blurry"},
    {"prompt": "cat cat", "seed": 3, "lam": 0.0},
    {"prompt": "a cat", "seed": 4, "guided_steps": 0},
    {"prompt": "a wide cat", "seed": 5, "height": 32, "width": 48, "cfg": 1.5},
]


def test_generate_request_validation(gen_worker):
    r = gen_worker.parse({"prompt": "a cat"})
    assert (r.height, r.width, r.guided_steps, r.lam, r.cfg, r.output) == (32, 32, GUIDED, 0.01, 7.5, "png")
    assert r.group_key == (GUIDED, 32, 32)
    for body, err, words in [
        ({"prompt": "x", "height": 64, "width": 64}, InputError,
         "one of the sizes this deployment warmed (32x32, 32x48)"),
        ({"prompt": "x", "height": 32.0, "width": 32}, InputError, "height x width must be"),
        ({"prompt": "x", "guided_steps": STEPS + 1}, ConfigError,
         f"guided_steps must be an integer in [0, steps={STEPS}]"),
        ({"prompt": "x", "steps": 4}, InputError, "unknown request field(s) ['steps']"),
        ({"prompt": "x", "family": "lcm"}, InputError, "unknown request field(s) ['family']"),
        ({"prompt": "x", "output": "latent"}, InputError, "output must be one of png, image_b64"),
        ({"prompt": "\udc80"}, InputError, "lone surrogate"),
        ({"prompt": "x", "cfg": 1e39}, ConfigError, "float32's largest"),
    ]:
        with pytest.raises(err) as e:
            parse_generate(body, gen_worker.settings, gen_worker.sizes)
        assert words in str(e.value)


def test_pipeline_settings():
    with pytest.raises(ConfigError, match="needs both student= and teacher="):
        ServeSettings(student="/models/s")
    s = settings_from_strings({"student": "/m/s", "teacher": "/m/t", "sizes": "512x512,768x512",
                               "batch_buckets": "1,2,8", "graphs": "false", "max_batch_size": "8",
                               "local_files_only": "true"})
    assert (s.mode, s.sizes, s.batch_buckets, s.graphs, s.local_files_only) == \
        ("pipeline", ((512, 512), (768, 512)), (1, 2, 8), False, True)
    assert ServeSettings(max_batch_size=8).resolved_batch_buckets == (1, 2, 4, 8)
    assert ServeSettings(max_batch_size=6).resolved_batch_buckets == (1, 2, 4, 6)
    assert ServeSettings().mode == "preset"
    for kw, words in ((dict(batch_buckets=(1, 2)), "including max_batch_size"), (dict(sizes=((0, 8),)), "sizes"),
                      (dict(graphs="yes"), "graphs")):
        with pytest.raises(ConfigError, match=words):
            ServeSettings(max_batch_size=4, **kw)


def test_generate_batch_matches_single_pipeline_calls(gen_worker, reference_pipe):
    """A batch of 5 requests in three groups: (G=1, 32x32) x 3 padded to the bucket of 4, (G=0) x 1,
    (32x48) x 1; each image equals its own single-request Pipeline call, and so does its PNG."""
    stats = gen_worker.runtime.stats
    padded_before = stats.padded_calls
    reqs = [gen_worker.parse(b) for b in BODIES]
    out = gen_worker.run_batch(reqs)
    assert gen_worker.runtime.stats.padded_calls == padded_before + 1  # the group of 3 ran in the bucket of 4
    for i, (r, x) in enumerate(zip(reqs, out)):
        assert not isinstance(x, Exception), x
        want = reference_image(reference_pipe, r)
        assert_image_close(x, want, f"request {i}")
        assert_png_close(image_png(x), want, f"request {i}")
    assert not np.allclose(out[0], out[2])


def test_warm_prepares_every_bucket_and_size(gen_worker):
    records = gen_worker.runtime.stats.warmups
    assert sorted((r.batch, r.latent_shape) for r in records) == \
        [(b, (4, 16, h)) for b in (1, 2, 4) for h in (16, 24)]
    assert {r.config.guided_steps for r in records} == {GUIDED}
    assert gen_worker.cost(gen_worker.parse({"prompt": "x"})) == (STEPS + 2 * GUIDED) * 16 * 16


@pytest.mark.parametrize("argv, words", [
    (["--student", "/models/s"], "needs both student= and teacher="),
    (["--student", "/s", "--teacher", "/t", "--sizes", "512"], "pass HEIGHTxWIDTH pixel sizes"),
    (["--max-batch-size", "4", "--batch-buckets", "1,2"], "including max_batch_size"),
])
def test_cli_errors_are_one_line(argv, words, capsys):
    from distpp.serve.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(argv)  # refused before any Ray starts
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m distpp.serve: error:") and words in err[0], err
