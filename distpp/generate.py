"""``python -m distpp.generate``: prompts -> PNGs with a Distillation++-guided student.

    python -m distpp.generate --pair lcm-lora-sdxl --prompt "a photo of a cat" --out out/
    python -m distpp.generate --student S --teacher T --family lcm --prompt "..." --compare

Writes ``<out>/<index>_seed<seed>.png`` per image (guided); with ``--compare`` also the unguided image
from the same seed (``..._unguided.png``) and both side by side (``..._compare.png``, unguided left).
Image i of the run uses seed ``--seed + i``. A progress bar counts student steps.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import torch

from .errors import ConfigError, DistppError
from .pipeline import KNOWN_PAIRS, Pipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distpp.generate", description=__doc__.split("\n")[0])
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--negative-prompt", default="", help="the teacher's CFG negative prompt (default empty)")
    p.add_argument("--pair", choices=sorted(KNOWN_PAIRS), help="a known student/teacher pair (README); "
                   "its settings are defaults that the options below override")
    p.add_argument("--student", help="student: folder or Hub id (pipeline, UNet folder, LoRA or UNet file)")
    p.add_argument("--teacher", help="teacher: a diffusers pipeline folder or Hub id")
    p.add_argument("--family", help="student family: lcm, dmd2, euler, euler_a, ddim")
    p.add_argument("--student-kind", default="auto", help="auto (default), pipeline, unet, unet_file, lora")
    p.add_argument("--student-weights", help="file inside --student (UNet state dict or LoRA)")
    p.add_argument("--steps", type=int, help="student steps (default 4)")
    p.add_argument("--guided-steps", type=int, help="teacher-guided steps G (default 1)")
    p.add_argument("--lam", type=float, help="proximal weight (default: the family's)")
    p.add_argument("--cfg", type=float, help="teacher CFG scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4, help="images per sampling call")
    p.add_argument("--height", type=int, help="pixels (default: the student's native size)")
    p.add_argument("--width", type=int)
    p.add_argument("--out", default="distpp_out", help="output folder")
    p.add_argument("--compare", action="store_true", help="also write the unguided image and a side-by-side")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: float16 on cuda, else float32)")
    p.add_argument("--vae", help="another VAE, e.g. madebyollin/sdxl-vae-fp16-fix")
    p.add_argument("--upcast-vae", action="store_true", default=None, help="decode in float32")
    p.add_argument("--offline", action="store_true", default=None, help="never touch the network")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict:
    """from_pretrained keyword arguments: the known pair's settings overridden by explicit options."""
    kw: dict = {}
    if args.pair:
        k = KNOWN_PAIRS[args.pair]
        kw = dict(student=k.student, teacher=k.teacher, family=k.family, lam=k.lam, steps=k.steps,
                  guided_steps=k.guided_steps, cfg=k.cfg, student_weights=k.student_weights)
    explicit = dict(student=args.student, teacher=args.teacher, family=args.family, steps=args.steps,
                    guided_steps=args.guided_steps, lam=args.lam, cfg=args.cfg, student_weights=args.student_weights,
                    vae=args.vae, upcast_vae=args.upcast_vae, local_files_only=args.offline, device=args.device,
                    dtype=DTYPES[args.dtype] if args.dtype else None)
    if args.pair and args.student is not None and args.student_weights is None:
        kw.pop("student_weights", None)  # the pair's weight file belongs to the pair's student, not this one
    kw.update({k: v for k, v in explicit.items() if v is not None})
    missing = [k for k in ("student", "teacher", "family") if kw.get(k) is None]
    if missing:
        raise ConfigError(f"pass {', '.join('--' + m for m in missing)} (or --pair NAME)")
    kw["student_kind"] = args.student_kind
    return {k: v for k, v in kw.items() if v is not None}


def side_by_side(left, right):
    """Two PIL images of one size -> one image twice as wide (left | right)."""
    from PIL import Image

    out = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    out.paste(left, (0, 0))
    out.paste(right, (left.width, 0))
    return out


def generate(pipe: Pipeline, prompts: Sequence[str], *, negative_prompt: str, seed: int, num_images: int,
             batch_size: int, out: str, compare: bool, height=None, width=None, progress=None) -> list[str]:
    """Sample every (prompt, image) pair in batches and write PNGs; returns the written paths."""
    jobs = [(p, seed + i) for i, p in enumerate(p for p in prompts for _ in range(num_images))]
    os.makedirs(out, exist_ok=True)
    written = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        texts, seeds = [j[0] for j in chunk], [j[1] for j in chunk]
        kw = dict(negative_prompt=negative_prompt, seeds=seeds, height=height, width=width, progress=progress)
        guided = pipe(texts, **kw)
        plain = pipe(texts, guided_steps=0, **kw) if compare else [None] * len(chunk)
        for i, (g, u, s) in enumerate(zip(guided, plain, seeds)):
            stem = os.path.join(out, f"{start + i:03d}_seed{s}")
            g.save(stem + ".png")
            written.append(stem + ".png")
            if u is not None:
                u.save(stem + "_unguided.png")
                side_by_side(u, g).save(stem + "_compare.png")
                written += [stem + "_unguided.png", stem + "_compare.png"]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        print("error: --num-images and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        pipe = Pipeline.from_pretrained(**resolve(args))
        n_calls = -(-len(args.prompt) * args.num_images // args.batch_size) * (2 if args.compare else 1)
        total = pipe.config.num_steps * n_calls  # the bar advances once per student step of a batch
        bar = None
        if not args.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="student steps", unit="step")
        try:
            paths = generate(pipe, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                             num_images=args.num_images, batch_size=args.batch_size, out=args.out,
                             compare=args.compare, height=args.height, width=args.width,
                             progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    except DistppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
