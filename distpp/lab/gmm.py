"""The Gaussian-mixture quality lab: exact teacher, ODE-map student, Distillation++ sweeps.

Setting (ALGORITHM.md, "What to expect on problems with an exact answer"): modes on a ring, each class
owning one arc of it (contiguous layout; interleaved modes are the negative control), the SD noise
schedule. The teacher is the mixture's exact denoiser (CFG by the sampler between the class-conditional
and unconditional mixtures); the student is the exact PF-ODE map of a perturbed mixture (class leakage
by default: ALGORITHM.md's leaky student) stepped by a few-step family sampler. Every
configuration runs through distpp.Sampler with the same per-sample seeds as the unguided student
(seed-paired), and is scored against fresh samples of the true class-conditional mixture.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import SamplerConfig, TEACHER_RULES
from ..errors import ConfigError
from ..sampler import Sampler
from ..schedules import FAMILIES, build_schedule
from . import csv_list, save_figure
from . import write_outputs as write_lab_outputs
from .metrics import energy_distance, mode_stats, paired_effect, sliced_wasserstein
from .mixture import (CLASS_LAYOUTS, CFGDenoiser, FlowMixtureTeacher, FlowOdeMapStudent, Mixture, MixtureTeacher,
                      OdeMapStudent, class_cond, null_cond, perturbed, ring_mixture, sample_mixture)

METRICS = ("energy", "sliced_w1", "accuracy", "mode_weight_tv", "coverage", "in_mode")
# The paper's teacher-timestep ablation (DMD2 FID, lower is better): next < random < same.
PAPER_RULE_ORDER = ("next", "random", "same")
# Reference samples use seeds far from the samplers' (per-sample seeds r*B + i), so they are independent.
REF_SEED_OFFSET = 10**9
# The flow family's model timestep input in the lab: sig * 1000, as StableDiffusion3Pipeline passes it (the
# lab's flow models decode sig = t / 1000, so the choice does not change a result).
FLOW_TIMESTEP_SCALE = 1000.0


@dataclass(frozen=True)
class GmmLabConfig:
    """Settings of the gmm lab (the CLI flag of each field is its name with dashes; n_classes: --classes).

    d, modes, n_classes, radius, std: the true mixture (ring_mixture).
    class_layout:  "contiguous" (class c owns one arc of the ring: ALGORITHM.md's reference setting, the
                   headline) or "interleaved" (mode k in class k % n_classes: CFG inert, a negative control).
    leak, shift, weight_skew:         the student's perturbation (perturbed()). leak blends each class row
                   with the unconditional row; the default 0.375 is ALGORITHM.md's student ("0.3 added to every
                   mode weight": C*L / (1 + C*L) for C = 2 classes, L = 0.3, 18.75% of the mass on the
                   wrong class).
    families:      student families to run (each through the Sampler).
    steps:         student steps N (dmd2/euler: 999/749/499/249 at 4; lcm: 999/759/499/259; flow with shift 3:
                   sig 1, 0.858, 0.602, 0.009).
    flow_shift:    the flow family's sigma shift (family option shift; 3 = SD3.5's scheduler). Its student
                   and teacher are the rectified-flow forms of the same mixtures (velocity predictions, the
                   ODE map integrated in flow variables from sig = 1), timestep input sig * 1000.
    samples:       samples per run (labels alternate over the classes); ref_samples: true samples per
                   class and seed for the metrics.
    seeds:         replicates; replicate r uses per-sample seeds r*samples + i for every configuration.
    ode_steps:     Heun steps of the student's ODE map.
    lams, guided:  the lam x G sweep (teacher CFG `cfg`, rule "next"); G = 0 is the unguided student.
    cfgs:          the teacher-CFG sweep, at (sweep_guided, sweep_lam).
    rules:         the teacher-timestep ablation, at sweep_lam and teacher CFG `cfg`, for every G in guided.
    teacher_steps: steps of the teacher-alone rows (DDIM, CFG folded in, w = 1 and w = cfg), 0 to skip.
    """

    d: int = 2
    modes: int = 8
    n_classes: int = 2
    radius: float = 1.0
    std: float = 0.1
    class_layout: str = "contiguous"
    leak: float = 0.375
    shift: float = 0.0
    weight_skew: float = 0.0
    families: tuple[str, ...] = ("dmd2", "lcm", "euler")
    steps: int = 4
    samples: int = 3000
    ref_samples: int = 3000
    seeds: int = 3
    ode_steps: int = 100
    flow_shift: float = 3.0
    lams: tuple[float, ...] = (0.01, 0.1, 0.3, 0.5)
    guided: tuple[int, ...] = (1, 2)
    cfg: float = 7.5
    cfgs: tuple[float, ...] = (1.0, 7.5)
    rules: tuple[str, ...] = TEACHER_RULES
    sweep_guided: int = 2
    sweep_lam: float = 0.3
    teacher_steps: int = 50

    def __post_init__(self):
        for name in ("families", "lams", "guided", "cfgs", "rules"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("d", "steps", "seeds", "ode_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be an integer >= 1, got {v!r}")
        if not isinstance(self.teacher_steps, int) or self.teacher_steps < 0:
            raise ConfigError(f"teacher_steps (--teacher-steps) must be an integer >= 0 (0 skips the teacher-alone "
                              f"rows), got {self.teacher_steps!r}")
        if self.class_layout not in CLASS_LAYOUTS:
            raise ConfigError(f"class_layout (--class-layout) must be one of {', '.join(CLASS_LAYOUTS)}, "
                              f"got {self.class_layout!r}")
        for name in ("samples", "ref_samples"):
            if getattr(self, name) < 2 * self.n_classes:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be >= 2 per class "
                                  f"({2 * self.n_classes}), got {getattr(self, name)}")
        for f in self.families:
            if f not in FAMILIES:
                raise ConfigError(f"unknown family {f!r} (--families); pass some of {', '.join(FAMILIES)}")
        for name, vals in (("lams", self.lams), ("sweep_lam", (self.sweep_lam,))):
            for lam in vals:
                if not isinstance(lam, (int, float)) or not (0.0 <= lam <= 1.0):
                    raise ConfigError(f"{name} (--{name.replace('_', '-')}) values must be in [0, 1], got {lam!r}")
        for name, vals in (("cfgs", self.cfgs), ("cfg", (self.cfg,))):
            for w in vals:
                if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    raise ConfigError(f"{name} (--{name}) values must be finite numbers >= 0, got {w!r}")
        for name, vals in (("guided", self.guided), ("sweep_guided", (self.sweep_guided,))):
            for g in vals:
                if not isinstance(g, int) or not (0 <= g <= self.steps):
                    raise ConfigError(f"{name} (--{name.replace('_', '-')}) values must be integers in "
                                      f"[0, steps={self.steps}], got {g!r}")
        for r in self.rules:
            if r not in TEACHER_RULES:
                raise ConfigError(f"unknown teacher rule {r!r} (--rules); pass some of {', '.join(TEACHER_RULES)}")
        fs = self.flow_shift
        if not isinstance(fs, (int, float)) or not (math.isfinite(fs) and fs > 0):
            raise ConfigError(f"flow_shift (--flow-shift) must be a finite number > 0 (SD3.5: 3), got {fs!r}")
        for name, v in (("leak", self.leak), ("weight_skew", self.weight_skew)):
            if not (0.0 <= v <= 1.0):
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be in [0, 1], got {v}")


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
    out += ablation_settings(cfg, family)
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def ablation_settings(cfg: GmmLabConfig, family: str) -> list[Setting]:
    """The teacher-timestep ablation of one family: every rule at (G, sweep_lam, cfg) for each G > 0."""
    if cfg.sweep_lam == 0:
        return []
    return [Setting(family, g, cfg.sweep_lam, cfg.cfg, r) for g in cfg.guided if g > 0 for r in cfg.rules]


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


def is_flow(family: str) -> bool:
    """Whether ``family`` runs in rectified-flow variables (its models predict velocities)."""
    return family == "flow"


def family_models(family: str, mix: Mixture, smix: Mixture, ode_steps: int) -> tuple:
    """(student, teacher) of ``family`` for the true mixture ``mix`` and the student's ``smix``: the VP forms
    (ODE map predicting x0, exact denoiser predicting epsilon, on the SD training table) or, for flow, the
    rectified-flow forms (both predicting velocities, timestep input sig * FLOW_TIMESTEP_SCALE)."""
    if is_flow(family):
        return FlowOdeMapStudent(smix, FLOW_TIMESTEP_SCALE, ode_steps), FlowMixtureTeacher(mix, FLOW_TIMESTEP_SCALE)
    acp = build_schedule("ddim", 1).alphas_cumprod  # the SD training table, shared by every VP family
    return OdeMapStudent(smix, acp, ode_steps), MixtureTeacher(mix, acp)


def make_sampler(setting: Setting, student, teacher, steps: int, flow_shift: float = 3.0) -> Sampler:
    if is_flow(setting.family):
        kw = dict(prediction_type="flow", teacher_prediction_type="flow",
                  family_options=dict(shift=float(flow_shift), timestep_scale=FLOW_TIMESTEP_SCALE))
    else:
        kw = dict(prediction_type="sample", teacher_prediction_type="epsilon")
    sc = SamplerConfig(family=setting.family, steps=steps, guided_steps=setting.guided, lam=setting.lam,
                       cfg=setting.cfg, teacher_rule=setting.rule, kernel_impl="torch", **kw)
    return Sampler(student, teacher, sc)


def run_setting(sampler: Sampler, mix: Mixture, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [n, d] float64 and their labels [n] of one sampler for replicate ``seed``."""
    labels = labels_for(n, mix.n_classes)
    x = sampler.sample(class_cond(labels, mix.n_classes), uncond=null_cond(1, mix.n_classes),
                       latent_shape=(mix.dim, 1, 1), seeds=[seed * n + i for i in range(n)])
    return x.reshape(n, mix.dim).double(), labels


