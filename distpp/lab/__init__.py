"""Quality labs: problems a CPU can solve exactly (gmm) or learn in minutes (digits), on which
Distillation++ is measured through the public Sampler. Run ``python -m distpp.lab gmm|digits --help``."""

from __future__ import annotations

import argparse
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


def csv_list(kind: type) -> Callable[[str], tuple]:
    """An argparse ``type`` for comma-separated lists (``--lams 0.01,0.1``): a bad item becomes argparse's
    one-line usage error (exit code 2) naming the item and the expected kind."""

    def parse(text: str) -> tuple:
        items = [v.strip() for v in text.split(",") if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        try:
            return tuple(kind(v) for v in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__} "
                                             f"(e.g. {'0.01,0.1' if kind is float else '1,2'}), got {text!r}")

    parse.__name__ = f"{kind.__name__} list"
    return parse


def csv_text(values) -> str:
    """The CLI spelling of a tuple default: (0.01, 0.1) -> '0.01,0.1'."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
