"""Benchmark the fused per-step ops against the unfused torch sequence they replace and against a
device-to-device copy of the same byte count.

    python benchmarks/bench_guidance.py [--presets sd15 sdxl] [--batches 1 2 4 8] [--impls triton cuda torch]
                                        [--dtype float16] [--json out.json]

On a GPU: triton.testing.do_bench (median and p90, L2 flushed between runs) of each op for SD1.5
(B x 4 x 64 x 64) and SDXL (B x 4 x 128 x 128) latents; GB/s = bytes the op must move / median time,
beside the copy's GB/s in the same run. "torch" is the reference implementation (the unfused chain of
elementwise ops). Also reports launches per guided and unguided step before (aten ops of the torch
chain) and after (one fused launch per op). On a CPU it times the references on SD1.5 B=1 only and says
that GPU numbers need a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

from distpp.dtypes import ALIASES, DTYPES, dtype_name, parse_dtype  # noqa: E402

LATENTS = {"sd15": (4, 64, 64), "sdxl": (4, 128, 128)}
OPS = ("student_update", "guided_update", "plain_update")


def make_inputs(B: int, chw, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Buffers of one guided step (random, never zeros); coef/gcoef from a real 4-step LCM schedule."""
    from distpp.schedules import build_schedule, teacher_coefficients

    g = torch.Generator(device=device).manual_seed(seed)
    sch = build_schedule("lcm", 4, device=device)
    grow = teacher_coefficients(sch.abar_next.double(), "epsilon").float()  # [N, 4]
    shape = (B,) + tuple(chw)

    def rn(*s, dt=torch.float32):
        return torch.randn(*s, generator=g, device=device).to(dt)

    return dict(x=rn(*shape), m_s=rn(*shape, dt=dtype), n=rn(*shape), m_t=rn(2 * B, *chw, dt=dtype), z=rn(*shape),
                coef=sch.coef, gcoef=grow[:1, None, :].expand(1, B, 4).contiguous(),
                lam=torch.full((B,), 0.01, device=device), cfg=torch.full((B,), 7.5, device=device), k=0,
                t_in=torch.empty(2 * B, *chw, dtype=dtype, device=device), x_out=torch.empty(shape, device=device),
                xin=torch.empty(shape, dtype=dtype, device=device))


def op_thunks(fns, d) -> dict:
    """op name -> zero-argument call of that op on ``d``'s buffers."""
    su, gu, pu = fns
    return {
        "student_update": lambda: su(d["x"], d["m_s"], d["n"], d["coef"], d["gcoef"], d["k"], d["t_in"]),
        "guided_update": lambda: gu(d["x"], d["m_s"], d["n"], d["m_t"], d["z"], d["coef"], d["gcoef"], d["lam"],
                                    d["cfg"], d["k"], d["x_out"], d["xin"]),
        "plain_update": lambda: pu(d["x"], d["m_s"], d["z"], d["coef"], d["k"], d["x_out"], d["xin"]),
    }


def op_bytes(d) -> dict:
    """Bytes each op must read and write (its HBM traffic floor)."""
    def nb(*names):
        return sum(d[n].numel() * d[n].element_size() for n in names)

    return {"student_update": nb("x", "m_s", "n", "t_in"),
            "guided_update": nb("x", "m_s", "n", "m_t", "z", "x_out", "xin"),
            "plain_update": nb("x", "m_s", "z", "x_out", "xin")}


def implementations(names) -> dict:
    """impl name -> (student_update, guided_update, plain_update); unavailable ones are reported, not run."""
    from distpp import ops

    out = {}
    for name in names:
        try:
            if name == "torch":
                f = ops.torch_ops()
            elif name == "triton":
                f = ops.triton_ops()
            else:
                from distpp import csrc_ops

                f = csrc_ops.fused_ops()
            out[name] = (f.student_update, f.guided_update, f.plain_update)
        except Exception as e:  # the row says why; other impls still run
            print(f"[bench_guidance] {name}: unavailable ({type(e).__name__}: {e})")
    return out


def launches_per_step(d) -> dict:
    """Launches per guided / unguided step, before (aten ops of the torch chain) and after fusion."""
    ref = op_thunks(implementations(["torch"])["torch"], d)
    n = {op: H.count_aten_ops(ref[op]) for op in OPS}
    return dict(guided_before=n["student_update"] + n["guided_update"], guided_after=2,
                unguided_before=n["plain_update"], unguided_after=1)


def bench(presets, batches, dtype: torch.dtype, impl_names, timer="events") -> tuple[list[dict], dict]:
    device = "cuda" if H.on_gpu() else "cpu"
    impls = implementations(impl_names)
    rows, launches = [], None
    for preset in presets:
        for B in batches:
            d = make_inputs(B, LATENTS[preset], dtype, device)
            if launches is None:
                launches = launches_per_step(d)
            nbytes = op_bytes(d)
            for op in OPS:
                half = nbytes[op] // 2  # a copy of `half` bytes reads and writes nbytes in all
                src = torch.randint(0, 255, (half,), dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                copy = H.time_ms(lambda: dst.copy_(src), timer=timer)
                copy_gbps = nbytes[op] / copy["median_ms"] / 1e6
                rows.append(dict(preset=preset, batch=B, op=op, impl="copy", bytes=nbytes[op], **copy,
                                 gbps=copy_gbps, frac_of_copy=1.0))
                for name, fns in impls.items():
                    t = H.time_ms(op_thunks(fns, d)[op], timer=timer)
                    gbps = nbytes[op] / t["median_ms"] / 1e6
                    rows.append(dict(preset=preset, batch=B, op=op, impl=name, bytes=nbytes[op], **t, gbps=gbps,
                                     frac_of_copy=gbps / copy_gbps))
    return rows, launches or {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", choices=list(LATENTS), default=list(LATENTS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--impls", nargs="+", choices=["triton", "cuda", "torch"], default=["triton", "cuda", "torch"])
    ap.add_argument("--dtype", choices=[*DTYPES, *ALIASES], default="float16",
                    help="float16 (default), bfloat16, float32 (or fp16, bf16, fp32)")
    ap.add_argument("--json", default="bench_guidance.json", help="where the rows go")
    ap.add_argument("--timer", choices=["events", "cudagraph"], default="events",
                    help="GPU timing: 'events' (do_bench, L2 flushed, host launch cost included when it "
                         "exceeds the flush) or 'cudagraph' (replayed graph: device time only)")
    args = ap.parse_args(argv)
    info = H.run_info()
    presets, batches, impls = args.presets, args.batches, args.impls
    if not H.on_gpu():
        print("[bench_guidance] no CUDA GPU: timing the torch references on SD1.5 B=1 only; "
              "GPU numbers need a GPU (run benchmarks/gpu_check.sh on one)")
        presets, batches, impls = ["sd15"], [1], ["torch"]
    dtype = parse_dtype(args.dtype, what="--dtype")
    rows, launches = bench(presets, batches, dtype, impls, timer=args.timer)
    info.update(dtype=dtype_name(dtype), launches_per_step=launches, timer=args.timer)
    path = H.write_rows(args.json, rows, info)
    print(f"device: {info['gpu'] or 'cpu'} | torch {info['torch']} | triton {info['triton']} | commit {info['commit']}")
    print(f"launches per step: guided {launches['guided_before']} -> {launches['guided_after']}, "
          f"unguided {launches['unguided_before']} -> {launches['unguided_after']}")
    H.print_table(rows, ["preset", "batch", "op", "impl", "median_ms", "p90_ms", "gbps", "frac_of_copy"])
    print(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
