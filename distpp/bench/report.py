"""Reporting: the printed table, speed-ups (baseline ms / distpp ms), noisy-timing warnings, the plot."""

from __future__ import annotations

from .common import E2E_STAGES, NOISY_P90, PLOT_STAGES


def format_table(rows: list[dict], end_to_end: bool = False) -> str:
    if end_to_end:
        cols = ["variant", "median_ms", "p90_ms", "images_per_s"] + [f"{s}{p}_ms" for s in E2E_STAGES
                                                                     for p in ("", "_p90")]
        head = ["variant", "median ms", "p90 ms", "img/s"] + [f"{s}{p}" for s in E2E_STAGES for p in ("", " p90")]
        cols += ["energy_per_image_j", "power_w"]
        head += ["J/img", "W"]
        first = 18
    else:
        cols = ["variant", "median_ms", "p90_ms", "images_per_s", "student_ms", "teacher_ms", "guidance_ms",
                "scheduler_ms", "other_ms", "graph_ms", "outside_forwards_pct", "energy_per_image_j", "power_w"]
        head = ["variant", "median ms", "p90 ms", "img/s", "student", "teacher", "guidance", "sched", "other", "graph",
                "outside %", "J/img", "W"]
        first = 14
    lines = [" | ".join(f"{h:>{first}}" if i == 0 else f"{h:>10}" for i, h in enumerate(head))]
    for r in rows:
        cells = []
        for i, c in enumerate(cols):
            v = r.get(c)
            w = first if i == 0 else 10
            cells.append(f"{v:>{w}}" if isinstance(v, str) else f"{'n/a':>{w}}" if v is None else f"{v:>{w}.3f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def speedups(rows: list[dict], pairs, stages=("total",)) -> list[dict]:
    """One entry per (variant, baseline, stage) present: speed-up = baseline ms / variant ms (> 1: the
    variant is faster). stage "total" compares whole calls (median_ms), others their ``<stage>_ms``."""
    by = {r["variant"]: r for r in rows}
    out = []
    for variant, baseline in pairs:
        if variant not in by or baseline not in by:
            continue
        for st in stages:
            col = "median_ms" if st == "total" else f"{st}_ms"
            b, v = by[baseline][col], by[variant][col]
            if v > 0:
                out.append({"name": f"{variant} vs {baseline}" + ("" if st == "total" else f" ({st})"),
                            "variant": variant, "baseline": baseline, "stage": st, "baseline_ms": b,
                            "variant_ms": v, "speedup": b / v})
    return out


def noisy_warnings(rows: list[dict]) -> list[str]:
    """A message per variant whose p90 exceeds NOISY_P90 x its median (the row is marked ``noisy``)."""
    out = []
    for r in rows:
        r["noisy"] = r["p90_ms"] > NOISY_P90 * r["median_ms"]
        if r["noisy"]:
            out.append(f"{r['variant']}: p90 {r['p90_ms']:.2f} ms is {r['p90_ms'] / r['median_ms']:.2f}x its median "
                       f"{r['median_ms']:.2f} ms (> {NOISY_P90}x): noisy timings, e.g. a shared or busy machine; "
                       "compare medians with care, pin --threads or raise --repeats")
    return out


def write_plot(rows: list[dict], path: str, title: str) -> None:
    """A PNG of stacked per-stage median ms per variant (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.8))
    left = [0.0] * len(rows)
    for st in PLOT_STAGES + E2E_STAGES:
        vals = [r.get(f"{st}_ms", 0.0) for r in rows]
        if any(vals):
            ax.barh(names, vals, left=left, label=st)
            left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(rows):
        ax.text(left[i], i, f" {r['median_ms']:.2f} ms", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median ms per call (stages: medians over repeats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(doc: dict) -> str:
    """The printed report of one run: settings line, table, speed-ups, time ratios, targets, extras."""
    s, env, rows = doc["settings"], doc["env"], doc["rows"]
    e2e = s["mode"] == "pipeline"
    what = (f"end to end ({s['model']}, {s['height']}x{s['width']})" if e2e else f"latent loop preset={s['preset']}")
    teacher = " teacher=embedded" if s.get("teacher_guidance") == "embedded" else ""
    opts = "".join(f" {k}={v}" for k, v in s.get("family_options", {}).items())
    lines = [f"distpp.bench  {what} family={s['family']}{opts} steps={s['steps']} G={s['guided_steps']} "
             f"lam={s['lam']} cfg={s['cfg']}{teacher} batch={s['batch']} dtype={s['dtype']} ops={s['kernel_impl']} "
             f"backend={s['backend']}  device={env['device_name']} threads={env['cpu_threads']} "
             f"(build {doc['build_s']:.1f} s, {s['repeats']} repeats)"]
    lines += [f"note: variant {n} skipped: {why}" for n, why in s.get("skipped", {}).items()]
    lines.append(format_table(rows, end_to_end=e2e))
    if doc["speedups"]:
        lines.append(doc["speedup_convention"] + ":")
        lines.append("  " + "  ".join(f"{u['name']} = {u['speedup']:.3f}" for u in doc["speedups"]))
    if doc["time_ratios"]:
        lines.append("cost of guidance: " + "  ".join(f"{k} = {v:.3f}" for k, v in doc["time_ratios"].items()))
    t = doc["targets"]
    if t:
        where = ("GPU, SD1.5 512 fp16, 4 steps + 1 guided, batch 1" if e2e else "GPU")
        lead = (f"targets (defined for a {where}; these figures only exercise the code): "
                if env["device_type"] != "cuda" else "targets: ")
        lines.append(lead + "  ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}" for k, v in t.items()))
    if s["compile_s"] or s["graph_capture_s"] or s["backend_build_s"]:
        lines.append(f"compile {s['compile_s']:.1f} s, graph capture {s['graph_capture_s']:.2f} s, "
                     f"backend build {s['backend_build_s']:.1f} s (not in the timings)")
    lines.append("telemetry: " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in doc["telemetry"].items()))
    return "\n".join(lines)
