"""Engine planning without TensorRT: IO specs read from ONNX, optimization profiles, shape and dtype
checks, static buffer plans and cache keys. Everything here runs (and is tested) on a CPU; the
TensorRT and ONNX Runtime backends only call into it.

Naming grid shared by the exporter and both runtimes: the UNet's ONNX inputs are ``sample``
[b, C, H, W], ``timestep`` [b] float32, then the :class:`distpp.Cond` fields it takes
(``encoder_hidden_states`` [b, L, D], ``text_embeds`` [b, P], ``time_ids`` [b, 6], ``timestep_cond``
[b, d]), each named after the Cond field; the output is ``out_sample`` [b, C, H, W]. Dynamic dims are
named ``batch``, ``height`` and ``width``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..cache import cache_key
from ..denoiser import Cond, ModelSpec
from ..errors import ConfigError, InputError, WeightsNotFoundError

SAMPLE, TIMESTEP, OUTPUT = "sample", "timestep", "out_sample"
COND_FIELDS = ("encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond")
BATCH, HEIGHT, WIDTH = "batch", "height", "width"
# ONNX TensorProto element types distpp uses (onnx.TensorProto.FLOAT, FLOAT16, BFLOAT16, INT64).
_ONNX_DTYPES = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 7: torch.int64}

Dim = int | str  # a static size or a dynamic dim's name


def input_names(spec: ModelSpec) -> tuple[str, ...]:
    """The ONNX input names of a UNet with ``spec``, in the exported signature's order."""
    names = [SAMPLE, TIMESTEP, "encoder_hidden_states"]
    if spec.text_embeds_dim is not None:
        names += ["text_embeds", "time_ids"]
    if spec.time_cond_proj_dim is not None:
        names.append("timestep_cond")
    return tuple(names)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: its name, dims (int static, str dynamic) and element dtype."""

    name: str
    dims: tuple[Dim, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class IOSpec:
    """A model's inputs (in order) and its output, as the ONNX file declares them."""

    inputs: tuple[TensorSpec, ...]
    output: TensorSpec

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype: that of ``sample``."""
        return self.input(SAMPLE).dtype


def check_onnx_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it names an existing file; WeightsNotFoundError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFoundError(f"no ONNX file at {str(p)!r}; pass a model written by "
                                   "`python -m distpp.export` (its path is printed at the end)")
    return p


def read_io_spec(path: str | os.PathLike) -> IOSpec:
    """The IOSpec of the ONNX model at ``path`` (graph only: external weights are not read).

    Raises WeightsNotFoundError for a missing file and ConfigError for a file that is not an ONNX
    model or lacks distpp's ``sample``/``timestep``/``out_sample`` names.
    """
    import onnx

    p = check_onnx_path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError/RuntimeError subclasses depending on version
        raise ConfigError(f"{str(p)!r} is not an ONNX model ({type(e).__name__}: {e}); pass a .onnx file "
                          "written by `python -m distpp.export`") from e
    graph = model.graph
    if not graph.input or not graph.output:
        raise ConfigError(f"{str(p)!r} is not an ONNX model with inputs and outputs; pass a .onnx file "
                          "written by `python -m distpp.export`")
    initializers = {i.name for i in graph.initializer}
    inputs = tuple(_tensor_spec(v) for v in graph.input if v.name not in initializers)
    io = IOSpec(inputs, _tensor_spec(graph.output[0]))
    names = set(io.names)
    if not {SAMPLE, TIMESTEP}.issubset(names) or io.output.name != OUTPUT or not names.issubset(
            {SAMPLE, TIMESTEP, *COND_FIELDS}):
        raise ConfigError(f"{str(p)!r} has inputs {sorted(names)} and output {io.output.name!r}; distpp needs "
                          f"a UNet exported by `python -m distpp.export` (inputs {SAMPLE}, {TIMESTEP}, "
                          f"Cond fields; output {OUTPUT})")
    return io


def _tensor_spec(value_info) -> TensorSpec:
    tt = value_info.type.tensor_type
    if tt.elem_type not in _ONNX_DTYPES:
        raise ConfigError(f"ONNX tensor {value_info.name!r} has element type {tt.elem_type}; "
                          "distpp supports float32, float16, bfloat16 and int64")
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
    return TensorSpec(value_info.name, dims, _ONNX_DTYPES[tt.elem_type])


def io_spec_for(spec: ModelSpec, tokens: int, dtype: torch.dtype, spatial_dynamic: bool = True,
                latent_hw: tuple[int, int] | None = None) -> IOSpec:
    """The IOSpec distpp's exporter writes for a UNet with ``spec`` (timestep stays float32)."""
    hw: tuple[Dim, Dim] = (HEIGHT, WIDTH) if spatial_dynamic else tuple(latent_hw)  # type: ignore[assignment]
    C = spec.in_channels
    shapes: dict[str, tuple[Dim, ...]] = {
        SAMPLE: (BATCH, C, *hw), TIMESTEP: (BATCH,),
        "encoder_hidden_states": (BATCH, tokens, spec.cross_attention_dim),
        "text_embeds": (BATCH, spec.text_embeds_dim), "time_ids": (BATCH, spec.time_ids_dim),
        "timestep_cond": (BATCH, spec.time_cond_proj_dim),
    }
    inputs = tuple(TensorSpec(n, shapes[n], torch.float32 if n == TIMESTEP else dtype) for n in input_names(spec))
    return IOSpec(inputs, TensorSpec(OUTPUT, (BATCH, C, *hw), dtype))


