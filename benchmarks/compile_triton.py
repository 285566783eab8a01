"""Compile every Triton kernel of distpp.kernels for sm_80 and sm_90 without a GPU (CI build check).

    python benchmarks/compile_triton.py [--archs 80 90] [--json out.json]

Uses Triton's ahead-of-time path: ``triton.compile(ASTSource(kernel, signature, constexprs),
target=GPUTarget("cuda", arch, 32))``. It must run without TRITON_INTERPRET (the interpreter replaces
``triton.jit``), so the variable is dropped here before triton is imported. Each kernel is compiled for
every dtype combination the ops accept for their model-dtype buffers and both optional-buffer flags.
Exits 1 if any compile fails, printing which.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns that its FMA-contraction default changes in 3.10; keep it on (the ops are tested with it).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def variants():
    """(name, kernel, {arg: type}, {constexpr: value}) for each kernel specialization to compile."""
    from distpp.kernels import guided_update, plain_update, student_update

    # cfg: the teacher form (True: the CFG pair, 2B rows; False: an embedded-guidance teacher, B rows)
    for md, od, cfg in itertools.product(DTYPES, DTYPES, (True, False)):
        sig = {"x_ptr": "*fp32", "m_ptr": DTYPES[md], "n_ptr": "*fp32", "c_ptr": "*fp32", "g_ptr": "*fp32",
               "out_ptr": DTYPES[od], "per_sample": "i32", "half_numel": "i32"}
        yield (f"student_update[m={md},out={od},cfg={cfg}]", student_update._kernel(), sig,
               {"CFG_PAIR": cfg, "BLOCK": 1024})
    for md, has_z, has_xin in itertools.product(DTYPES, (True, False), (True, False)):
        sig = {"x_ptr": "*fp32", "m_ptr": DTYPES[md], "z_ptr": "*fp32", "c_ptr": "*fp32", "xo_ptr": "*fp32",
               "xin_ptr": DTYPES[md], "per_sample": "i32"}
        yield (f"plain_update[m={md},z={has_z},xin={has_xin}]", plain_update._kernel(), sig,
               {"HAS_Z": has_z, "HAS_XIN": has_xin, "BLOCK": 1024})
        sig = {"x_ptr": "*fp32", "m_ptr": DTYPES[md], "n_ptr": "*fp32", "mt_ptr": DTYPES[md], "z_ptr": "*fp32",
               "c_ptr": "*fp32", "g_ptr": "*fp32", "lam_ptr": "*fp32", "cfg_ptr": "*fp32", "xo_ptr": "*fp32",
               "xin_ptr": DTYPES[md], "per_sample": "i32", "half_numel": "i32"}
        for cfg in (True, False):
            yield (f"guided_update[m={md},z={has_z},xin={has_xin},cfg={cfg}]", guided_update._kernel(), sig,
                   {"HAS_Z": has_z, "HAS_XIN": has_xin, "CFG_PAIR": cfg, "BLOCK": 1024})


def make_source(kernel, sig: dict, constexprs: dict):
    """An ASTSource for triton >= 3.2 (name-keyed signature with 'constexpr' entries) or 3.0/3.1
    (index-keyed signature without the constexprs, which go in ``constants``).

    On >= 3.2 every pointer and int is marked divisible by 16, the specialization the JIT picks at run
    time for 16-byte aligned buffers and SD/SDXL latents (per-sample sizes 16384 / 65536), so the
    compiled code is the vectorized code the GPU runs."""
    from triton.compiler import ASTSource

    names = kernel.arg_names
    missing = [n for n in names if n not in sig and n not in constexprs]
    if missing:  # an unset constexpr would compile silently as None: a variant the GPU never runs
        raise ValueError(f"{kernel.__name__}: no type or constexpr value for {missing}")
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        full = {n: sig.get(n, "constexpr") for n in names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in sig}
        return ASTSource(fn=kernel, signature=full, constexprs=dict(constexprs), attrs=attrs)
    return ASTSource(fn=kernel, signature={names.index(n): t for n, t in sig.items()},
                     constants={names.index(n): v for n, v in constexprs.items()})


def compile_all(archs) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget

    rows = []
    for name, kernel, sig, constexprs in variants():
        for arch in archs:
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(make_source(kernel, sig, constexprs), target=GPUTarget("cuda", arch, 32))
                ok, err = "cubin" in compiled.asm, None
                if not ok:
                    err = "no cubin produced"
                vec = len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]", compiled.asm.get("ptx", "")))
            except Exception as e:  # reported per variant; the script exits 1 below
                ok, err, vec = False, f"{type(e).__name__}: {e}", 0
            rows.append(dict(kernel=name, arch=f"sm_{arch}", ok=ok, error=err, vector_loads=vec,
                             seconds=round(time.perf_counter() - t0, 3)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", help="write the per-variant rows here")
    args = ap.parse_args(argv)
    import triton

    rows = compile_all(args.archs)
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"FAILED {r['kernel']} {r['arch']}: {r['error']}")
    scalar = sum(1 for r in rows if r["ok"] and r["vector_loads"] == 0)
    print(f"triton {triton.__version__}: compiled {len(rows) - len(bad)}/{len(rows)} kernel variants for "
          f"{', '.join(f'sm_{a}' for a in args.archs)} in {sum(r['seconds'] for r in rows):.1f} s; "
          f"{scalar} without vector loads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
