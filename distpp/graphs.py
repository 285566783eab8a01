"""Whole-loop CUDA graphs: one graph per key over static buffers owned by distpp.

``GraphRunner(sampler)`` serves ``sample(...)`` calls like ``Sampler.sample``. Per call it runs
``Sampler.prepare`` (validation, noise, per-call tables), copies that ``Plan`` into the static ``Plan``
of the call's :class:`GraphKey`, replays the captured loop (every student forward, the teacher
forward(s) and the fused ops of ``run_loop``) and returns the result (a copy unless ``copy=False``).

Noise: kept as eager pre-drawn buffers (``Sampler.prepare`` draws them from the per-sample generators
before the replay) rather than drawn inside the graph. Why: graph results then equal ``Sampler.sample``
on the same seeds up to kernel rounding (one randomness contract for both modes, and the graph-vs-eager
test compares like with like), and the draws cost ``B * (1 + draws + G)`` small launches before the
replay, which the bench reports under "other". Seeds, lam and cfg therefore change without re-capture:
they only change what is copied into the static buffers.

Keys (``GraphKey``) hold everything that fixes a static buffer's shape or dtype or the captured work:
model label, backend, family, steps, guided steps, fused-op implementation, batch, latent shape,
dtypes, device and the conditioning fields' row shapes. A call whose plan does not match a cached key
is routed to a new capture (``on_miss="capture"``), run eagerly (``"eager"``) or refused with
CaptureError (``"error"``); buffers are also checked field by field before each copy, so a plan is never
replayed on buffers of another shape or dtype. With ``pad=True`` a batch smaller than a cached key's is
padded to it (rows replicate the last sample and are dropped from the result).

Several runners may share one :class:`GraphBudget` (a Runtime's: one per sampler config): the LRU bound
then counts every runner's cached keys together, and the runners share the budget's lock.

Off CUDA (or with ``graphs=False``) the same API runs the loop eagerly over the same static buffers:
that is what the CPU tests exercise. Running out of GPU memory during a capture leaves that key eager,
with a warning; other capture failures raise CaptureError and leave the runner usable.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from .denoiser import Cond
from .errors import CaptureError, ConfigError, InputError
from .ops import FusedOps
from .sampler import Plan, Sampler, device_guard, run_loop

ON_MISS = ("capture", "eager", "error")
# (Plan field, batch axis, halves): t_teacher and cond_t hold [uncond B; cond B] rows.
_BATCHED = (("x", 0, 1), ("x_in", 0, 1), ("z", 1, 1), ("n", 1, 1), ("gcoef", 1, 1), ("t_student", 1, 1),
            ("t_teacher", 1, 2), ("lam", 0, 1), ("cfg", 0, 1))


@dataclass(frozen=True)
class GraphKey:
    """Everything that fixes a captured loop's buffers and work (lam, cfg, seeds and noise do not)."""

    model: str
    backend: str
    family: str
    steps: int
    guided_steps: int
    ops: str
    batch: int
    latent_shape: tuple[int, ...]
    dtype: str
    teacher_dtype: str
    device: str
    cond: tuple  # ((role, field, row shape, dtype), ...) of the prepared student and teacher Cond

    def with_batch(self, batch: int) -> "GraphKey":
        return replace(self, batch=batch)


@dataclass
class GraphStats:
    """Counters of one runner (host ints, read without syncing)."""

    captures: int = 0
    replays: int = 0
    eager_runs: int = 0  # loops run without a graph: on a cached key's static buffers, or uncached (on_miss)
    static_runs: int = 0  # of those, served by a cached key's static buffers (off CUDA, not capturable, OOM)
    evictions: int = 0
    padded_calls: int = 0
    oom_fallbacks: int = 0
    capture_s: float = 0.0


@dataclass
class _Entry:
    key: GraphKey
    plan: Plan  # the static buffers
    run: Callable[[], None]
    graph: object | None = None  # torch.cuda.CUDAGraph, or None when the entry runs eagerly
    capture_s: float = 0.0

    def release(self) -> None:
        if self.graph is not None and hasattr(self.graph, "reset"):
            self.graph.reset()
        self.graph = None


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _cond_sig(role: str, cond: Cond | None) -> tuple:
    if cond is None:
        return ()
    return tuple((role, k, tuple(v.shape[1:]), _dt(v.dtype)) for k, v in sorted(cond.tensors().items()))


