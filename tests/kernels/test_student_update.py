"""student_update: the Triton kernel (interpreted on CPU) vs the torch reference vs float64 truth."""

import pytest
import torch

from distpp.errors import InputError
from distpp.kernels import student_update as op
from op_cases import FORMS, SHAPES, TOLS, check_against, make_case, poisoned, seed_of, truth_student

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _run(fn, c, out_dtype):
    x = c["x"]
    out = poisoned((c["m_t"].shape[0],) + tuple(x.shape[1:]), out_dtype, x.device)  # the case's teacher form
    fn(x, c["m_s"], c["n"], c["coef"], c["gcoef"], c["k"], out)
    return out


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_and_float64(dtype, shape, form):
    """Both teacher forms: a CFG teacher's [2B] input (both halves written) and an embedded-guidance
    teacher's [B] one (NaN-poisoned buffers: a missed or extra row shows)."""
    c = make_case(shape, dtype, DEV, seed=seed_of(shape, dtype), form=form)
    out, ref = _run(op.student_update, c, dtype), _run(op.student_update_ref, c, dtype)
    assert out.dtype == dtype and out.shape[0] == FORMS[form] * shape[0]
    check_against(out, ref, truth_student(c), TOLS[dtype], "teacher input")


def test_embedded_form_writes_only_b_rows():
    """With a [B] teacher buffer inside a larger allocation, student_update writes B rows and nothing past."""
    c = make_case((2, 3, 5, 7), torch.float32, DEV, seed=3, form="embedded")
    for fn in (op.student_update, op.student_update_ref):
        big = poisoned((4, 3, 5, 7), torch.float32, c["x"].device)
        fn(c["x"], c["m_s"], c["n"], c["coef"], c["gcoef"], c["k"], big[:2])
        assert torch.isfinite(big[:2]).all() and torch.isnan(big[2:]).all()


def test_mixed_dtypes_fp16_student_bf16_teacher():
    c = make_case((2, 3, 5, 7), torch.float16, DEV, seed=5)
    out, ref = _run(op.student_update, c, torch.bfloat16), _run(op.student_update_ref, c, torch.bfloat16)
    check_against(out, ref, truth_student(c), TOLS[torch.bfloat16], "teacher input")


@pytest.mark.parametrize("bad,match", [
    (dict(n=lambda c: c["n"].half()), "n has dtype"),
    (dict(gcoef=lambda c: c["gcoef"][:, :1].contiguous()), "gcoef must be"),
    (dict(k=lambda c: 3), "step index 3"),
    (dict(x=lambda c: c["x"][:1]), "has shape"),
])
def test_bad_input_raises_clear_error(bad, match):
    c = make_case((2, 4, 8, 8), torch.float32, DEV)
    for name, f in bad.items():
        c[name] = f(c)
    with pytest.raises(InputError, match=match):
        _run(op.student_update, c, torch.float32)


def test_importing_distpp_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, distpp, distpp.kernels, distpp.kernels.guided_update; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