# ------------------------------------------------------------------------------------------------
# Optimization profiles
@dataclass(frozen=True)
class ShapeRange:
    """The batch sizes and latent resolutions an engine must serve.

    batch:       (min, opt, max) samples per sampling call B (the teacher sees 2B rows: CFG).
    resolutions: latent (H, W) sizes (pixels / 8); the first is the one tuned for (TensorRT's opt).
    """

    batch: tuple[int, int, int] = (1, 1, 4)
    resolutions: tuple[tuple[int, int], ...] = ((64, 64),)

    def __post_init__(self):
        b = tuple(int(v) for v in self.batch)
        if len(b) != 3 or not 1 <= b[0] <= b[1] <= b[2]:
            raise ConfigError(f"batch range must be (min, opt, max) with 1 <= min <= opt <= max, got {self.batch}")
        res = tuple((int(h), int(w)) for h, w in self.resolutions)
        if not res or any(h < 1 or w < 1 for h, w in res):
            raise ConfigError(f"resolutions must be non-empty latent (H, W) pairs >= 1, got {self.resolutions}")
        object.__setattr__(self, "batch", b)
        object.__setattr__(self, "resolutions", res)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: per input name, its (min, opt, max) shapes."""

    shapes: tuple[tuple[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]], ...]

    def as_dict(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        return dict(self.shapes)

    def max_shape(self, name: str) -> tuple[int, ...]:
        return self.as_dict()[name][2]


def compute_profile(io: IOSpec, shapes: ShapeRange, rows_per_sample: int = 1) -> Profile:
    """The profile covering ``shapes`` for a model with ``io``.

    rows_per_sample: 1 for the student, 2 for the teacher (its CFG input stacks [uncond; cond], 2B rows).
    The spatial range spans the smallest to the largest resolution asked for (H and W separately).
    """
    if rows_per_sample < 1:
        raise ConfigError(f"rows_per_sample must be >= 1 (1 student, 2 teacher), got {rows_per_sample}")
    bmin, bopt, bmax = (b * rows_per_sample for b in shapes.batch)
    hs = [h for h, _ in shapes.resolutions]
    ws = [w for _, w in shapes.resolutions]
    values = {BATCH: (bmin, bopt, bmax), HEIGHT: (min(hs), hs[0], max(hs)), WIDTH: (min(ws), ws[0], max(ws))}
    static_hw = [d for d in io.input(SAMPLE).dims[2:] if isinstance(d, int)]
    if static_hw and any(tuple(io.input(SAMPLE).dims[2:]) != r for r in shapes.resolutions):
        raise ConfigError(f"the model was exported for latent size {io.input(SAMPLE).dims[2:]} only; "
                          f"resolutions {shapes.resolutions} need an export with dynamic height/width")
    out = []
    for t in io.inputs:
        per = []
        for i in range(3):
            dims = []
            for d in t.dims:
                if isinstance(d, int):
                    dims.append(d)
                elif d in values:
                    dims.append(values[d][i])
                else:
                    raise ConfigError(f"input {t.name!r} has dynamic dim {d!r} that distpp cannot size; "
                                      f"export with dynamic {BATCH}/{HEIGHT}/{WIDTH} only")
            per.append(tuple(dims))
        out.append((t.name, tuple(per)))
    return Profile(tuple(out))


# ------------------------------------------------------------------------------------------------
# Feeds and checks (before any launch)
def cond_feeds(io: IOSpec, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
    """The model's inputs by ONNX name: {sample: x, timestep: t, <Cond field>: tensor}.

    Raises InputError when the model needs a Cond field that is None; fields the model does not take
    are ignored (a teacher gets no timestep_cond even if the caller's Cond carries one).
    """
    given = cond.tensors()
    feeds = {SAMPLE: x, TIMESTEP: t}
    for name in io.names:
        if name in (SAMPLE, TIMESTEP):
            continue
        if name not in given:
            raise InputError(f"the model takes {name!r} but the Cond has none; pass Cond({name}=...) "
                             "(LCM's timestep_cond is filled by the denoiser's prepare())")
        feeds[name] = given[name]
    return feeds


def check_feeds(io: IOSpec, feeds: Mapping[str, torch.Tensor], profile: Profile | None = None,
                who: str = "model") -> int:
    """Check ``feeds`` against the IO spec (dtype, rank, static dims, one batch) and, when given, the
    profile's min/max; returns the batch. Raises InputError naming what to pass instead."""
    prof = profile.as_dict() if profile is not None else {}
    batch = None
    bound: dict[str, int] = {}
    for spec in io.inputs:
        v = feeds[spec.name]
        if v.dtype != spec.dtype:
            raise InputError(f"{who} input {spec.name!r} is {v.dtype} but the model was built for {spec.dtype}; "
                             f"cast it (.to({spec.dtype})) or build the model for {v.dtype}")
        if v.dim() != len(spec.dims):
            raise InputError(f"{who} input {spec.name!r} has shape {tuple(v.shape)}; expected {len(spec.dims)} "
                             f"dims {spec.dims}")
        for i, (size, d) in enumerate(zip(v.shape, spec.dims)):
            if isinstance(d, int) and size != d:
                raise InputError(f"{who} input {spec.name!r} has shape {tuple(v.shape)}; dim {i} must be {d} "
                                 f"(expected {spec.dims})")
            if isinstance(d, str) and bound.setdefault(d, int(size)) != size:
                raise InputError(f"{who} input {spec.name!r} has {d} = {size} but another input has "
                                 f"{bound[d]}; all inputs must agree")
        if batch is None:
            batch = int(v.shape[0])
        if spec.name in prof:
            lo, _, hi = prof[spec.name]
            if any(s < a or s > b for s, a, b in zip(v.shape, lo, hi)):
                raise InputError(f"{who} input {spec.name!r} has shape {tuple(v.shape)}, outside the built "
                                 f"profile [{lo} .. {hi}]; rebuild with a ShapeRange that covers it "
                                 "(teacher rows are 2 x the sample batch)")
    return int(batch or 0)


# ------------------------------------------------------------------------------------------------
# Static buffers
@dataclass(frozen=True)
class BufferPlan:
    """Static buffers sized for a profile's max shapes: one per input and one for the output.

    sizes: per name, (element count at the max shape, dtype). A call with smaller shapes uses a view
    of the first elements of each buffer, so every tensor address stays fixed (CUDA-graph safe).
    """

    sizes: tuple[tuple[str, int, torch.dtype], ...]

    def allocate(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {n: torch.empty(numel, dtype=dt, device=device) for n, numel, dt in self.sizes}

    def nbytes(self) -> int:
        return sum(numel * torch.empty((), dtype=dt).element_size() for _, numel, dt in self.sizes)


def plan_buffers(io: IOSpec, profile: Profile) -> BufferPlan:
    """The BufferPlan for ``io`` at ``profile``'s max shapes (output sized like ``sample``)."""
    sizes = []
    for t in io.inputs:
        sizes.append((t.name, _numel(profile.max_shape(t.name)), t.dtype))
    sizes.append((io.output.name, _numel(profile.max_shape(SAMPLE)), io.output.dtype))
    return BufferPlan(tuple(sizes))


def view(buffer: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The first prod(shape) elements of a flat static ``buffer`` as ``shape`` (same address)."""
    n = _numel(shape)
    if n > buffer.numel():
        raise InputError(f"shape {tuple(shape)} needs {n} elements; the static buffer holds {buffer.numel()} "
                         "(rebuild with a larger ShapeRange)")
    return buffer[:n].view(tuple(shape))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------------------------------------
# Cache keys
def weights_hash(module: torch.nn.Module) -> str:
    """sha256 (hex) over a module's state dict: names, dtypes, shapes and bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def onnx_key(*, model_config: Mapping[str, Any], weights: str, opset: int, dtype: str,
             dynamic_axes: Mapping[str, Any], example_shapes: Mapping[str, Any], exporter: str,
             torch_version: str, onnx_version: str, external_data: bool) -> str:
    """Cache key of an ONNX export: everything that changes the file.

    example_shapes: the traced example inputs' shapes (the legacy exporter bakes shape-dependent
    branches of the traced forward, so they are part of what is built).
    """
    return cache_key(artifact="onnx", model_config=dict(model_config), weights=weights, opset=int(opset),
                     dtype=dtype, dynamic_axes=dict(dynamic_axes), example_shapes=dict(example_shapes),
                     exporter=exporter, torch=torch_version, onnx=onnx_version, external_data=bool(external_data))


def engine_key(*, onnx_sha256: str, profile: Profile, precision: Sequence[str], opt_level: int,
               workspace_bytes: int | None, trt_version: str, gpu_name: str,
               compute_capability: tuple[int, int]) -> str:
    """Cache key of a TensorRT engine: the ONNX bytes' sha256, the profile, precision flags, the other
    builder settings (optimization level, workspace limit: both change the tactics chosen), the
    TensorRT version and the GPU (name and compute capability)."""
    return cache_key(artifact="trt_engine", onnx=onnx_sha256, profile=profile.shapes,
                     precision=sorted(precision), opt_level=int(opt_level),
                     workspace_bytes=None if workspace_bytes is None else int(workspace_bytes),
                     tensorrt=trt_version, gpu=gpu_name, cc=list(compute_capability))


def onnx_sha256(path: str | os.PathLike) -> str:
    """sha256 over the bytes of an ONNX model: the .onnx file and each external data file it names."""
    import hashlib

    import onnx

    from ..cache import file_sha256

    p = check_onnx_path(path)
    model = onnx.load(str(p), load_external_data=False)
    locations = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    h = hashlib.sha256(file_sha256(p).encode())
    for loc in locations:
        h.update(loc.encode())
        h.update(file_sha256(p.parent / loc).encode())
    return h.hexdigest()
