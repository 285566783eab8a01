"""``python -m distpp.generate``: prompts -> PNGs with a Distillation++-guided student.

    python -m distpp.generate --pair lcm-lora-sdxl --prompt "a photo of a cat" --out out/
    python -m distpp.generate --student S --teacher T --family lcm --prompt "..." --compare

Writes ``<out>/<index>_seed<seed>.png`` per image (guided); with ``--compare`` also the unguided image
from the same seed (``..._unguided.png``) and both side by side (``..._compare.png``, unguided left).
Image i of the run uses seed ``--seed + i``. Sampling goes through the pipeline's Runtime
(``--backend``, ``--graphs``); with graphs or a compiled backend on, a warm-up bar counts the buckets
prepared before the first image, then a progress bar counts student steps. Every error is one line on
stderr, in the spelling of these options, with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

from .backends import backend_names
from .dtypes import DTYPES, parse_dtype
from .errors import ConfigError, DistppError
from .pipeline import KNOWN_PAIRS, STUDENT_KINDS, Pipeline

PROG = "python -m distpp.generate"
GRAPHS = {"auto": "auto", "on": True, "off": False}

# Pipeline.from_pretrained keyword -> the option that sets it (for messages in CLI spelling).
FLAGS = {"student": "--student", "teacher": "--teacher", "family": "--family", "student_kind": "--student-kind",
         "student_weights": "--student-weights", "steps": "--steps", "guided_steps": "--guided-steps",
         "lam": "--lam", "cfg": "--cfg", "device": "--device", "dtype": "--dtype", "vae": "--vae",
         "upcast_vae": "--upcast-vae", "local_files_only": "--offline", "backend": "--backend", "graphs": "--graphs",
         "allow_family_mismatch": "--allow-family-mismatch", "batch_sizes": "--batch-size", "height": "--height",
         "width": "--width", "seeds": "--seed"}


class _OneLineParser(argparse.ArgumentParser):
    """argparse errors as one line and exit code 2 (argparse prints the usage block otherwise)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cli_message(msg: str) -> str:
    """A Pipeline message in this CLI's spelling, on one line: ``dtype=torch.float32`` -> ``--dtype float32``,
    ``family='lcm'`` -> ``--family lcm``, ``allow_family_mismatch=True`` -> ``--allow-family-mismatch``,
    and keyword names with an underscore -> their option, wherever they stand."""
    def keyword(m: re.Match) -> str:
        name, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        flag, value = FLAGS[name], value.replace("torch.", "")
        if name == "graphs" and value in ("True", "False"):
            return f"{flag} {'on' if value == 'True' else 'off'}"
        if value in ("True", "False"):  # boolean keywords are bare switches
            return flag if value == "True" else f"without {flag}"
        return f"{flag} {value}"

    names = "|".join(sorted(FLAGS, key=len, reverse=True))
    msg = re.sub(rf"\b({names})=(?:'([^']*)'|([^\s,;)']+))", keyword, " ".join(msg.split()))
    msg = re.sub(r"\btorch\.(float32|float16|bfloat16)\b", r"\1", msg)
    under = "|".join(n for n in sorted(FLAGS, key=len, reverse=True) if "_" in n)
    return re.sub(rf"(?<![-\w])({under})\b", lambda m: FLAGS[m.group(1)], msg)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--negative-prompt", default="", help="the teacher's CFG negative prompt (default empty)")
    p.add_argument("--pair", choices=sorted(KNOWN_PAIRS), help="a known student/teacher pair (README); "
                   "its settings are defaults that the options below override")
    p.add_argument("--student", help="student: folder or Hub id (pipeline, UNet folder, LoRA or UNet file)")
    p.add_argument("--teacher", help="teacher: a diffusers pipeline folder or Hub id")
    p.add_argument("--family", help="student family: lcm, dmd2, euler, euler_a, ddim")
    p.add_argument("--student-kind", default="auto", choices=STUDENT_KINDS,
                   help="auto (default: detected), pipeline, unet, unet_file, lora")
    p.add_argument("--student-weights", help="file inside --student (UNet state dict or LoRA)")
    p.add_argument("--allow-family-mismatch", action="store_true", default=None,
                   help="sample a student pipeline with a --family its scheduler class does not fit")
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
    p.add_argument("--backend", default="auto", choices=("auto",) + backend_names(),
                   help="UNet backend (default auto: eager; compile, onnxruntime, tensorrt only when named)")
    p.add_argument("--graphs", default="auto", choices=sorted(GRAPHS),
                   help="whole-loop CUDA graphs: auto (on for CUDA, default), on, off")
    p.add_argument("--vae", help="another VAE, e.g. madebyollin/sdxl-vae-fp16-fix")
    p.add_argument("--upcast-vae", action="store_true", default=None, help="decode in float32")
    p.add_argument("--offline", action="store_true", default=None, help="never touch the network")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


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
                    dtype=parse_dtype(args.dtype) if args.dtype else None,
                    allow_family_mismatch=args.allow_family_mismatch)
    if args.pair and args.student is not None and args.student_weights is None:
        kw.pop("student_weights", None)  # the pair's weight file belongs to the pair's student, not this one
    kw.update({k: v for k, v in explicit.items() if v is not None})
    missing = [k for k in ("student", "teacher", "family") if kw.get(k) is None]
    if missing:
        raise ConfigError(f"pass {', '.join('--' + m for m in missing)} (or --pair NAME)")
    kw.update(student_kind=args.student_kind, backend=args.backend, graphs=GRAPHS[args.graphs],
              batch_sizes=(min(args.batch_size, len(args.prompt) * args.num_images),))
    if args.height is not None or args.width is not None:
        kw["sizes"] = [(args.height, args.width)]  # a None side: the student's native size
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
    _writable(out)
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


def check_out(out: str) -> None:
    """ConfigError, before any weights load, when the images could not be written under ``out`` (it is
    created only when the first batch is ready)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file; pass a folder (it is created when missing)")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write images under --out {out} ({parent} is not a writable folder); "
                          "pass a writable folder")


def _writable(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out {out} ({e.strerror or e}); pass a writable folder") from e


def _run(args: argparse.Namespace) -> list[str]:
    pipe = Pipeline.from_pretrained(**resolve(args))
    try:
        height, width = pipe.image_size(args.height, args.width)
        if pipe.runtime.stats.graphs or args.backend == "compile":
            # capture / compile the run's size and batch bucket for each config it samples, before the first image
            configs = {pipe.config.guided_steps, 0} if args.compare else {pipe.config.guided_steps}
            pipe.warmup(guided_steps=sorted(configs), progress=not args.no_progress)
        n_calls = -(-len(args.prompt) * args.num_images // args.batch_size) * (2 if args.compare else 1)
        bar = None
        if not args.no_progress:
            from tqdm.auto import tqdm

            # the bar advances once per student step of a batch
            bar = tqdm(total=pipe.config.num_steps * n_calls, desc="student steps", unit="step")
        try:
            return generate(pipe, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                            num_images=args.num_images, batch_size=args.batch_size, out=args.out,
                            compare=args.compare, height=height, width=width,
                            progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    finally:
        pipe.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_out(args.out)
        paths = _run(args)
    except DistppError as e:
        print(f"{PROG}: error: {cli_message(str(e))}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