def summarize(per_seed: list[dict], base: list[dict] | None) -> dict:
    """Mean and sd over seeds of every metric and, against ``base`` (the unguided student, same seeds), the
    seed-paired effects plus ``energy_ratio``: seed-mean ED over the student's seed-mean ED."""
    out = {}
    for k in METRICS:
        v = np.asarray([p[k] for p in per_seed])
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    if base is not None:
        out["effect"] = {k: paired_effect([b[k] for b in base], [p[k] for p in per_seed])
                         for k in ("energy", "accuracy", "mode_weight_tv")}
        out["effect"]["energy_ratio"] = out["energy"]["mean"] / float(np.mean([b["energy"] for b in base]))
    return out


def ablation(cfg: GmmLabConfig, rows: list[dict]) -> list[dict]:
    """The teacher-timestep ablation from the rows: per family and G, each rule's seed-paired effect against
    the unguided student and against rule "next", the measured ED order and whether it is the paper's
    (DMD2 FID: next 20.937 < random 21.105 < same 21.342; baseline 21.238)."""
    by_setting = {(r["setting"]["family"], r["setting"]["guided"], r["setting"]["lam"], r["setting"]["cfg"],
                   r["setting"]["rule"]): r for r in rows if r["setting"]}
    out = []
    for fam in cfg.families:
        for g in sorted({s.guided for s in ablation_settings(cfg, fam)}):
            got = {rule: by_setting[(fam, g, cfg.sweep_lam, cfg.cfg, rule)] for rule in cfg.rules}
            entry = {"family": fam, "guided": g, "lam": cfg.sweep_lam, "cfg": cfg.cfg, "rules": {}}
            for rule, row in got.items():
                eff = row["effect"]
                entry["rules"][rule] = {"energy": row["energy"], "accuracy": row["accuracy"],
                                        "vs_student": {"energy": eff["energy"], "accuracy": eff["accuracy"],
                                                       "energy_ratio": eff["energy_ratio"]}}
                if "next" in got and rule != "next":
                    entry["rules"][rule]["vs_next"] = {k: paired_effect([p[k] for p in got["next"]["per_seed"]],
                                                                        [p[k] for p in row["per_seed"]])
                                                       for k in ("energy", "accuracy")}
            entry["order"] = sorted(got, key=lambda r: got[r]["energy"]["mean"])
            paper = [r for r in PAPER_RULE_ORDER if r in got]
            entry["paper_order"] = paper
            entry["paper_order_reproduced"] = [r for r in entry["order"] if r in paper] == paper
            out.append(entry)
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


