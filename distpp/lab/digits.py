"""The digits lab: a class-conditional UNet2DModel teacher trained on scikit-learn's 8x8 digits, a
4-step LCM student consistency-distilled from it, both on the CPU, and Distillation++ measured with a
Frechet distance in the feature space of a small digits classifier trained alongside.

Checkpoints (classifier, teacher, student) go through distpp.cache.ArtifactCache, keyed by every
setting that changes them. Images are [b, 1, 8, 8] in [-1, 1]; class labels reach the UNet through its
class embedding (10 digits + a null class 10 for the unconditional rows), encoded in a distpp.Cond as
encoder_hidden_states [b, 1, 11] (one-hot + null flag, as in the gmm lab).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import ArtifactCache, cache_key
from ..config import SamplerConfig, check_cfg, check_lam
from ..denoiser import Cond, ModelSpec
from ..errors import ConfigError
from ..sampler import Sampler
from ..schedules import build_schedule
from . import csv_list, save_figure
from . import write_outputs as write_lab_outputs
from .gmm import machine
from .metrics import frechet_distance, paired_effect
from .mixture import CFGDenoiser, class_cond, decode_labels, null_cond

N_CLASSES = 10
NULL = N_CLASSES


@dataclass(frozen=True)
class DigitsLabConfig:
    """Settings of the digits lab.

    teacher_steps / student_steps / classifier_steps: optimizer steps (batch `batch`).
    channels:      UNet block widths (two levels; 8x8 -> 4x4).
    distill_cfg:   teacher CFG the student is distilled with (LCM-style: the student bakes it in).
    skip:          consistency-distillation grid spacing (LCM: 20, i.e. original_inference_steps=50).
    samples:       samples per class per evaluation run; seeds: seed-paired replicates.
    lams, guided:  Distillation++ settings evaluated (teacher CFG `cfg`, rule "next").
    """

    teacher_steps: int = 4000
    student_steps: int = 1500
    classifier_steps: int = 600
    batch: int = 64
    channels: tuple[int, int] = (16, 32)
    lr: float = 2e-3
    distill_cfg: float = 2.0
    skip: int = 20
    steps: int = 4
    samples: int = 100
    seeds: int = 3
    lams: tuple[float, ...] = (0.1, 0.3)
    guided: tuple[int, ...] = (1, 2)
    cfg: float = 2.0
    ceiling_steps: int = 25
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "lams", tuple(self.lams))
        object.__setattr__(self, "guided", tuple(self.guided))
        for name in ("teacher_steps", "student_steps", "classifier_steps", "batch", "steps", "samples", "seeds"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be an integer >= 1, got {v!r}")
        for lam in self.lams:
            check_lam(lam)
        check_cfg(self.cfg)
        check_cfg(self.distill_cfg)
        for g in self.guided:
            if not (0 <= g <= self.steps):
                raise ConfigError(f"guided steps must be in [0, steps={self.steps}], got {g}")
        if len(self.channels) != 2 or min(self.channels) < 8 or any(c % 8 for c in self.channels):
            raise ConfigError(f"channels must be two multiples of 8 (GroupNorm groups), got {self.channels}")


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: images [1797, 1, 8, 8] float32 in [-1, 1] and labels [1797] int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


class Classifier(torch.nn.Module):
    """A small MLP on 8x8 digits; ``features`` (the 64-d penultimate layer) feeds the Frechet distance."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.SiLU(),
                                        torch.nn.Linear(128, 64), torch.nn.SiLU())
        self.head = torch.nn.Linear(64, N_CLASSES)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def make_unet(cfg: DigitsLabConfig):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=cfg.channels, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False, norm_num_groups=8,
                       num_class_embeds=N_CLASSES + 1)


class ClassUNetDenoiser:
    """A class-conditional UNet2DModel as a Denoiser predicting epsilon: the Cond's one-hot/null rows
    become class_labels (null -> class 10)."""

    def __init__(self, unet):
        self.unet = unet.eval()
        self.spec = ModelSpec(in_channels=1, cross_attention_dim=N_CLASSES + 1, dtype=torch.float32,
                              prediction_type="epsilon")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.unet(x, t, class_labels=decode_labels(cond, N_CLASSES).to(x.device)).sample


def _vp(acp: torch.Tensor, t: torch.Tensor):
    a = acp[t].sqrt().view(-1, 1, 1, 1)
    return a, (1 - acp[t]).sqrt().view(-1, 1, 1, 1)


