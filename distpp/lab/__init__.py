"""Quality labs: problems a CPU can solve exactly (gmm) or learn in minutes (digits), on which
Distillation++ is measured through the public Sampler. Run ``python -m distpp.lab gmm|digits --help``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as a PNG (folders created), close it, return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir, name: str, plot: Callable[[dict, Path], Path] | None) -> dict:
    """``<out_dir>/<name>.json`` and, with ``plot``, ``<name>.png``; returns {"json": path, "png": path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json"}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    if plot is not None:
        paths["png"] = plot(result, out_dir / f"{name}.png")
    return paths