def run_gmm(cfg: GmmLabConfig, log=print, machine_name: str = "") -> dict:
    """Run the whole lab (single-threaded torch, see intra_op_threads); returns the result dict (also
    what the JSON holds). ``machine_name`` (e.g. "2-core AMD EPYC CPU dev box") is stored beside the
    detected CPU, so every figure in the JSON names its machine."""
    with intra_op_threads(1):
        return _run_gmm(cfg, log, machine_name)


def teacher_label(steps: int, w: float) -> str:
    kind = "ceiling" if w == 1 else "CFG-sharpened, not a ceiling"
    return f"teacher alone: ddim {steps} steps, w={w:g} ({kind})"


def _run_gmm(cfg: GmmLabConfig, log, machine_name: str) -> dict:
    t_start = time.perf_counter()
    mix = ring_mixture(cfg.d, cfg.modes, cfg.n_classes, cfg.radius, cfg.std, cfg.class_layout)
    smix = perturbed(mix, leak=cfg.leak, shift=cfg.shift, weight_skew=cfg.weight_skew)
    # (student, teacher) per kind, keyed by is_flow: the VP families share one pair, whose teacher also
    # gives the teacher-alone rows (the same mixture either way).
    models = {False: family_models("ddim", mix, smix, cfg.ode_steps)}
    teacher = models[False][1]
    refs = [references(mix, cfg, r) for r in range(cfg.seeds)]
    rows, scatter = [], {}

    # Floor: true samples against the (independent) references.
    floor = []
    for r in range(cfg.seeds):
        labels = labels_for(cfg.samples, mix.n_classes)
        g = torch.Generator().manual_seed(r)
        floor.append(score(sample_mixture(mix, labels, g), labels, mix, refs[r]))
    rows.append({"name": "true samples (floor)", "setting": None, "per_seed": floor, **summarize(floor, None)})

    # The teacher alone, many DDIM steps, CFG folded in. w = 1 samples the exact class-conditional
    # mixture (the ceiling, up to DDIM's discretisation); w > 1 samples a CFG-sharpened distribution, not
    # the data, so it is labelled as such and may score worse than the student.
    if cfg.teacher_steps:
        for w in sorted({1.0, cfg.cfg}):
            sc = SamplerConfig(family="ddim", steps=cfg.teacher_steps, guided_steps=0, kernel_impl="torch")
            samp = Sampler(CFGDenoiser(teacher, w, mix.n_classes), None, sc)
            per = [score(*run_setting(samp, mix, cfg.samples, r), mix, refs[r]) for r in range(cfg.seeds)]
            rows.append({"name": teacher_label(cfg.teacher_steps, w), "setting": None,
                         "per_seed": per, **summarize(per, None)})
            log(format_row(rows[-1]))

    for fam in cfg.families:
        if is_flow(fam) not in models:
            models[True] = family_models(fam, mix, smix, cfg.ode_steps)
        student, fam_teacher = models[is_flow(fam)]
        base = None
        for st in settings(cfg, fam):
            samp = make_sampler(st, student, fam_teacher, cfg.steps, cfg.flow_shift)
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
    return {"lab": "gmm", "config": asdict(cfg), "machine": machine(machine_name), "rows": rows,
            "ablation": ablation(cfg, rows),
            "seconds": time.perf_counter() - t_start, "scatter_seed0": scatter,
            "scatter_labels": labels_for(cfg.samples, mix.n_classes).tolist(),
            "means": mix.means[:, :2].tolist(), "mode_class": mix.mode_class.tolist()}