def train_classifier(cfg: DigitsLabConfig, x, y) -> Classifier:
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = Classifier()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(cfg.classifier_steps):
        i = torch.randint(0, len(x), (128,), generator=g)
        xb = x[i] + 0.1 * torch.randn(x[i].shape, generator=g)  # noise: features robust to sampler grain
        loss = F.cross_entropy(net(xb), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def train_teacher(cfg: DigitsLabConfig, x, y, acp):
    """Epsilon-prediction DDPM training on the SD schedule, 15% of labels dropped to the null class (CFG)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    unet = make_unet(cfg)
    opt = torch.optim.AdamW(unet.parameters(), cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.teacher_steps)
    for _ in range(cfg.teacher_steps):
        i = torch.randint(0, len(x), (cfg.batch,), generator=g)
        t = torch.randint(0, len(acp), (cfg.batch,), generator=g)
        lab = torch.where(torch.rand(cfg.batch, generator=g) < 0.15, torch.full_like(y[i], NULL), y[i])
        e = torch.randn(x[i].shape, generator=g)
        a, s = _vp(acp, t)
        loss = F.mse_loss(unet(a * x[i] + s * e, t, class_labels=lab).sample, e)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return unet.eval()


def lcm_boundary(t: torch.Tensor, scale: float = 10.0, sd: float = 0.5):
    """LCMScheduler's c_skip, c_out at timesteps t (the student's consistency parametrization)."""
    tt = t.double() * scale
    c_skip = sd**2 / (tt**2 + sd**2)
    c_out = tt / (tt**2 + sd**2).sqrt()
    return c_skip.float().view(-1, 1, 1, 1), c_out.float().view(-1, 1, 1, 1)


def consistency_fn(unet, x, t, lab, acp):
    """f(x_t, t) = c_skip x + c_out x0_eps(x_t): exactly what distpp's lcm family computes from the eps."""
    a, s = _vp(acp, t)
    c_skip, c_out = lcm_boundary(t)
    return c_skip * x + c_out * (x - s * unet(x, t, class_labels=lab).sample) / a