def plan_key(plan: Plan, sampler: Sampler, *, model: str, backend: str, ops: FusedOps) -> GraphKey:
    """The key of ``plan`` (host metadata only)."""
    cfg = sampler.config
    return GraphKey(model=model, backend=backend, family=cfg.family, steps=sampler.schedule.steps,
                    guided_steps=plan.guided_steps, ops=ops.name, batch=plan.batch,
                    latent_shape=tuple(plan.x.shape[1:]), dtype=_dt(plan.x_in.dtype),
                    teacher_dtype=_dt(plan.t_in.dtype) if plan.t_in is not None else "",
                    device=str(plan.x.device), cond=_cond_sig("student", plan.cond_s) + _cond_sig("teacher", plan.cond_t))


def _rows(t: torch.Tensor, axis: int, halves: int, batch: int) -> torch.Tensor:
    """``t`` with its batch axis (of size halves * b) resized to halves * batch rows, uninitialized."""
    shape = list(t.shape)
    shape[axis] = halves * batch
    return torch.empty(shape, dtype=t.dtype, device=t.device)


def _check(dst: torch.Tensor, src: torch.Tensor, axis: int, name: str) -> None:
    """CaptureError unless ``src`` fits ``dst``: same dtype, device and non-batch shape, batch <= dst's."""
    def other(t):
        return tuple(t.shape[:axis]) + tuple(t.shape[axis + 1:])

    if dst.dtype != src.dtype or dst.device != src.device or other(dst) != other(src) \
            or src.shape[axis] > dst.shape[axis]:
        raise CaptureError(f"static buffer {name} is {tuple(dst.shape)} {dst.dtype} on {dst.device} but the call "
                           f"has {tuple(src.shape)} {src.dtype} on {src.device}; refusing to replay on it")


def _put(dst: torch.Tensor, src: torch.Tensor, axis: int, halves: int) -> None:
    """Copy ``src`` into ``dst`` along the batch ``axis``; rows of ``dst`` past ``src``'s batch (per half)
    replicate ``src``'s last row, so padded samples compute on finite, realistic values."""
    if dst.shape[axis] == src.shape[axis]:
        dst.copy_(src)
        return
    bd, bs = dst.shape[axis] // halves, src.shape[axis] // halves
    for h in range(halves):
        d, s = dst.narrow(axis, h * bd, bd), src.narrow(axis, h * bs, bs)
        d.narrow(axis, 0, bs).copy_(s)
        pad = d.narrow(axis, bs, bd - bs)
        pad.copy_(s.narrow(axis, bs - 1, 1).expand_as(pad))


def _cond_pairs(static: Plan, plan: Plan):
    for role, halves in (("cond_s", 1), ("cond_t", 2)):
        a, b = getattr(static, role), getattr(plan, role)
        if (a is None) != (b is None) or (a is not None and set(a.tensors()) != set(b.tensors())):
            raise CaptureError(f"the call's {role} fields differ from the captured graph's; refusing to replay")
        if a is not None:
            for k, v in b.tensors().items():
                yield f"{role}.{k}", getattr(a, k), v, halves


def fill_plan(static: Plan, plan: Plan) -> None:
    """Copy ``plan`` (batch b) into the static buffers (batch >= b), padding rows past b.

    Every buffer's dtype, device and non-batch shape is checked first; CaptureError if any differs.
    ``t_in`` is not copied: student_update writes it before the teacher reads it.
    """
    if plan.guided_steps != static.guided_steps:
        raise CaptureError(f"the call has {plan.guided_steps} guided steps, the graph {static.guided_steps}")
    pairs = [(n, getattr(static, n), getattr(plan, n), ax, h) for n, ax, h in _BATCHED]
    pairs += [(n, d, s, 0, h) for n, d, s, h in _cond_pairs(static, plan)]
    for name, d, s, ax, _ in pairs:  # check all before writing any
        _check(d, s, ax, name)
    for _, d, s, ax, h in pairs:
        _put(d, s, ax, h)


