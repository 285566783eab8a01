"""The csrc/ C++ ops through the Python ctypes binding, on the host build (same ABI and per-element math
as the CUDA library, host pointers): vs the torch references and float64 truth, and the C ABI's error
codes surfacing as clear Python exceptions. The CUDA build is checked in test_ops_cuda.py (GPU only)."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from distpp import csrc_ops
from distpp.errors import BackendUnavailableError, InputError
from distpp.kernels import guided_update_ref, plain_update_ref, student_update_ref
from op_cases import SHAPES, TOLS, check_against, make_case, poisoned, seed_of, truth_guided, truth_plain, truth_student

CSRC = Path(__file__).resolve().parents[2] / "csrc"


@pytest.fixture(scope="session")
def host_lib(tmp_path_factory):
    """libdistpp_kernels_host compiled from this checkout's csrc/ (a few seconds; independent of cmake)."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    out = tmp_path_factory.mktemp("csrc") / "libdistpp_kernels_host.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", f"-I{CSRC}",
                    str(CSRC / "abi.cpp"), str(CSRC / "host_ops.cpp"), "-o", str(out)], check=True)
    lib = csrc_ops.load_path(str(out))
    assert not lib.is_cuda
    return lib


@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("shape", SHAPES)
def test_host_ops_match_reference_and_float64(host_lib, dtype, shape):
    c = make_case(shape, dtype, "cpu", seed=seed_of(shape, dtype, "csrc"), with_z=shape[0] != 3)
    x, B = c["x"], shape[0]
    outs = {}
    impls = {"lib": (host_lib.student_update, host_lib.plain_update, host_lib.guided_update),
             "ref": (student_update_ref, plain_update_ref, guided_update_ref)}
    for name, (su, pu, gu) in impls.items():
        s_out = poisoned((2 * B,) + shape[1:], dtype, "cpu")
        p_out, p_xin = poisoned(shape, torch.float32, "cpu"), poisoned(shape, dtype, "cpu")
        g_out, g_xin = poisoned(shape, torch.float32, "cpu"), poisoned(shape, dtype, "cpu")
        su(x, c["m_s"], c["n"], c["coef"], c["gcoef"], c["k"], s_out)
        pu(x, c["m_s"], c["z"], c["coef"], c["k"], p_out, p_xin)
        gu(x, c["m_s"], c["n"], c["m_t"], c["z"], c["coef"], c["gcoef"], c["lam"], c["cfg"], c["k"], g_out, g_xin)
        outs[name] = (s_out, p_out, p_xin, g_out, g_xin)
    (s, p, pi, g, gi), (s_r, p_r, pi_r, g_r, gi_r) = outs["lib"], outs["ref"]
    (pn, pin), (gn, gin) = truth_plain(c), truth_guided(c)
    check_against(s, s_r, truth_student(c), TOLS[dtype], "student out")
    check_against(p, p_r, pn, TOLS[torch.float32], "plain x_out")
    check_against(pi, pi_r, pin, TOLS[dtype], "plain xin_out")
    check_against(g, g_r, gn, TOLS[torch.float32], "guided x_out")
    check_against(gi, gi_r, gin, TOLS[dtype], "guided xin_out")


def test_host_op_in_place(host_lib):
    c = make_case((2, 4, 8, 8), torch.float16, "cpu", seed=9)
    x = c["x"].clone()
    host_lib.plain_update(x, c["m_s"], c["z"], c["coef"], c["k"], x, None)
    ref = c["x"].clone()
    plain_update_ref(ref, c["m_s"], c["z"], c["coef"], c["k"], ref, None)
    check_against(x, ref, truth_plain(c)[0], TOLS[torch.float32], "in-place x")


