"""``python -m distpp.generate`` on the tiny offline repos of test_pipeline: PNGs of the right size,
guided and unguided side by side, a progress bar, and errors as exit code 2."""

from __future__ import annotations

import os

import numpy as np
import pytest

from distpp.generate import main, parse_args, resolve
from distpp.pipeline import KNOWN_PAIRS
from tiny_repos import tiny_repos_for


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return tiny_repos_for(tmp_path_factory)


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_writes_guided_unguided_and_side_by_side(repos, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--prompt", "a cat", "--prompt", "a dog", "--student", repos["sd_lcm"], "--teacher", repos["sd_teacher"],
               "--family", "lcm", "--steps", "2", "--guided-steps", "1", "--lam", "0.5", "--cfg", "5",
               "--seed", "7", "--height", "32", "--width", "48", "--out", str(out), "--compare", "--offline"])
    assert rc == 0
    names = sorted(os.listdir(out))
    assert names == ["000_seed7.png", "000_seed7_compare.png", "000_seed7_unguided.png",
                     "001_seed8.png", "001_seed8_compare.png", "001_seed8_unguided.png"]
    for stem in ("000_seed7", "001_seed8"):
        g, u, c = (_png(out / f"{stem}{s}.png") for s in ("", "_unguided", "_compare"))
        assert g.shape == u.shape == (32, 48, 3) and c.shape == (32, 96, 3)
        assert np.array_equal(c[:, :48], u) and np.array_equal(c[:, 48:], g)
        assert np.abs(g.astype(int) - u.astype(int)).max() > 0  # lam 0.5 changes the image
    err = capsys.readouterr().err
    assert "student steps" in err and "4/4" in err  # 2 steps x (guided + unguided), one batch


def test_generate_matches_the_pipeline(repos, tmp_path):
    from distpp import Pipeline

    out = tmp_path / "out"
    args = ["--prompt", "a cat", "--student", repos["sd_lcm"], "--teacher", repos["sd_teacher"], "--family", "lcm",
            "--steps", "2", "--seed", "3", "--num-images", "2", "--batch-size", "1", "--out", str(out),
            "--offline", "--no-progress"]
    assert main(args) == 0
    pipe = Pipeline.from_pretrained(**resolve(parse_args(args)))
    ref = pipe(["a cat"], seeds=[4])[0]
    assert np.array_equal(_png(out / "001_seed4.png"), np.asarray(ref))


def test_known_pair_fills_defaults_and_options_override():
    args = parse_args(["--prompt", "x", "--pair", "sdxl-lightning", "--lam", "0.2"])
    kw = resolve(args)
    k = KNOWN_PAIRS["sdxl-lightning"]
    assert kw["student"] == k.student and kw["teacher"] == k.teacher and kw["family"] == "euler"
    assert kw["student_weights"] == k.student_weights and kw["lam"] == 0.2 and kw["guided_steps"] == 1
    # another student replaces the pair's weight file too, unless one is named for it
    kw = resolve(parse_args(["--prompt", "x", "--pair", "sdxl-lightning", "--student", "./mine"]))
    assert kw["student"] == "./mine" and "student_weights" not in kw
    kw = resolve(parse_args(["--prompt", "x", "--pair", "sdxl-lightning", "--student", "./mine",
                             "--student-weights", "w.safetensors"]))
    assert kw["student_weights"] == "w.safetensors"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("python -m distpp.generate: error: ") and err.count("\n") == 1, err
    return err


def test_generate_errors_exit_2(repos, tmp_path, capsys):
    base = ["--prompt", "a cat", "--out", str(tmp_path / "o"), "--offline", "--no-progress"]
    pair = ["--student", repos["sd_lcm"], "--teacher", repos["sd_teacher"]]
    assert main(base + pair + ["--family", "lcm9"]) == 2
    assert "unknown family 'lcm9'" in _one_line_error(capsys)
    assert main(base + ["--student", repos["sd_lcm"], "--family", "lcm"]) == 2
    assert "--teacher" in _one_line_error(capsys)
    missing = str(tmp_path / "missing")
    assert main(base + ["--student", missing, "--teacher", repos["sd_teacher"], "--family", "lcm"]) == 2
    assert "no model folder" in _one_line_error(capsys)
    assert not os.path.exists(tmp_path / "o")


def test_generate_errors_speak_cli(repos, tmp_path, capsys):
    """Messages name the options (--dtype float32), not the Python keywords (dtype=torch.float32)."""
    base = ["--prompt", "a cat", "--out", str(tmp_path / "o"), "--offline", "--no-progress", "--student",
            repos["sd_lcm"], "--teacher", repos["sd_teacher"], "--family", "lcm"]
    assert main(base + ["--device", "cpu", "--dtype", "float16"]) == 2
    err = _one_line_error(capsys)
    assert "pass --dtype float32 or bfloat16" in err and "torch." not in err
    assert main(base + ["--steps", "60"]) == 2
    err = _one_line_error(capsys)
    assert "--steps 60 is more than the lcm schedule's original_inference_steps (50)" in err
    assert "pass at most --steps 50" in err and "strength" not in err
    assert main(base + ["--backend", "tensorrt"]) == 2  # refused before any weights load
    assert "or pass --backend eager" in _one_line_error(capsys)
    assert main(base + ["--guided-steps", "7"]) == 2
    assert "--guided-steps must be an integer in [0, 4]" in _one_line_error(capsys)
    turbo = base[:-6] + ["--student", repos["xl_turbo"], "--teacher", repos["xl_teacher"], "--family", "lcm"]
    assert main(turbo) == 2
    err = _one_line_error(capsys)
    assert "but --family lcm was passed: pass --family euler_a, or --allow-family-mismatch" in err
    (tmp_path / "file").write_text("")
    assert main(base[:2] + ["--out", str(tmp_path / "file")] + base[4:]) == 2
    assert "--out" in _one_line_error(capsys)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("bad", [["--graphs", "maybe"], ["--backend", "fast"], ["--num-images", "0"],
                                 ["--steps", "two"]])
def test_argument_errors_are_one_line_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "x", "--pair", "sdxl-turbo"] + bad)
    assert e.value.code == 2
    assert bad[0] in _one_line_error(capsys)


def test_generate_with_graphs_on_warms_up_and_matches_graphs_off(repos, tmp_path, capsys, monkeypatch):
    from distpp.runtime import Runtime

    runs = []
    sample = Runtime.sample

    def counted(self, *a, **k):
        runs.append(self.graphs)
        return sample(self, *a, **k)

    monkeypatch.setattr(Runtime, "sample", counted)
    base = ["--prompt", "a cat", "--prompt", "a dog", "--student", repos["sd_lcm"], "--teacher", repos["sd_teacher"],
            "--family", "lcm", "--steps", "2", "--offline", "--compare"]
    assert main(base + ["--graphs", "on", "--out", str(tmp_path / "on")]) == 0
    err = capsys.readouterr().err
    assert "distpp warm-up" in err and "2/2" in err  # guided and unguided configs, one batch bucket (2)
    assert runs == [True, True]  # the guided and the unguided call, both through the Runtime's runners
    assert main(base + ["--graphs", "off", "--out", str(tmp_path / "off"), "--no-progress"]) == 0
    assert "warm-up" not in capsys.readouterr().err
    for name in ("000_seed0.png", "001_seed1_unguided.png"):
        assert np.array_equal(_png(tmp_path / "on" / name), _png(tmp_path / "off" / name))
