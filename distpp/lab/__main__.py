"""``python -m distpp.lab gmm|digits [options]``: run a quality lab, print its table, write JSON + PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import digits, gmm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distpp.lab", description=__doc__)
    sub = p.add_subparsers(dest="lab", required=True)
    for name, mod in (("gmm", gmm), ("digits", digits)):
        sp = sub.add_parser(name)
        mod.add_args(sp)
        sp.add_argument("--out", default=f"lab_out/{name}", help="folder for the JSON and PNG")
        sp.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    mod = gmm if args.lab == "gmm" else digits
    cfg = mod.config_from_args(args)
    run = gmm.run_gmm if args.lab == "gmm" else digits.run_digits
    result = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(mod.table(result))
    paths = mod.write_outputs(result, Path(args.out), make_plot=not args.no_plot)
    print(f"took {result['seconds']:.1f} s; wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