def _plain_params(c, x_out, **over):
    x = c["x"]
    fields = dict(x=x.data_ptr(), m_s=c["m_s"].data_ptr(), z=None, coef=c["coef"].data_ptr(), x_out=x_out.data_ptr(),
                  xin_out=None, batch=x.shape[0], numel=x.numel(), num_steps=c["coef"].shape[0], step=c["k"],
                  m_s_dtype=0, xin_dtype=0)
    fields.update(over)
    return csrc_ops.PlainUpdateParams(**fields)


@pytest.mark.parametrize("over,match", [
    (dict(m_s=None), "NULL_POINTER.*m_s is NULL"),
    (dict(numel=0), "INVALID_SIZE.*numel is 0"),
    (dict(numel=127), "INVALID_SIZE.*multiple of batch"),
    (dict(batch=0), "INVALID_SIZE.*batch is 0"),
    (dict(m_s_dtype=5), "INVALID_DTYPE.*m_s has dtype 5"),
    (dict(step=50), "INVALID_STEP.*step 50"),
    (dict(x="+2"), "MISALIGNED.*x \\("),
])
def test_c_abi_errors_raise_clear_exceptions(host_lib, over, match):
    c = make_case((2, 4, 8, 8), torch.float32, "cpu")
    x_out = torch.empty_like(c["x"])
    if over.get("x") == "+2":
        over = dict(x=c["x"].data_ptr() + 2)
    with pytest.raises(InputError, match=match):
        host_lib.call("plain_update", _plain_params(c, x_out, **over))


def test_c_abi_null_params_and_good_call(host_lib):
    c = make_case((2, 4, 8, 8), torch.float32, "cpu")
    x_out = poisoned(c["x"].shape, torch.float32, "cpu")
    host_lib.call("plain_update", _plain_params(c, x_out))
    assert torch.isfinite(x_out).all()
    status = host_lib._lib.distpp_plain_update(None, None)
    assert status == 1 and b"params is NULL" in host_lib._lib.distpp_last_error_message()


def test_python_layer_rejects_bad_tensors_first(host_lib):
    c = make_case((2, 4, 8, 8), torch.float32, "cpu")
    with pytest.raises(InputError, match="lam must be"):
        host_lib.guided_update(c["x"], c["m_s"], c["n"], c["m_t"], None, c["coef"], c["gcoef"], c["lam"][:1],
                               c["cfg"], c["k"], torch.empty_like(c["x"]), None)
    with pytest.raises(InputError, match="takes cpu tensors"):
        host_lib.plain_update(c["x"].to("meta"), c["m_s"].to("meta"), None, c["coef"].to("meta"), c["k"],
                              c["x"].to("meta"), None)


def test_missing_library_is_backend_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv(csrc_ops.ENV_VAR, str(tmp_path / "nope.so"))
    assert csrc_ops.candidate_paths() == [str(tmp_path / "nope.so")]
    with pytest.raises(BackendUnavailableError, match="DISTPP_KERNELS_LIB"):
        csrc_ops.load()
    (tmp_path / "bad.so").write_bytes(b"not a library")
    with pytest.raises(BackendUnavailableError, match="cannot load"):
        csrc_ops.KernelLibrary(str(tmp_path / "bad.so"))


def test_host_build_refused_for_kernel_impl_cuda(host_lib, monkeypatch):
    monkeypatch.setenv(csrc_ops.ENV_VAR, host_lib.path)
    with pytest.raises(BackendUnavailableError, match="host build"):
        csrc_ops.fused_ops()