def alloc_static(plan: Plan, batch: int) -> Plan:
    """Static buffers shaped like ``plan`` at ``batch`` samples, filled from ``plan`` (padded)."""
    with torch.inference_mode(False):
        bufs = {n: _rows(getattr(plan, n), ax, h, batch) for n, ax, h in _BATCHED}
        cond_s = plan.cond_s.map(lambda v: _rows(v, 0, 1, batch))
        cond_t = plan.cond_t.map(lambda v: _rows(v, 0, 2, batch)) if plan.cond_t is not None else None
        t_in = None
        if plan.t_in is not None:
            t_in = _rows(plan.t_in, 0, 2, batch)
        # scratch for non-contiguous predictions (see Plan), never copied from a call's plan
        m_s = torch.empty_like(bufs["x"])
        m_t = _rows(bufs["x"], 0, 2, batch) if plan.guided_steps > 0 else None
    static = Plan(t_in=t_in, cond_s=cond_s, cond_t=cond_t, guided_steps=plan.guided_steps, m_s=m_s, m_t=m_t, **bufs)
    fill_plan(static, plan)
    if t_in is not None:  # finite values before the first student_update (forward-only timing reads it)
        t_in.copy_(static.x_in.repeat((2,) + (1,) * (static.x_in.dim() - 1)).to(t_in.dtype))
    return static


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or "out of memory" in str(e).lower()


class GraphBudget:
    """One LRU bound on the cached keys of several GraphRunners, and the lock they share.

    max_graphs: keys cached by all the runners together (>= 1); the least recently used key of any runner
                is evicted (its graph pool and buffers released) to make room for a new one.
    """

    def __init__(self, max_graphs: int = 4):
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ConfigError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self.lock = threading.RLock()
        self._lru: OrderedDict[tuple[int, GraphKey], "GraphRunner"] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def touch(self, runner: "GraphRunner", key: GraphKey) -> None:
        self._lru.move_to_end((id(runner), key))

    def add(self, runner: "GraphRunner", key: GraphKey) -> None:
        self._lru[(id(runner), key)] = runner

    def discard(self, runner: "GraphRunner", key: GraphKey) -> None:
        self._lru.pop((id(runner), key), None)

    def make_room(self) -> None:
        """Evict least recently used keys (of any runner) until one more fits. Caller holds ``lock``."""
        while len(self._lru) >= self.max_graphs:
            (_, key), runner = next(iter(self._lru.items()))
            runner._evict(key)


