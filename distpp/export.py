"""ONNX export of a preset's (or given weights') student and teacher UNets: ``python -m distpp.export``.

Each UNet is exported with distpp's IO names (see distpp.backends.plan): inputs ``sample`` [b, C, H, W],
``timestep`` [b] float32, ``encoder_hidden_states`` [b, L, D], SDXL's ``text_embeds`` [b, P] and
``time_ids`` [b, 6] when the UNet takes added conditioning, LCM's ``timestep_cond`` [b, d] when it has a
w-embedding; output ``out_sample``. Batch (and by default height/width) are dynamic. Files are stored
through distpp's ArtifactCache (kind ``onnx``) under a key of the model config, a weights hash, opset,
dtype, dynamic axes, example shapes, exporter and torch/onnx versions, so a second export is a lookup.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backends.plan import (BATCH, HEIGHT, OUTPUT, SAMPLE, WIDTH, input_names, onnx_key,
                            weights_hash)
from .cache import ArtifactCache
from .denoiser import Cond, UNetDenoiser, unet_forward
from .dtypes import parse_dtype
from .errors import BackendUnavailableError, ConfigError, DistppError

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXPORTERS = ("legacy", "dynamo")
# Protobuf cannot hold a file over 2 GiB; above this many weight bytes the export stores weights as
# external data (SD1.5's UNet is 3.4 GB in fp32, SDXL's 10 GB).
EXTERNAL_DATA_BYTES = 1 << 30
# --verify bounds: fp32 is the 1e-4 (measured ~1e-6 on the tiny preset); fp16 compares two
# fp16 computations with different kernel orders (measured ~1.5e-3 on the tiny preset, 2-core CPU).
VERIFY_TOL = {"fp32": 1e-4, "fp16": 1e-2}


@dataclass(frozen=True)
class ExportConfig:
    """How to export a UNet to ONNX.

    opset:           ONNX opset (>= 18: GroupNorm/LayerNorm and Attention patterns TensorRT 10 parses).
    dtype:           "fp32" or "fp16" weights and IO (timestep stays float32).
    dynamic_spatial: dynamic height/width besides the batch (needed for multi-resolution profiles).
    exporter:        "legacy" (TorchScript tracing; ~1 s for the tiny UNet on a 2-core CPU) or "dynamo"
                     (torch.export; ~26 s there).
    external_data:   store weights in ``model.onnx.data``; None = automatic (over EXTERNAL_DATA_BYTES).
    example_batch:   batch of the traced example inputs (not 1, so batch-1 specializations are not baked).
    """

    opset: int = 18
    dtype: str = "fp32"
    dynamic_spatial: bool = True
    exporter: str = "legacy"
    external_data: bool | None = None
    example_batch: int = 2

    def __post_init__(self):
        if int(self.opset) < 18:
            raise ConfigError(f"opset {self.opset} is too old; pass opset >= 18")
        if self.dtype not in ("fp32", "fp16"):
            raise ConfigError(f"export dtype {self.dtype!r} is not supported; pass 'fp32' or 'fp16'")
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"exporter {self.exporter!r} is unknown; pass one of {EXPORTERS}")
        if int(self.example_batch) < 2:
            raise ConfigError(f"example_batch must be >= 2 (batch-1 traces may specialize), got {self.example_batch}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, what="export dtype")


class _UNetSignature(torch.nn.Module):
    """The UNet with distpp's positional ONNX signature (see input_names)."""

    def __init__(self, unet, names: tuple[str, ...]):
        super().__init__()
        self.unet, self.names = unet, names

    def forward(self, *args):
        a = dict(zip(self.names, args))
        cond = Cond(a["encoder_hidden_states"], a.get("text_embeds"), a.get("time_ids"), a.get("timestep_cond"))
        return unet_forward(self.unet, a[SAMPLE], a["timestep"], cond)


def example_inputs(base: UNetDenoiser, batch: int, latent_hw: tuple[int, int], tokens: int,
                   dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs by ONNX name for ``base``'s UNet (timesteps in [0, 999], float32)."""
    g = torch.Generator().manual_seed(seed)
    s = base.spec
    shapes = {SAMPLE: (batch, s.in_channels, *latent_hw), "encoder_hidden_states": (batch, tokens, s.cross_attention_dim),
              "text_embeds": (batch, s.text_embeds_dim), "time_ids": (batch, s.time_ids_dim),
              "timestep_cond": (batch, s.time_cond_proj_dim)}
    out = {}
    for name in input_names(s):
        if name == "timestep":
            out[name] = torch.rand(batch, generator=g) * 999.0
        else:
            out[name] = torch.randn(shapes[name], generator=g).to(dtype)
    return {k: v.to(s.device) for k, v in out.items()}


def dynamic_axes(names: tuple[str, ...], dynamic_spatial: bool) -> dict[str, dict[int, str]]:
    axes = {n: {0: BATCH} for n in names + (OUTPUT,)}
    if dynamic_spatial:
        for n in (SAMPLE, OUTPUT):
            axes[n] = {0: BATCH, 2: HEIGHT, 3: WIDTH}
    return axes


def _model_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in module.parameters()) * torch.empty((), dtype=dtype).element_size()


