"""``python -m distpp.lab gmm|digits [options]``: run a quality lab, print its table, write JSON + PNG.

Lists are comma-separated (``--lams 0.01,0.1``). Bad settings end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import DistppError
from . import csv_text, digits, gmm

LABS = {"gmm": (gmm, gmm.run_gmm, "Gaussian mixture on a ring: exact teacher, ODE-map student"),
        "digits": (digits, digits.run_digits, "8x8 digits: UNet teacher and LCM student trained on the CPU")}


def main(argv=None) -> int:
    p = Parser(prog="python -m distpp.lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="lab", required=True)
    for name, (mod, _, what) in LABS.items():
        sp = sub.add_parser(name, help=what, description=mod.__doc__,
                            formatter_class=HelpFormatter)
        mod.add_args(sp)
        sp.add_argument("--out", default=f"lab_out/{name}", help="folder for the JSON and PNG")
        sp.add_argument("--no-plot", action="store_true", help="write only the JSON")
        sp.add_argument("--machine-name", default="",
                        help="name of this machine, stored in the JSON beside the detected CPU "
                             "(and in the gmm table's title)")
    args = p.parse_args(argv)
    mod, run, _ = LABS[args.lab]
    try:
        cfg = mod.config_from_args(args)
        result = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True), machine_name=args.machine_name)
        print(mod.table(result))
        paths = mod.write_outputs(result, Path(args.out), make_plot=not args.no_plot)
    except DistppError as e:
        print(f"python -m distpp.lab {args.lab}: error: {e}", file=sys.stderr)
        return 2
    print(f"took {result['seconds']:.1f} s; wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2), like the lab's own setting errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag (tuples in their CLI spelling, 0.01,0.1), the module text kept as written."""

    def _get_help_string(self, action):
        if isinstance(action.default, tuple):
            return (action.help or "") + f" (default: {csv_text(action.default)})"
        if action.default in (None, False, ""):
            return action.help
        return super()._get_help_string(action)


if __name__ == "__main__":
    sys.exit(main())
