"""The wheel ships every distpp subpackage, and kernels/ only as distpp.kernels."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {"distpp"} | {"distpp." + p.parent.relative_to(ROOT / "distpp").as_posix().replace("/", ".")
                          for p in (ROOT / "distpp").rglob("__init__.py") if p.parent != ROOT / "distpp"}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
    assert cfg["package-dir"]["distpp.kernels"] == "kernels"
    assert "kernels" not in listed