def test_params_structs_match_the_header():
    """The ctypes structs list the C structs' fields in order (a reordering would corrupt every call)."""
    header = (CSRC / "distpp_kernels.h").read_text()
    for op, params in (("student_update", csrc_ops.StudentUpdateParams), ("guided_update", csrc_ops.GuidedUpdateParams),
                       ("plain_update", csrc_ops.PlainUpdateParams)):
        body = header.split(f"typedef struct distpp_{op}_params {{")[1].split("}")[0]
        names = [line.split(";")[0].split()[-1].lstrip("*") for line in body.splitlines() if ";" in line]
        assert names == [f[0] for f in params._fields_], op
    assert f"#define DISTPP_ABI_VERSION {csrc_ops.ABI_VERSION}" in header
    # header, pointers, int64 sizes, int32 dtypes/flags (plain: 3, padded to 8)
    assert ctypes.sizeof(csrc_ops.StudentUpdateParams) == 8 + 6 * 8 + 6 * 8 + 2 * 4
    assert ctypes.sizeof(csrc_ops.GuidedUpdateParams) == 8 + 11 * 8 + 6 * 8 + 4 * 4
    assert ctypes.sizeof(csrc_ops.PlainUpdateParams) == 8 + 6 * 8 + 4 * 8 + 3 * 4 + 4


# ---- issue 13, item 12: sizes, missing noise, struct versions, the sanitizer build ------------------
INT64_MAX = 2**63 - 1


def _student_params(c, out, **over):
    x = c["x"]
    fields = dict(x=x.data_ptr(), m_s=c["m_s"].data_ptr(), n=c["n"].data_ptr(), coef=c["coef"].data_ptr(),
                  gcoef=c["gcoef"].data_ptr(), out=out.data_ptr(), batch=x.shape[0], numel=x.numel(),
                  num_steps=c["coef"].shape[0], num_guided=c["gcoef"].shape[0], step=c["k"], m_s_dtype=0,
                  out_dtype=0)
    fields.update(over)
    return csrc_ops.StudentUpdateParams(**fields)


def _guided_params(c, x_out, **over):
    x = c["x"]
    fields = dict(x=x.data_ptr(), m_s=c["m_s"].data_ptr(), n=c["n"].data_ptr(), m_t=c["m_t"].data_ptr(), z=None,
                  coef=c["coef"].data_ptr(), gcoef=c["gcoef"].data_ptr(), lam=c["lam"].data_ptr(),
                  cfg=c["cfg"].data_ptr(), x_out=x_out.data_ptr(), xin_out=None, batch=x.shape[0],
                  numel=x.numel(), num_steps=c["coef"].shape[0], num_guided=c["gcoef"].shape[0], step=c["k"],
                  m_s_dtype=0, m_t_dtype=0, xin_dtype=0)
    fields.update(over)
    return csrc_ops.GuidedUpdateParams(**fields)


_MAKERS = {"plain_update": _plain_params, "student_update": _student_params, "guided_update": _guided_params}