def export_onnx(base: UNetDenoiser, folder: str | os.PathLike, cfg: ExportConfig, latent_hw: tuple[int, int],
                tokens: int) -> Path:
    """Export ``base``'s UNet to ``folder/model.onnx`` (+ ``model.onnx.data`` with external data).

    The UNet is traced on CPU-or-its-device inputs of batch ``cfg.example_batch`` at ``latent_hw``
    with ``tokens`` text tokens. A UNet in another dtype than ``cfg.dtype`` is copied and cast (the
    caller's module is left as is).
    """
    import onnx

    unet = base.unet
    if next(unet.parameters()).dtype != cfg.torch_dtype:
        unet = copy.deepcopy(unet).to(cfg.torch_dtype)
    names = input_names(base.spec)
    args = example_inputs(base, cfg.example_batch, latent_hw, tokens, cfg.torch_dtype)
    module = _UNetSignature(unet, names).eval()
    external = cfg.external_data if cfg.external_data is not None else \
        _model_bytes(unet, cfg.torch_dtype) > EXTERNAL_DATA_BYTES
    folder = Path(folder)
    # The exporter may scatter external tensors as one file per weight: export into scratch, then
    # save once into ``folder`` with a single data file. The scratch lives inside ``folder`` (under the
    # cache, its temp folder), so a killed export leaves nothing that the next build does not sweep.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as scratch:
        raw = Path(scratch) / ONNX_FILE
        with torch.no_grad(), _quiet_export():
            torch.onnx.export(module, tuple(args[n] for n in names), str(raw), input_names=list(names),
                              output_names=[OUTPUT], dynamic_axes=dynamic_axes(names, cfg.dynamic_spatial),
                              opset_version=int(cfg.opset), dynamo=cfg.exporter == "dynamo",
                              **({"do_constant_folding": True} if cfg.exporter == "legacy" else {}))
        model = onnx.load(str(raw), load_external_data=True)
        if external:
            onnx.save_model(model, str(folder / ONNX_FILE), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        else:
            onnx.save_model(model, str(folder / ONNX_FILE))
    return folder / ONNX_FILE


class _quiet_export:
    """Silence the tracer's TracerWarnings (shape asserts in diffusers' forward: expected, not actionable)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def config_for_key(unet) -> dict[str, Any]:
    """The UNet config as a cache-key part: its public fields and the diffusers version tracing it.

    Private fields are left out: ``_use_default_values`` is built from a set, so its order changes with
    each process's hash seed (two processes would disagree on the key), and ``_name_or_path`` names
    where weights came from, which the weights hash covers.
    """
    import diffusers

    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    cfg["diffusers_version"] = diffusers.__version__
    cfg["class"] = type(unet).__name__
    return cfg


def export_key(base: UNetDenoiser, cfg: ExportConfig, latent_hw: tuple[int, int], tokens: int) -> tuple[str, dict]:
    """(cache key, manifest meta) of exporting ``base`` with ``cfg``."""
    import onnx

    names = input_names(base.spec)
    shapes = {n: list(v.shape) for n, v in
              example_inputs(base, cfg.example_batch, latent_hw, tokens, torch.float32).items()}
    external = cfg.external_data if cfg.external_data is not None else \
        _model_bytes(base.unet, cfg.torch_dtype) > EXTERNAL_DATA_BYTES
    parts: dict[str, Any] = dict(model_config=config_for_key(base.unet), weights=weights_hash(base.unet),
                                 opset=cfg.opset, dtype=cfg.dtype, dynamic_axes=dynamic_axes(names, cfg.dynamic_spatial),
                                 example_shapes=shapes, exporter=cfg.exporter, torch_version=torch.__version__,
                                 onnx_version=onnx.__version__, external_data=external)
    meta = {k: v for k, v in parts.items() if k != "model_config"}
    return onnx_key(**parts), meta


def cached_export(base: UNetDenoiser, cfg: ExportConfig = ExportConfig(), *, latent_hw: tuple[int, int],
                  tokens: int, cache: ArtifactCache | None = None) -> Path:
    """Path of ``model.onnx`` for ``base`` exported with ``cfg``: from the cache, or exported into it."""
    _require_onnx()
    from .backends.plan import read_io_spec

    cache = cache or ArtifactCache()
    key, meta = export_key(base, cfg, latent_hw, tokens)
    folder = cache.get_or_build("onnx", key, lambda tmp: export_onnx(base, tmp, cfg, latent_hw, tokens), meta=meta,
                                validate=lambda f: read_io_spec(f / ONNX_FILE))
    return folder / ONNX_FILE


def verify(base: UNetDenoiser, onnx_path: str | os.PathLike, *, latent_hw: tuple[int, int], tokens: int,
           batches: tuple[int, ...] = (1, 3), seed: int = 1) -> float:
    """Max relative error (L2) of onnxruntime (CPU) vs torch over random inputs at each batch size.

    Batches differ from the traced example batch, so a baked batch size shows up as an error.
    """
    from .backends.onnxruntime import OrtSession

    sess = OrtSession(onnx_path, device="cpu")
    dtype = sess.io.dtype
    p = next(base.unet.parameters())
    # never move or cast the caller's UNet: work on a CPU copy unless it already is one in this dtype
    unet = base.unet if (p.dtype == dtype and p.device.type == "cpu") else copy.deepcopy(base.unet).to("cpu", dtype)
    module = _UNetSignature(unet, input_names(base.spec)).eval()
    worst = 0.0
    for i, b in enumerate(batches):
        feeds = {k: v.cpu() for k, v in example_inputs(base, b, latent_hw, tokens, dtype, seed=seed + i).items()}
        with torch.no_grad():
            ref = module(*(feeds[n] for n in sess.io.names)).double()
        out = sess.run(feeds).double()
        worst = max(worst, float((out - ref).norm() / ref.norm().clamp_min(1e-30)))
    return worst


def _require_onnx() -> None:
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise BackendUnavailableError("ONNX export needs the onnx package; pip install 'distpp[onnx]'")


# ------------------------------------------------------------------------------------------------
def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m distpp.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (tiny, tiny_xl, sd15, sdxl); default tiny")
    p.add_argument("--weights", default=None, help="local folder with student/ and teacher/ diffusers UNets")
    p.add_argument("--which", choices=("student", "teacher", "both"), default="both")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--exporter", choices=EXPORTERS, default="legacy")
    p.add_argument("--static-spatial", action="store_true", help="fix height/width to the preset's latent size")
    p.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--cache-dir", default=None, help="artifact cache root (default $DISTPP_CACHE or ~/.cache/distpp)")
    p.add_argument("--device", default="cpu", help="device to trace on (fp16 export wants cuda)")
    p.add_argument("--force", action="store_true", help="build large presets on CPU anyway")
    p.add_argument("--verify", action="store_true", help="compare onnxruntime (CPU) with torch on random inputs")
    p.add_argument("--tol", type=float, default=None,
                   help="--verify relative error bound (default 1e-4 for fp32, 1e-2 for fp16)")
    return p.parse_args(argv)


def _cli_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name} is not a device; pass --device cpu or --device cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible here; pass --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); pass --device cuda")
    return device


def main(argv=None) -> int:
    """The CLI; bad input is one line on stderr (``distpp.export: ...``) and exit code 2."""
    a = _parse(argv)
    try:
        return _run(a)
    except DistppError as e:
        print(f"distpp.export: {e}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .presets import build_preset

    if a.opset < 18:
        raise ConfigError(f"--opset {a.opset} is too old; pass --opset 18 or newer")
    if a.tol is not None and not a.tol > 0:
        raise ConfigError(f"--tol {a.tol} must be positive; pass e.g. --tol 1e-4")
    device = _cli_device(a.device)
    cfg = ExportConfig(opset=a.opset, dtype=a.dtype, dynamic_spatial=not a.static_spatial, exporter=a.exporter,
                       external_data={"auto": None, "yes": True, "no": False}[a.external_data])
    cache = ArtifactCache(a.cache_dir)
    pair = build_preset(a.preset, device=device, weights=a.weights, force=a.force)
    hw, tokens = tuple(pair.info.latent_shape[1:]), pair.info.tokens
    roles = ("student", "teacher") if a.which == "both" else (a.which,)
    tol = a.tol if a.tol is not None else VERIFY_TOL[a.dtype]
    failed = False
    bar = tqdm(roles, desc="export", unit="unet", file=sys.stderr)
    for role in bar:
        bar.set_postfix_str(role)
        base = getattr(pair, role)
        t0 = time.perf_counter()
        path = cached_export(base, cfg, latent_hw=hw, tokens=tokens, cache=cache)
        line = f"{role}: {path} ({time.perf_counter() - t0:.1f} s)"
        if a.verify:
            err = verify(base, path, latent_hw=hw, tokens=tokens)
            ok = err <= tol
            failed |= not ok
            line += f"  verify: relative error {err:.2e} ({'ok' if ok else 'FAIL'}, bound {tol:.0e})"
        tqdm.write(line, file=sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
