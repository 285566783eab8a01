"""The Gaussian-mixture quality lab: exact teacher, ODE-map student, Distillation++ sweeps.

Setting (ALGORITHM.md, "What to expect on problems with an exact answer"): modes on a ring, classes
owning interleaved modes, the SD noise schedule. The teacher is the mixture's exact denoiser (CFG by the
sampler between the class-conditional and unconditional mixtures); the student is the exact PF-ODE
map of a perturbed mixture (class leakage by default) stepped by a few-step family sampler. Every
configuration runs through distpp.Sampler with the same per-sample seeds as the unguided student
(seed-paired), and is scored against fresh samples of the true class-conditional mixture.
"""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import SamplerConfig, TEACHER_RULES, check_cfg, check_lam
from ..errors import ConfigError
from ..sampler import Sampler
from ..schedules import FAMILIES, build_schedule
from . import save_figure
from . import write_outputs as write_lab_outputs
from .metrics import energy_distance, mode_stats, paired_effect, sliced_wasserstein
from .mixture import (CFGDenoiser, Mixture, MixtureTeacher, OdeMapStudent, class_cond, null_cond, perturbed,
                      ring_mixture, sample_mixture)

METRICS = ("energy", "sliced_w1", "accuracy", "mode_weight_tv", "coverage", "in_mode")
# Reference samples use seeds far from the samplers' (per-sample seeds r*B + i), so they are independent.
REF_SEED_OFFSET = 10**9


@dataclass(frozen=True)
class GmmLabConfig:
    """Settings of the gmm lab.

    d, modes, n_classes, radius, std: the true mixture (ring_mixture).
    leak, shift, weight_skew:         the student's perturbation (perturbed()).
    families:      student families to run (each through the Sampler).
    steps:         student steps N (dmd2/euler: 999/749/499/249 at 4; lcm: 999/759/499/259).
    samples:       samples per run (labels alternate over the classes); ref_samples: true samples per
                   class and seed for the metrics.
    seeds:         replicates; replicate r uses per-sample seeds r*samples + i for every configuration.
    ode_steps:     Heun steps of the student's ODE map.
    lams, guided:  the lam x G sweep (teacher CFG `cfg`, rule "next"); G = 0 is the unguided student.
    cfgs, rules:   the teacher-CFG and timestep-rule sweeps, at (sweep_guided, sweep_lam).
    teacher_steps: steps of the teacher-alone ceiling (DDIM, CFG folded in), 0 to skip.
    """

    d: int = 2
    modes: int = 8
    n_classes: int = 2
    radius: float = 1.0
    std: float = 0.1
    leak: float = 0.3
    shift: float = 0.0
    weight_skew: float = 0.0
    families: tuple[str, ...] = ("lcm", "euler")
    steps: int = 4
    samples: int = 2000
    ref_samples: int = 2000
    seeds: int = 5
    ode_steps: int = 100
    lams: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)
    guided: tuple[int, ...] = (1, 2)
    cfg: float = 7.5
    cfgs: tuple[float, ...] = (1.0, 3.0, 5.0, 7.5)
    rules: tuple[str, ...] = TEACHER_RULES
    sweep_guided: int = 2
    sweep_lam: float = 0.3
    teacher_steps: int = 50

    def __post_init__(self):
        for name in ("families", "lams", "guided", "cfgs", "rules"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.d, int) or self.d < 1:
            raise ConfigError(f"d (data dimension) must be an integer >= 1, got {self.d!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps (student steps) must be an integer >= 1, got {self.steps!r}")
        for name in ("samples", "ref_samples"):
            if getattr(self, name) < 2 * self.n_classes:
                raise ConfigError(f"{name} must be >= 2 per class ({2 * self.n_classes}), got {getattr(self, name)}")
        if self.seeds < 1 or self.ode_steps < 1 or self.teacher_steps < 0:
            raise ConfigError("seeds and ode_steps must be >= 1 and teacher_steps >= 0")
        for f in self.families:
            if f not in FAMILIES:
                raise ConfigError(f"unknown family {f!r}; pass some of {', '.join(FAMILIES)}")
        for lam in self.lams + (self.sweep_lam,):
            check_lam(lam)
        for w in self.cfgs + (self.cfg,):
            check_cfg(w)
        for g in self.guided + (self.sweep_guided,):
            if not isinstance(g, int) or not (0 <= g <= self.steps):
                raise ConfigError(f"guided steps must be integers in [0, steps={self.steps}], got {g!r}")
        for r in self.rules:
            if r not in TEACHER_RULES:
                raise ConfigError(f"unknown teacher rule {r!r}; pass some of {', '.join(TEACHER_RULES)}")
        for name, v in (("leak", self.leak), ("weight_skew", self.weight_skew)):
            if not (0.0 <= v <= 1.0):
                raise ConfigError(f"{name} must be in [0, 1], got {v}")


