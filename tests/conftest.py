import os

# Triton kernels run interpreted on machines without a CUDA GPU; this must be set before triton is
# imported anywhere, so it is done here, at collection start.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pair():
    from distpp.presets import build_preset

    return build_preset("tiny")


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_pair):
    """The tiny preset's student and teacher exported once (legacy exporter, fp32) into a session cache:
    {"cache": ArtifactCache, "student": Path, "teacher": Path}."""
    pytest.importorskip("onnxruntime")
    from distpp.cache import ArtifactCache
    from distpp.export import cached_export

    cache = ArtifactCache(tmp_path_factory.mktemp("onnx_cache"))
    hw, tokens = tuple(tiny_pair.info.latent_shape[1:]), tiny_pair.info.tokens
    return {"cache": cache, **{r: cached_export(getattr(tiny_pair, r), latent_hw=hw, tokens=tokens, cache=cache)
                               for r in ("student", "teacher")}}