def capture_cuda(run: Callable[[], object], warmup_iters: int = 2):
    """(replay, graph): ``run`` warmed up on a side stream (Triton JIT, cuBLAS workspaces and allocator
    pools settle outside the capture), then captured into a CUDAGraph with its own memory pool, so
    evicting the graph releases its memory."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_iters):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread's prepare (allocations, copies on its own stream) may run meanwhile
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        run()
    return graph.replay, graph


class GraphRunner:
    """Serves ``Sampler.sample``-style calls through whole-loop CUDA graphs cached by key.

    sampler:     the Sampler (its models, schedule, config and fused ops).
    graphs:      True / False / None (= True on a CUDA device). Off CUDA the runner always runs eagerly
                 over its static buffers (same API, same keys and caching).
    max_graphs:  LRU bound on cached keys (>= 1); an evicted graph's pool and buffers are released.
    budget:      a GraphBudget shared with other runners (then ``max_graphs`` is the budget's, and the
                 runners share its lock); default: a budget of this runner's own.
    pad:         run a batch smaller than a cached key's batch padded to it (instead of a new capture).
    on_miss:     what a call with no fitting cached key does: "capture" (default), "eager" (run eagerly,
                 uncached), "error" (CaptureError; e.g. for a server after ``warmup``).
    model:       label of the model pair in keys (default: the student's class name).
    backend:     label of the UNet backend in keys ("eager", "compile", "onnxruntime", "tensorrt").
    ops:         fused ops override (default: the sampler's); the bench passes no-op ops to time the
                 model forwards alone under the same graph.
    warmup_iters: loop runs on a side stream before each capture.
    """

    def __init__(self, sampler: Sampler, *, graphs: bool | None = None, max_graphs: int = 4, pad: bool = True,
                 on_miss: str = "capture", model: str | None = None, backend: str = "eager",
                 ops: FusedOps | None = None, warmup_iters: int = 2, budget: GraphBudget | None = None):
        if not isinstance(sampler, Sampler):
            raise ConfigError(f"GraphRunner wraps a distpp.Sampler, got {type(sampler).__name__}")
        if budget is None:
            budget = GraphBudget(max_graphs)  # validates max_graphs
        elif not isinstance(budget, GraphBudget):
            raise ConfigError(f"budget must be a distpp.graphs.GraphBudget, got {type(budget).__name__}")
        if on_miss not in ON_MISS:
            raise ConfigError(f"on_miss must be one of {', '.join(ON_MISS)}, got {on_miss!r}")
        if not isinstance(warmup_iters, int) or warmup_iters < 1:
            raise ConfigError(f"warmup_iters must be an int >= 1 (Triton JIT must run before capture), got {warmup_iters!r}")
        self.sampler, self.budget, self.pad, self.on_miss = sampler, budget, bool(pad), on_miss
        self.max_graphs = budget.max_graphs
        self.model = model or sampler.student.name
        self.backend, self.ops, self.warmup_iters = backend, ops or sampler.ops, warmup_iters
        on_cuda = sampler.device.type == "cuda"
        self.use_cuda_graphs = on_cuda if graphs is None else bool(graphs) and on_cuda
        fixed = [m.name for m in (sampler.student, sampler.teacher) if m is not None and not m.capturable]
        if self.use_cuda_graphs and fixed:
            warnings.warn(f"distpp: {', '.join(fixed)} cannot be captured in a CUDA graph (its forward synchronizes "
                          "the host); this GraphRunner runs its loops eagerly over the static buffers",
                          RuntimeWarning, stacklevel=2)
            self.use_cuda_graphs = False
        self.stats = GraphStats()
        self._cache: OrderedDict[GraphKey, _Entry] = OrderedDict()
        self._eager_keys: set[GraphKey] = set()  # keys whose capture ran out of memory
        self._lock = budget.lock

    # ------------------------------------------------------------------------------------------------
    def keys(self) -> list[GraphKey]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._cache)

    def is_captured(self, key: GraphKey) -> bool:
        with self._lock:
            e = self._cache.get(key)
            return e is not None and e.graph is not None

    def clear(self) -> None:
        """Drop every cached graph and its buffers, and release the freed memory to the device."""
        with self._lock:
            while self._cache:
                self._evict(next(iter(self._cache)))

    def static_plan(self, key: GraphKey) -> Plan:
        """The static buffers of a cached key (for tests and debugging; do not hold on to them)."""
        with self._lock:
            if key not in self._cache:
                raise CaptureError(f"no cached graph for {key}")
            return self._cache[key].plan

    # ------------------------------------------------------------------------------------------------
    def sample(self, cond: Cond, *, copy: bool = True, timer=None, **kw) -> torch.Tensor:
        """Sample like ``Sampler.sample(cond, **kw)``; returns [B, C, H, W] float32 latents.

        copy:  True (default) returns a new tensor; False returns a view of the static output buffer,
               valid until the next call served by the same static buffers (the same key, or with
               ``pad=True`` a smaller batch padded into that key).
        Calls from several threads are serialized by a lock that orders the host-side work; on CUDA they
        must enqueue on the same stream (the default), which orders the buffer copies and replays.
        timer: optional StageTimer; graph replays are lapped as stage "graph" (eager entries lap per
               stage as run_loop does), prepare + buffer copies as "other".
        Other keyword arguments are those of Sampler.sample (uncond, latent_shape, noise, seeds, lam, ...).
        """
        with device_guard(self.sampler.device):
            plan = self.sampler.prepare(cond, **kw)
            return self.sampler.check_result(self._run(plan, copy=copy, timer=timer), plan)

    def warmup(self, cond: Cond, *, batch_sizes: Iterable[int] | None = None, **kw) -> list[GraphKey]:
        """Capture (or, off CUDA, build the buffers of) the graphs for ``batch_sizes`` (default: cond's
        batch) at the shapes of ``cond`` and ``kw`` (latent_shape, uncond, ...), before serving. Each
        size uses cond's first row repeated; returns the keys now cached."""
        sizes = [cond.batch] if batch_sizes is None else [int(b) for b in batch_sizes]
        if not sizes or any(b < 1 for b in sizes):
            raise InputError(f"batch_sizes must be ints >= 1, got {batch_sizes!r}")
        if any(k in kw for k in ("noise", "seeds", "generators", "guidance_generators")):
            raise InputError("warmup draws its own noise: pass latent_shape=(C, H, W), not noise/seeds/generators")
        keys = []
        for b in sizes:
            cb = cond.map(lambda v: v[:1].expand((b,) + tuple(v.shape[1:])).contiguous())
            plan = self.sampler.prepare(cb, seeds=list(range(b)), **kw)
            with self._lock, device_guard(self.sampler.device):
                key = self._key(plan)
                self._entry(key, plan, allow_pad=False, on_miss="capture")
            keys.append(key)
        return keys

    # ------------------------------------------------------------------------------------------------
    def _key(self, plan: Plan) -> GraphKey:
        return plan_key(plan, self.sampler, model=self.model, backend=self.backend, ops=self.ops)

    def _run(self, plan: Plan, *, copy: bool, timer) -> torch.Tensor:
        B = plan.batch
        with self._lock:
            key = self._key(plan)
            entry = self._entry(key, plan, allow_pad=self.pad)
            if entry is None:  # on_miss="eager": the call's own buffers, nothing cached
                self.stats.eager_runs += 1
                with torch.inference_mode():
                    # plan.x belongs to this call alone: no copy needed either way
                    return run_loop(self.sampler.student, self.sampler.teacher, self.ops, self.sampler.schedule,
                                    plan, timer)
            if entry.key.batch != B:
                self.stats.padded_calls += 1
            with torch.inference_mode():
                fill_plan(entry.plan, plan)
                if entry.graph is not None:
                    if timer is not None:
                        timer.lap("other")
                    entry.run()
                    self.stats.replays += 1
                    if timer is not None:
                        timer.lap("graph")
                else:
                    self.stats.static_runs += 1
                    self._run_eager(entry.plan, timer)
            out = entry.plan.x[:B]
            return out.clone() if copy else out

    def _run_eager(self, static: Plan, timer=None) -> None:
        s = self.sampler
        self.stats.eager_runs += 1
        run_loop(s.student, s.teacher, self.ops, s.schedule, static, timer)

    def _entry(self, key: GraphKey, plan: Plan, *, allow_pad: bool, on_miss: str | None = None) -> _Entry | None:
        """The cached entry serving ``key`` (exact, or padded from a larger batch), else a new one per
        ``on_miss`` (default: the runner's). Caller holds the lock."""
        on_miss = on_miss or self.on_miss
        if key in self._cache:
            self._cache.move_to_end(key)
            self.budget.touch(self, key)
            return self._cache[key]
        if allow_pad:
            fits = [k for k in self._cache if k.batch > key.batch and k.with_batch(key.batch) == key]
            if fits:
                best = min(fits, key=lambda k: k.batch)
                self._cache.move_to_end(best)
                self.budget.touch(self, best)
                return self._cache[best]
        if on_miss == "eager":
            return None
        if on_miss == "error":
            have = "\n  ".join(str(k) for k in self._cache) or "(none)"
            raise CaptureError(f"no captured graph fits this call ({key}); cached:\n  {have}\n"
                               "warm up this shape first (GraphRunner.warmup), or pass on_miss='capture'")
        return self._build(key, plan)

    def _build(self, key: GraphKey, plan: Plan) -> _Entry:
        self.budget.make_room()
        static = alloc_static(plan, key.batch)
        entry = _Entry(key, static, run=lambda: self._run_eager(static))
        if self.use_cuda_graphs and key not in self._eager_keys:
            s = self.sampler
            t0 = time.perf_counter()
            failure = None
            try:
                with torch.inference_mode():
                    entry.run, entry.graph = capture_cuda(
                        lambda: run_loop(s.student, s.teacher, self.ops, s.schedule, static), self.warmup_iters)
            except Exception as e:  # noqa: BLE001 - classified below, never swallowed silently
                failure = e
            if failure is not None:
                entry.graph = None
                entry.run = lambda: self._run_eager(static)
                if not _is_oom(failure):
                    raise CaptureError(f"capturing the sampling loop for {key} failed: {failure}. The loop must "
                                       "run without host syncs or CPU tensors in the models; or pass graphs=False"
                                       ) from failure
                # the traceback's frames hold the half-captured graph and its pool: drop them, then free
                failure.__traceback__ = None
                failure = None
                torch.cuda.empty_cache()
                self._eager_keys.add(key)
                self.stats.oom_fallbacks += 1
                warnings.warn(f"distpp: out of GPU memory while capturing the CUDA graph for {key}; this shape "
                              "runs eagerly from now on (free memory, lower max_graphs, or call clear())",
                              RuntimeWarning, stacklevel=4)
            else:
                entry.capture_s = time.perf_counter() - t0
                self.stats.captures += 1
                self.stats.capture_s += entry.capture_s
        self._cache[key] = entry
        self.budget.add(self, key)
        return entry

    def _evict(self, key: GraphKey) -> None:
        """Drop ``key``'s entry (graph, pool, static buffers). Caller holds the lock."""
        entry = self._cache.pop(key)
        self.budget.discard(self, key)
        entry.release()
        self.stats.evictions += 1
        del entry
        if self.sampler.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()


def noop_ops(name: str = "none") -> FusedOps:
    """Fused ops that do nothing: ``run_loop`` with them runs only the model forwards, on the same
    buffers (the bench's forwards-only variant, to measure the time outside forwards)."""
    def nothing(*_a, **_k):
        return None

    return FusedOps(name, nothing, nothing, nothing)