def _refused_in_a_child(lib, op, params, exc, match) -> int:
    """Call ``op`` in a forked child (an unchecked size crashes it); 0 when it raised ``exc`` matching."""
    import os
    import re
    import traceback

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            lib.call(op, params)
            print(f"{op} returned success", flush=True)
        except exc as e:
            code = 0 if re.search(match, str(e)) else 1
            if code:
                print(f"{op}: {e!r} does not match {match!r}", flush=True)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("op,over", [
    ("plain_update", dict(numel=INT64_MAX - 1)),
    ("student_update", dict(batch=1, numel=INT64_MAX)),
    ("guided_update", dict(batch=1, numel=2**61)),
    ("plain_update", dict(num_steps=INT64_MAX, step=INT64_MAX // 4)),
], ids=["plain-numel", "student-numel", "guided-2numel-bytes", "plain-coef-rows"])
def test_overflowing_sizes_are_refused_not_crashed(host_lib, op, over):
    c = make_case((2, 4, 8, 8), torch.float32, "cpu")
    out = torch.empty((2 * c["x"].shape[0],) + tuple(c["x"].shape[1:]))
    code = _refused_in_a_child(host_lib, op, _MAKERS[op](c, out, **over), InputError, "INVALID_SIZE")
    assert code == 0, f"the child exited with {code} (negative: killed by that signal)"


@pytest.mark.parametrize("op", ["plain_update", "guided_update"])
def test_missing_noise_on_a_noisy_step_is_refused(host_lib, op):
    c = make_case((2, 4, 8, 8), torch.float32, "cpu", with_z=True)
    x_out = torch.empty_like(c["x"])
    with pytest.raises(InputError, match="NULL_POINTER.*z is NULL.*draws_noise"):
        host_lib.call(op, _MAKERS[op](c, x_out, z=None, draws_noise=1))
    with pytest.raises(InputError, match="z is set.*draws_noise is 0"):
        host_lib.call(op, _MAKERS[op](c, x_out, z=c["z"].data_ptr(), draws_noise=0))
    with pytest.raises(InputError, match="draws_noise is 2"):
        host_lib.call(op, _MAKERS[op](c, x_out, z=c["z"].data_ptr(), draws_noise=2))
    host_lib.call(op, _MAKERS[op](c, x_out, z=c["z"].data_ptr(), draws_noise=1))


@pytest.mark.parametrize("op", list(_MAKERS))
def test_params_struct_of_another_abi_is_refused(host_lib, op):
    c = make_case((2, 4, 8, 8), torch.float32, "cpu")
    out = torch.empty((4, 4, 8, 8))
    p = _MAKERS[op](c, out)
    assert p.struct_size == ctypes.sizeof(p) and p.abi_version == csrc_ops.ABI_VERSION  # filled by the binding
    host_lib.call(op, p)
    for field, value in (("struct_size", ctypes.sizeof(p) - 8), ("abi_version", 1)):
        bad = _MAKERS[op](c, out, **{field: value})
        with pytest.raises(BackendUnavailableError, match=f"ABI_MISMATCH.*{field}"):
            host_lib.call(op, bad)


@pytest.mark.parametrize("op", ["student_update", "guided_update"])
def test_teacher_rows_other_than_the_cfg_pair_are_refused(host_lib, op):
    c = make_case((2, 4, 8, 8), torch.float32, "cpu")
    out = torch.empty((4, 4, 8, 8))
    assert _MAKERS[op](c, out).teacher_rows == 4
    with pytest.raises(InputError, match="INVALID_SIZE.*teacher_rows is 2"):
        host_lib.call(op, _MAKERS[op](c, out, teacher_rows=2))


def test_ci_runs_the_sanitized_host_tests():
    """CI builds the host library and its ctest suite with ASan + UBSan (DISTPP_SANITIZE) and runs it."""
    root = CSRC.parent
    ci = (root / ".ci" / "run").read_text()
    assert "-DDISTPP_SANITIZE=ON" in ci and "ctest --test-dir build/sanitize" in ci
    cmake = (root / "CMakeLists.txt").read_text()
    assert 'option(DISTPP_SANITIZE' in cmake and "-fsanitize=address,undefined" in cmake


def test_host_ops_take_channels_last_unet_predictions(host_lib, tiny_pair):
    """A sampler over channels_last tiny UNets (non-contiguous predictions) with the C library's ops gives
    the contiguous-model result (issue 13 item 8; the Triton and torch twins are in test_channels_last.py)."""
    from distpp import Sampler, SamplerConfig
    from distpp.ops import FusedOps
    from helpers import channels_last_pair, rel_err

    cond, uncond = tiny_pair.random_cond(2, seed=11)
    cfg = SamplerConfig(family="euler_a", steps=3, guided_steps=1, lam=0.3, cfg=5.0, kernel_impl="torch")
    kw = dict(uncond=uncond, latent_shape=(4, 8, 8), seeds=[7, 8])
    ref = Sampler(tiny_pair.student, tiny_pair.teacher, cfg).sample(cond, **kw)
    s = Sampler(*channels_last_pair(tiny_pair), cfg)
    s.ops = FusedOps("cuda-host", host_lib.student_update, host_lib.guided_update, host_lib.plain_update)
    assert rel_err(s.sample(cond, **kw), ref) <= 1e-5