@dataclass(frozen=True)
class Setting:
    """One sampler configuration: family, G, lam, teacher CFG, teacher rule."""

    family: str
    guided: int
    lam: float
    cfg: float
    rule: str

    @property
    def label(self) -> str:
        if self.guided == 0 or self.lam == 0:
            return f"{self.family} student"
        return f"{self.family} ++ G={self.guided} lam={self.lam:g} w={self.cfg:g} {self.rule}"


def settings(cfg: GmmLabConfig, family: str) -> list[Setting]:
    """The sweep of one family: unguided, lam x G, teacher CFG, teacher rule (duplicates dropped)."""
    out = [Setting(family, 0, 0.0, cfg.cfg, "next")]
    out += [Setting(family, g, lam, cfg.cfg, "next") for g in cfg.guided if g > 0 for lam in cfg.lams if lam > 0]
    out += [Setting(family, cfg.sweep_guided, cfg.sweep_lam, w, "next") for w in cfg.cfgs]
    out += [Setting(family, cfg.sweep_guided, cfg.sweep_lam, cfg.cfg, r) for r in cfg.rules]
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def labels_for(n: int, n_classes: int) -> torch.Tensor:
    return torch.arange(n) % n_classes


def references(mix: Mixture, cfg: GmmLabConfig, seed: int) -> list[torch.Tensor]:
    """Fresh true samples per class ([ref_samples, d] float64 each) for replicate ``seed``."""
    g = torch.Generator().manual_seed(REF_SEED_OFFSET + seed)
    return [sample_mixture(mix, torch.full((cfg.ref_samples,), c), g) for c in range(mix.n_classes)]


def score(x: torch.Tensor, labels: torch.Tensor, mix: Mixture, refs: list[torch.Tensor]) -> dict:
    """Metrics of samples x [n, d] with class labels [n] against per-class references, averaged over classes."""
    per = []
    for c, ref in enumerate(refs):
        xc = x[labels == c].double()
        m = mode_stats(xc, mix.means, mix.stds, mix.class_weights[c], mix.mode_class, c)
        m["energy"] = energy_distance(xc, ref)
        m["sliced_w1"] = sliced_wasserstein(xc, ref)
        per.append(m)
    return {k: float(np.mean([p[k] for p in per])) for k in METRICS}


def make_sampler(setting: Setting, student, teacher, steps: int) -> Sampler:
    sc = SamplerConfig(family=setting.family, steps=steps, guided_steps=setting.guided, lam=setting.lam,
                       cfg=setting.cfg, teacher_rule=setting.rule, prediction_type="sample",
                       teacher_prediction_type="epsilon", kernel_impl="torch")
    return Sampler(student, teacher, sc)