def distill_student(cfg: DigitsLabConfig, teacher, x, y, acp):
    """Latent-consistency distillation (Luo et al. 2023) in pixel space: grid t_n = skip*n - 1, one DDIM
    step of the CFG teacher from t_{n+1} to t_n, EMA target network; student initialised from the teacher."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    torch.manual_seed(cfg.seed + 2)
    student = copy.deepcopy(teacher).train()
    target = copy.deepcopy(teacher).eval()
    for p in list(target.parameters()) + list(teacher.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), cfg.lr / 4)
    grid = torch.arange(cfg.skip - 1, len(acp), cfg.skip)
    w = cfg.distill_cfg
    for _ in range(cfg.student_steps):
        i = torch.randint(0, len(x), (cfg.batch,), generator=g)
        n = torch.randint(1, len(grid), (cfg.batch,), generator=g)
        t, tp = grid[n], grid[n - 1]
        a, s = _vp(acp, t)
        ap, sp = _vp(acp, tp)
        xt = a * x[i] + s * torch.randn(x[i].shape, generator=g)
        with torch.no_grad():
            both = teacher(torch.cat([xt, xt]), torch.cat([t, t]),
                           class_labels=torch.cat([torch.full_like(y[i], NULL), y[i]])).sample
            eu, ec = both.chunk(2)
            e = eu + w * (ec - eu)
            x_prev = ap * (xt - s * e) / a + sp * e
            tgt = consistency_fn(target, x_prev, tp, y[i], acp)
        loss = F.mse_loss(consistency_fn(student, xt, t, y[i], acp), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.lerp_(ps, 0.05)  # EMA 0.95: LCM's target-network rate
    return student.eval()


def _cached_module(cache: ArtifactCache, kind: str, key: str, build, make):
    def _build(folder: Path):
        torch.save(build().state_dict(), folder / "state.pt")

    folder = cache.get_or_build(kind, key, _build)
    module = make()
    module.load_state_dict(torch.load(folder / "state.pt", weights_only=True))
    return module.eval()


def build_models(cfg: DigitsLabConfig, cache: ArtifactCache | None = None, log=print):
    """(classifier, teacher unet, student unet), trained or loaded from the artifact cache."""
    cache = cache or ArtifactCache()
    x, y = load_data()
    acp = build_schedule("ddim", 1).alphas_cumprod.float()
    base = dict(lab="digits", torch=torch.__version__, seed=cfg.seed, data=int(len(x)))
    kc = cache_key(**base, what="classifier", steps=cfg.classifier_steps)
    kt = cache_key(**base, what="teacher", steps=cfg.teacher_steps, batch=cfg.batch, channels=cfg.channels, lr=cfg.lr)
    ks = cache_key(**base, what="student", teacher=kt, steps=cfg.student_steps, batch=cfg.batch,
                   w=cfg.distill_cfg, skip=cfg.skip, lr=cfg.lr)
    times = {}
    t0 = time.perf_counter()
    clf = _cached_module(cache, "lab-digits", kc, lambda: train_classifier(cfg, x, y), Classifier)
    times["classifier_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher = _cached_module(cache, "lab-digits", kt, lambda: train_teacher(cfg, x, y, acp), lambda: make_unet(cfg))
    times["teacher_s"] = time.perf_counter() - t0
    log(f"teacher ready ({times['teacher_s']:.0f} s)")
    t0 = time.perf_counter()
    student = _cached_module(cache, "lab-digits", ks, lambda: distill_student(cfg, teacher, x, y, acp),
                             lambda: make_unet(cfg))
    times["student_s"] = time.perf_counter() - t0
    log(f"student ready ({times['student_s']:.0f} s)")
    return clf, teacher, student, times


def evaluate(images: torch.Tensor, labels: torch.Tensor, clf: Classifier, real_feats: np.ndarray) -> dict:
    """FD of classifier features vs the real set; per-class coverage = share classified as requested."""
    with torch.no_grad():
        feats = clf.features(images.clamp(-1, 1)).double().numpy()
        pred = clf(images.clamp(-1, 1)).argmax(1)
    per_class = [float((pred[labels == c] == c).double().mean()) for c in range(N_CLASSES)]
    return {"fd": frechet_distance(feats, real_feats), "accuracy": float(np.mean(per_class)),
            "min_class_coverage": float(min(per_class)), "per_class": per_class}


def run_digits(cfg: DigitsLabConfig, cache: ArtifactCache | None = None, log=print, machine_name: str = "") -> dict:
    t_start = time.perf_counter()
    clf, teacher_unet, student_unet, times = build_models(cfg, cache, log)
    x, y = load_data()
    with torch.no_grad():
        real = clf.features(x).double().numpy()
        real_acc = float((clf(x).argmax(1) == y).double().mean())
    teacher, student = ClassUNetDenoiser(teacher_unet), ClassUNetDenoiser(student_unet)
    n = cfg.samples * N_CLASSES
    labels = torch.arange(n) % N_CLASSES
    cond, uncond = class_cond(labels, N_CLASSES), null_cond(1, N_CLASSES)
    settings = [("student", 0, 0.0)] + [(f"++ G={g} lam={lam:g} w={cfg.cfg:g}", g, lam)
                                        for g in cfg.guided if g > 0 for lam in cfg.lams if lam > 0]
    rows, grids = [], {}
    base = None
    for name, g, lam in settings:
        sc = SamplerConfig(family="lcm", steps=cfg.steps, guided_steps=g, lam=lam, cfg=cfg.cfg, kernel_impl="torch")
        samp = Sampler(student, teacher, sc)
        per = []
        for r in range(cfg.seeds):
            imgs = samp.sample(cond, uncond=uncond, latent_shape=(1, 8, 8), seeds=[r * n + i for i in range(n)])
            per.append(evaluate(imgs, labels, clf, real))
            if r == 0:
                grids[name] = imgs[:N_CLASSES * 8].tolist()
        base = per if base is None else base
        rows.append(_row(name, per, None if per is base else base))
        log(format_row(rows[-1]))
    sc = SamplerConfig(family="ddim", steps=cfg.ceiling_steps, guided_steps=0, kernel_impl="torch")
    samp = Sampler(CFGDenoiser(teacher, cfg.distill_cfg, N_CLASSES), None, sc)
    per = [evaluate(samp.sample(cond, latent_shape=(1, 8, 8), seeds=[r * n + i for i in range(n)]), labels, clf, real)
           for r in range(cfg.seeds)]
    rows.append(_row(f"teacher ddim {cfg.ceiling_steps} w={cfg.distill_cfg:g} (ceiling)", per, None))
    log(format_row(rows[-1]))
    return {"lab": "digits", "config": asdict(cfg), "machine": machine(machine_name), "train_seconds": times,
            "classifier_accuracy_on_data": real_acc, "rows": rows, "grids_seed0": grids,
            "seconds": time.perf_counter() - t_start}


def _row(name, per, base):
    out = {"name": name, "per_seed": per}
    for k in ("fd", "accuracy", "min_class_coverage"):
        v = np.asarray([p[k] for p in per])
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    if base is not None:
        out["effect"] = {k: paired_effect([b[k] for b in base], [p[k] for p in per]) for k in ("fd", "accuracy")}
    return out


def format_row(row: dict) -> str:
    s = (f"{row['name']:<34} {row['fd']['mean']:8.3f} ±{row['fd']['std']:.3f}  {row['accuracy']['mean']:.3f}  "
         f"{row['min_class_coverage']['mean']:.3f}")
    if row.get("effect"):
        e = row["effect"]["fd"]
        s += f"  {e['delta_mean']:+.3f} ±{e['delta_std']:.3f}  {row['effect']['accuracy']['delta_mean']:+.3f}"
    return s


def table(result: dict) -> str:
    head = f"{'setting':<34} {'FD':>8} {'±sd':>6}  {'acc':>5}  {'minCls':>5}  dFD(paired)      dAcc"
    return "\n".join([head] + [format_row(r) for r in result["rows"]] + ["", "columns:"]
                     + [f"  {k:<12} {v}" for k, v in COLUMNS])


COLUMNS = (
    ("FD ±sd", "Frechet distance to the real digits in the classifier's 64-d features, mean ± sd over seeds"),
    ("acc", "share of samples the classifier assigns to the requested digit"),
    ("minCls", "the lowest per-digit accuracy"),
    ("dFD(paired)", "seed-paired FD change against the student (same seeds): mean ± sd of per-seed differences"),
    ("dAcc", "seed-paired accuracy change"),
)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["grids_seed0"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4))
    for ax, name in zip(np.atleast_1d(axes), names):
        imgs = np.asarray(result["grids_seed0"][name])[:, 0]  # [r*10, 8, 8], sample i has class i % 10
        r = len(imgs) // N_CLASSES
        grid = imgs[:r * N_CLASSES].reshape(r, N_CLASSES, 8, 8).transpose(0, 2, 1, 3).reshape(8 * r, 8 * N_CLASSES)
        ax.imshow(grid, cmap="gray", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    return save_figure(fig, path)


def write_outputs(result: dict, out_dir: Path, make_plot: bool = True) -> dict:
    """``digits.json`` (and ``digits.png``) under ``out_dir``."""
    return write_lab_outputs(result, out_dir, "digits", plot if make_plot else None)


def add_args(p) -> None:
    d = DigitsLabConfig()
    for name, what in (("teacher_steps", "teacher training steps"), ("student_steps", "distillation steps"),
                       ("classifier_steps", "classifier training steps"), ("batch", "training batch"),
                       ("steps", "student sampling steps"), ("samples", "samples per class and run"),
                       ("seeds", "seed-paired replicates")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name), help=what)
    p.add_argument("--lams", type=csv_list(float), default=d.lams, metavar="LIST",
                   help="lam values, comma-separated, e.g. 0.1,0.3")
    p.add_argument("--guided", type=csv_list(int), default=d.guided, metavar="LIST",
                   help="guided-step counts G, comma-separated, e.g. 1,2")
    p.add_argument("--cfg", type=float, default=d.cfg, help="teacher CFG for Distillation++")
    p.add_argument("--distill-cfg", type=float, default=d.distill_cfg, help="teacher CFG baked into the student")
    p.add_argument("--ceiling-steps", type=int, default=d.ceiling_steps, help="DDIM steps of the teacher-alone row")


def config_from_args(args) -> DigitsLabConfig:
    return DigitsLabConfig(
        teacher_steps=args.teacher_steps, student_steps=args.student_steps, classifier_steps=args.classifier_steps,
        batch=args.batch, steps=args.steps, samples=args.samples, seeds=args.seeds,
        lams=args.lams, guided=args.guided,
        cfg=args.cfg, distill_cfg=args.distill_cfg, ceiling_steps=args.ceiling_steps)
