"""One Sampler shared by many threads: each caller gets its own correct result.

``Sampler.sample`` builds every per-call buffer in ``prepare`` (noise, tables, model inputs) and the
schedule tables it shares are only read, so concurrent calls share no mutable state. Checked here on
the tiny UNet preset against single-threaded, single-sample runs of the same seeds (batched and
single runs agree within fp32 tolerance, not bitwise: docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import random
import threading

import torch

from distpp import Cond, Sampler, SamplerConfig
from helpers import assert_close

THREADS, CALLS = 8, 20
SEEDS = 12
SHAPE = (4, 8, 8)
FP32_RTOL = 1e-5


class InFlight:
    """A Denoiser wrapper counting concurrent forwards, to prove the calls really overlapped."""

    def __init__(self, model):
        self.model, self.spec = model, model.spec
        self.prepare = model.prepare
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, x, t, cond):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            return self.model(x, t, cond)
        finally:
            with self.lock:
                self.now -= 1


def rows(cond: Cond, idx: list[int]) -> Cond:
    return cond.map(lambda v: v[idx].contiguous())


def per_seed_settings(seed: int) -> tuple[float, float]:
    """(lam, cfg) of a seed: per-sample values, so a mixed batch also tests per-sample settings."""
    return 0.01 + 0.02 * (seed % 3), 2.0 + seed % 4


def test_one_sampler_many_threads(tiny_pair, one_torch_thread):
    student = InFlight(tiny_pair.student)
    sampler = Sampler(student, tiny_pair.teacher, SamplerConfig(kernel_impl="torch", steps=2, guided_steps=1))
    bank, uncond = tiny_pair.random_cond(SEEDS, seed=3)

    def run(seeds):
        lam, cfg = zip(*(per_seed_settings(s) for s in seeds))
        return sampler.sample(rows(bank, seeds), uncond=uncond, latent_shape=SHAPE, seeds=seeds,
                              lam=list(lam), cfg=list(cfg))

    ref = {s: run([s])[0].clone() for s in range(SEEDS)}
    rng = random.Random(0)
    jobs = [[rng.sample(range(SEEDS), rng.randint(1, 3)) for _ in range(CALLS)] for _ in range(THREADS)]
    results: list[list[tuple[list[int], torch.Tensor]]] = [[] for _ in range(THREADS)]
    errors = []
    start = threading.Barrier(THREADS)

    def worker(i):
        try:
            start.wait()
            for seeds in jobs[i]:
                results[i].append((seeds, run(seeds)))
        except BaseException as e:  # a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert student.peak >= 2, "the threads never overlapped: the test would not catch shared state"
    assert sum(len(r) for r in results) == THREADS * CALLS
    for per_thread in results:
        for seeds, out in per_thread:
            assert out.shape == (len(seeds),) + SHAPE and out.dtype == torch.float32
            for b, s in enumerate(seeds):
                assert_close(out[b], ref[s], FP32_RTOL, f"seed {s} in batch {seeds}")
    # Distinct seeds must give distinct results, or equality above proves nothing.
    assert (ref[0] - ref[1]).abs().max() > 1e-2