def run_setting(sampler: Sampler, mix: Mixture, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [n, d] float64 and their labels [n] of one sampler for replicate ``seed``."""
    labels = labels_for(n, mix.n_classes)
    x = sampler.sample(class_cond(labels, mix.n_classes), uncond=null_cond(1, mix.n_classes),
                       latent_shape=(mix.dim, 1, 1), seeds=[seed * n + i for i in range(n)])
    return x.reshape(n, mix.dim).double(), labels


def summarize(per_seed: list[dict], base: list[dict] | None) -> dict:
    out = {}
    for k in METRICS:
        v = np.asarray([p[k] for p in per_seed])
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    if base is not None:
        out["effect"] = {k: paired_effect([b[k] for b in base], [p[k] for p in per_seed])
                         for k in ("energy", "accuracy", "mode_weight_tv")}
    return out


@contextlib.contextmanager
def intra_op_threads(n: int = 1):
    """Run the block with ``n`` torch intra-op threads, restoring the previous count afterwards.

    The lab's tensors are tiny ([b, K, d] mixture responsibilities); splitting each op over an OpenMP
    pool only adds synchronisation. On a shared 2-core box the mini lab ran ~20x slower with 2 threads
    than with 1 (26 s vs 1.4 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_gmm(cfg: GmmLabConfig, log=print) -> dict:
    """Run the whole lab (single-threaded torch, see intra_op_threads); returns the result dict (also
    what the JSON holds)."""
    with intra_op_threads(1):
        return _run_gmm(cfg, log)


def _run_gmm(cfg: GmmLabConfig, log) -> dict:
    t_start = time.perf_counter()
    mix = ring_mixture(cfg.d, cfg.modes, cfg.n_classes, cfg.radius, cfg.std)
    smix = perturbed(mix, leak=cfg.leak, shift=cfg.shift, weight_skew=cfg.weight_skew)
    acp = build_schedule("ddim", 1).alphas_cumprod  # the SD training table, shared by every family
    teacher = MixtureTeacher(mix, acp)
    student = OdeMapStudent(smix, acp, cfg.ode_steps)
    refs = [references(mix, cfg, r) for r in range(cfg.seeds)]
    rows, scatter = [], {}

    # Floor: true samples against the (independent) references.
    floor = []
    for r in range(cfg.seeds):
        labels = labels_for(cfg.samples, mix.n_classes)
        g = torch.Generator().manual_seed(r)
        floor.append(score(sample_mixture(mix, labels, g), labels, mix, refs[r]))
    rows.append({"name": "true samples (floor)", "setting": None, "per_seed": floor, **summarize(floor, None)})

    # Ceiling: the teacher alone, many DDIM steps, CFG folded in (w = 1: the exact conditional teacher).
    if cfg.teacher_steps:
        for w in sorted({1.0, cfg.cfg}):
            sc = SamplerConfig(family="ddim", steps=cfg.teacher_steps, guided_steps=0, kernel_impl="torch")
            samp = Sampler(CFGDenoiser(teacher, w, mix.n_classes), None, sc)
            per = [score(*run_setting(samp, mix, cfg.samples, r), mix, refs[r]) for r in range(cfg.seeds)]
            rows.append({"name": f"teacher ddim {cfg.teacher_steps} steps w={w:g} (ceiling)", "setting": None,
                         "per_seed": per, **summarize(per, None)})

    for fam in cfg.families:
        base = None
        for st in settings(cfg, fam):
            samp = make_sampler(st, student, teacher, cfg.steps)
            per = []
            for r in range(cfg.seeds):
                x, labels = run_setting(samp, mix, cfg.samples, r)
                per.append(score(x, labels, mix, refs[r]))
                if r == 0:
                    scatter[st.label] = x[:, :2].tolist()
            base = per if base is None else base
            rows.append({"name": st.label, "setting": asdict(st), "per_seed": per,
                         **summarize(per, None if per is base else base)})
            log(format_row(rows[-1]))
    return {"lab": "gmm", "config": asdict(cfg), "machine": machine(), "rows": rows,
            "seconds": time.perf_counter() - t_start, "scatter_seed0": scatter,
            "scatter_labels": labels_for(cfg.samples, mix.n_classes).tolist(),
            "means": mix.means[:, :2].tolist()}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def format_row(row: dict) -> str:
    e, a = row["energy"], row["accuracy"]
    eff = row.get("effect")
    d = ""
    if eff:
        de = eff["energy"]
        dz = "  n/a" if de["d_z"] is None else f"{de['d_z']:6.1f}"
        d = f"{de['delta_mean']:+.4f} ±{de['delta_std']:.4f} {dz}  {eff['accuracy']['delta_mean']:+.3f}"
    return (f"{row['name']:<44} {e['mean']:.4f} ±{e['std']:.4f}  {row['sliced_w1']['mean']:.4f}  "
            f"{a['mean']:.3f}  {row['mode_weight_tv']['mean']:.3f}  {row['coverage']['mean']:.2f}  {d}")


def table(result: dict) -> str:
    head = (f"{'setting':<44} {'energy':>6} {'±sd':>7}  {'SW1':>6}  {'acc':>5}  {'modeTV':>5}  {'cov':>4}  "
            f"{'dEnergy(paired)':>17} {'d_z':>6}  dAcc")
    return "\n".join([head] + [format_row(r) for r in result["rows"]])


def plot(result: dict, path: Path, show_family: str | None = None) -> Path:
    """PNG: d=2 scatter (truth-labelled modes, student, student++ at sweep settings) and energy vs lam."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fam = show_family or cfg["families"][0]
    guided_label = Setting(fam, cfg["sweep_guided"], cfg["sweep_lam"], cfg["cfg"], "next").label
    labels = np.asarray(result["scatter_labels"])
    means = np.asarray(result["means"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, key, title in ((axes[0], f"{fam} student", "student (unguided)"),
                           (axes[1], guided_label, f"Distillation++ G={cfg['sweep_guided']} "
                                                   f"lam={cfg['sweep_lam']} w={cfg['cfg']:g}")):
        pts = np.asarray(result["scatter_seed0"].get(key, []))
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 1], c=labels, s=3, cmap="coolwarm", alpha=0.5)
        ax.scatter(means[:, 0], means[:, 1], c=[i % cfg["n_classes"] for i in range(len(means))], marker="x",
                   s=80, cmap="coolwarm")
        ax.set_title(f"{fam}: {title}")
        ax.set_aspect("equal")
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
    ax = axes[2]
    rows = [r for r in result["rows"] if r["setting"]]
    for fam_i in cfg["families"]:
        base = next(r for r in rows if r["setting"]["family"] == fam_i and r["setting"]["guided"] == 0)
        for g in cfg["guided"]:
            pts = [(0.0, base["energy"]["mean"], base["energy"]["std"])]
            pts += [(r["setting"]["lam"], r["energy"]["mean"], r["energy"]["std"]) for r in rows
                    if r["setting"]["family"] == fam_i and r["setting"]["guided"] == g
                    and r["setting"]["cfg"] == cfg["cfg"] and r["setting"]["rule"] == "next"]
            pts.sort()
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{fam_i} G={g}")
    for r in result["rows"]:
        if r["setting"] is None:
            ax.axhline(r["energy"]["mean"], ls=":", lw=1, color="gray")
            ax.text(0.0, r["energy"]["mean"], r["name"], fontsize=6, va="bottom")
    ax.set_xlabel("lam")
    ax.set_ylabel("energy distance to true conditional mixture")
    ax.set_title(f"w={cfg['cfg']:g}, rule next, mean ± sd over {cfg['seeds']} seeds")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_outputs(result: dict, out_dir: Path, make_plot: bool = True) -> dict:
    """``gmm.json`` (and ``gmm.png``) under ``out_dir``."""
    return write_lab_outputs(result, out_dir, "gmm", plot if make_plot else None)


def config_from_args(args) -> GmmLabConfig:
    return GmmLabConfig(
        d=args.d, leak=args.leak, shift=args.shift, weight_skew=args.weight_skew,
        families=tuple(args.families.split(",")), steps=args.steps, samples=args.samples,
        ref_samples=args.ref_samples or args.samples, seeds=args.seeds, ode_steps=args.ode_steps,
        lams=tuple(float(v) for v in args.lams.split(",")), guided=tuple(int(v) for v in args.guided.split(",")),
        cfg=args.cfg, cfgs=tuple(float(v) for v in args.cfgs.split(",")), rules=tuple(args.rules.split(",")),
        sweep_guided=args.sweep_guided, sweep_lam=args.sweep_lam, teacher_steps=args.teacher_steps,
        modes=args.modes, n_classes=args.classes, std=args.std)


def add_args(p) -> None:
    d = GmmLabConfig()
    p.add_argument("--d", type=int, default=d.d, help="data dimension (2 for plots; e.g. 64 for a headline)")
    p.add_argument("--modes", type=int, default=d.modes)
    p.add_argument("--classes", type=int, default=d.n_classes)
    p.add_argument("--std", type=float, default=d.std)
    p.add_argument("--leak", type=float, default=d.leak, help="student's class leakage in [0, 1]")
    p.add_argument("--shift", type=float, default=d.shift, help="student's mean rotation (radians)")
    p.add_argument("--weight-skew", type=float, default=d.weight_skew)
    p.add_argument("--families", default=",".join(d.families))
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--samples", type=int, default=d.samples)
    p.add_argument("--ref-samples", type=int, default=None, help="true samples per class (default: --samples)")
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--ode-steps", type=int, default=d.ode_steps)
    p.add_argument("--lams", default=",".join(f"{v:g}" for v in d.lams))
    p.add_argument("--guided", default=",".join(str(v) for v in d.guided))
    p.add_argument("--cfg", type=float, default=d.cfg)
    p.add_argument("--cfgs", default=",".join(f"{v:g}" for v in d.cfgs))
    p.add_argument("--rules", default=",".join(d.rules))
    p.add_argument("--sweep-guided", type=int, default=d.sweep_guided)
    p.add_argument("--sweep-lam", type=float, default=d.sweep_lam)
    p.add_argument("--teacher-steps", type=int, default=d.teacher_steps)