def machine(name: str = "") -> dict:
    """Where the figures were measured: the given name, the CPU model, core count, torch and its threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"name": name, "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


COLUMNS = (
    ("energy ±sd", "energy distance (ED) to fresh true samples of the requested class, mean ± sd over seeds; "
                   "see the estimator note below"),
    ("SW1", "sliced Wasserstein-1 to the same true samples (mean 1-D W1 over 128 random projections)"),
    ("acc", "class accuracy: share of samples whose nearest mode belongs to the requested class"),
    ("modeTV", "total variation between the per-mode share of samples (nearest mode) and the class's "
               "true mode weights (0 = every mode hit in proportion)"),
    ("cov", "mode coverage: share of the class's modes holding at least half their expected share"),
    ("ED/base", "seed-mean ED over the unguided student's seed-mean ED (same family)"),
    ("dED(paired)", "seed-paired ED change against the unguided student (same seeds, so the same base "
                    "noise): mean ± sd over seeds of the per-seed differences; negative = closer to the data"),
    ("d_z", "paired effect size: mean / sd of those differences (|d_z| > 3 is well beyond seed noise)"),
    ("dAcc", "seed-paired change in class accuracy"),
)
ED_NOTE = ("ED = 2E|X-Y| - E|X-X'| - E|Y-Y'| with the within-set means over distinct pairs (a U-statistic): "
           "unbiased, so for an exact sampler it scatters around 0 and can print below zero (see the floor "
           "row's sd); differences smaller than that sd are noise.")


def format_row(row: dict) -> str:
    e, a = row["energy"], row["accuracy"]
    eff = row.get("effect")
    d = ""
    if eff:
        de = eff["energy"]
        dz = "  n/a" if de["d_z"] is None else f"{de['d_z']:6.1f}"
        d = (f"{eff['energy_ratio']:7.3f}  {de['delta_mean']:+.4f} ±{de['delta_std']:.4f} {dz}  "
             f"{eff['accuracy']['delta_mean']:+.3f}")
    return (f"{row['name']:<52} {e['mean']:7.4f} ±{e['std']:.4f}  {row['sliced_w1']['mean']:.4f}  "
            f"{a['mean']:.3f}  {row['mode_weight_tv']['mean']:.3f}  {row['coverage']['mean']:.2f}  {d}")


def format_ablation(entries: list[dict]) -> list[str]:
    lines = []
    for e in entries:
        lines.append(f"teacher-timestep ablation, {e['family']} G={e['guided']} lam={e['lam']:g} w={e['cfg']:g}: "
                     f"ED order {' < '.join(e['order'])}; paper's order ({' < '.join(e['paper_order'])}) "
                     f"{'reproduced' if e['paper_order_reproduced'] else 'NOT reproduced'}")
        for rule, r in e["rules"].items():
            vs = r["vs_student"]["energy"]
            txt = f"  {rule:<7} dED vs student {vs['delta_mean']:+.4f} ±{vs['delta_std']:.4f}"
            if "vs_next" in r:
                vn = r["vs_next"]["energy"]
                dz = "n/a" if vn["d_z"] is None else f"{vn['d_z']:.1f}"
                txt += f"   vs next {vn['delta_mean']:+.4f} ±{vn['delta_std']:.4f} (d_z {dz})"
            lines.append(txt)
    return lines


def table(result: dict) -> str:
    """The printed report: one row per configuration, the ablation, and a footer explaining every column."""
    cfg, m = result["config"], result["machine"]
    title = (f"gmm lab: {cfg['modes']} modes on a ring, {cfg['n_classes']} classes ({cfg['class_layout']} layout), "
             f"d={cfg['d']}, student leak {cfg['leak']:g}; {cfg['samples']} samples x {cfg['seeds']} seeds; "
             f"{m['name'] + ' (' + m['cpu'] + ')' if m.get('name') else m['cpu']}, torch {m['torch']}")
    head = (f"{'setting':<52} {'energy':>7} {'±sd':>7}  {'SW1':>6}  {'acc':>5}  {'modeTV':>5}  {'cov':>4}  "
            f"{'ED/base':>7}  {'dED(paired)':>16} {'d_z':>6}  dAcc")
    lines = [title, head] + [format_row(r) for r in result["rows"]]
    lines += [""] + format_ablation(result.get("ablation", []))
    lines += ["", "columns:"] + [f"  {k:<12} {v}" for k, v in COLUMNS] + ["  " + ED_NOTE]
    if cfg["teacher_steps"]:
        lines.append("  teacher alone: the exact teacher sampled on its own (DDIM, eta 0, CFG folded in); w=1 is "
                     "the class-conditional mixture itself (the ceiling), w>1 a CFG-sharpened target that "
                     "over-weights the modes far from the other class, so it can score worse than the student.")
    if any(is_flow(f) for f in cfg["families"]):
        lines.append(f"  flow: the rectified-flow forms of the same mixtures (x = (1 - sig) x0 + sig e; teacher = "
                     f"exact velocity E[e - x0 | x], student = the ODE map integrated in flow variables from sig = 1), "
                     f"shift {cfg['flow_shift']:g}, timestep input sig * {FLOW_TIMESTEP_SCALE:g}; the other families "
                     f"run in VP variables on the SD schedule.")
    if cfg["class_layout"] == "interleaved":
        lines.append("  interleaved layout: both classes have the same mean and covariance, so at the teacher's "
                     "levels (t >= 499) a noised sample carries no class information and CFG cannot act.")
    return "\n".join(lines)


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
        ax.scatter(means[:, 0], means[:, 1], c=result["mode_class"], marker="X", s=90, cmap="coolwarm",
                   edgecolors="black", linewidths=1.0, zorder=3)
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
    # Reference lines: the floor and the w=1 teacher (the CFG-sharpened teacher is off this scale).
    refs = [r for r in result["rows"] if r["setting"] is None and "CFG-sharpened" not in r["name"]]
    for i, r in enumerate(refs):
        ax.axhline(r["energy"]["mean"], ls=":", lw=1, color="gray")
        ax.text(0.02 + 0.45 * i, r["energy"]["mean"], r["name"], fontsize=6, va="bottom",
                transform=ax.get_yaxis_transform())
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
        d=args.d, modes=args.modes, n_classes=args.classes, std=args.std, class_layout=args.class_layout,
        leak=args.leak, shift=args.shift, weight_skew=args.weight_skew, families=args.families, steps=args.steps,
        samples=args.samples, ref_samples=args.ref_samples or args.samples, seeds=args.seeds,
        ode_steps=args.ode_steps, flow_shift=args.flow_shift, lams=args.lams, guided=args.guided, cfg=args.cfg,
        cfgs=args.cfgs, rules=args.rules, sweep_guided=args.sweep_guided, sweep_lam=args.sweep_lam,
        teacher_steps=args.teacher_steps)


def add_args(p) -> None:
    """The gmm lab's flags (lists are comma-separated, e.g. ``--lams 0.01,0.1``); defaults = GmmLabConfig()."""
    d = GmmLabConfig()
    floats, ints, names = csv_list(float), csv_list(int), csv_list(str)
    p.add_argument("--d", type=int, default=d.d, help="data dimension (2 for the scatter plots)")
    p.add_argument("--modes", type=int, default=d.modes, help="Gaussians on the ring")
    p.add_argument("--classes", type=int, default=d.n_classes, help="classes (modes must be a multiple)")
    p.add_argument("--std", type=float, default=d.std, help="per-mode standard deviation (ring radius 1)")
    p.add_argument("--class-layout", default=d.class_layout, choices=CLASS_LAYOUTS,
                   help="contiguous: each class owns an arc (the spec's setting); interleaved: mode k in class "
                        "k %% classes (CFG inert: the negative control)")
    p.add_argument("--leak", type=float, default=d.leak,
                   help="student's class leakage in [0, 1]: each class row blended with the unconditional row "
                        "(0.375 = the spec's student, 18.75%% of its mass on the wrong class)")
    p.add_argument("--shift", type=float, default=d.shift, help="student's mean rotation (radians)")
    p.add_argument("--weight-skew", type=float, default=d.weight_skew, help="student's mode-weight skew in [0, 1]")
    p.add_argument("--families", type=names, default=d.families, metavar="LIST",
                   help=f"student families, comma-separated, e.g. dmd2,lcm (from: {', '.join(FAMILIES)})")
    p.add_argument("--steps", type=int, default=d.steps, help="student steps")
    p.add_argument("--samples", type=int, default=d.samples, help="samples per run (classes alternate)")
    p.add_argument("--ref-samples", type=int, default=None, help="true samples per class and seed (default: --samples)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="seed-paired replicates")
    p.add_argument("--ode-steps", type=int, default=d.ode_steps, help="Heun steps of the student's ODE map")
    p.add_argument("--flow-shift", type=float, default=d.flow_shift,
                   help="sigma shift of the flow family (3 = SD3.5's; its models are the rectified-flow forms)")
    p.add_argument("--lams", type=floats, default=d.lams, metavar="LIST",
                   help="lam sweep, comma-separated, e.g. 0.01,0.1")
    p.add_argument("--guided", type=ints, default=d.guided, metavar="LIST",
                   help="guided-step counts G swept, comma-separated, e.g. 1,2")
    p.add_argument("--cfg", type=float, default=d.cfg, help="teacher CFG scale w of the sweeps")
    p.add_argument("--cfgs", type=floats, default=d.cfgs, metavar="LIST",
                   help="teacher CFG scales compared at (--sweep-guided, --sweep-lam), e.g. 1,7.5")
    p.add_argument("--rules", type=names, default=d.rules, metavar="LIST",
                   help=f"teacher-timestep rules of the ablation, at --sweep-lam and --cfg for every G in --guided "
                        f"(from: {', '.join(TEACHER_RULES)})")
    p.add_argument("--sweep-guided", type=int, default=d.sweep_guided, help="G of the --cfgs comparison")
    p.add_argument("--sweep-lam", type=float, default=d.sweep_lam, help="lam of the --cfgs and --rules comparisons")
    p.add_argument("--teacher-steps", type=int, default=d.teacher_steps,
                   help="DDIM steps of the teacher-alone rows (w=1 and --cfg), 0 to skip")
