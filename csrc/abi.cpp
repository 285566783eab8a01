// Error reporting, version and argument checks of the C ABI (compiled into both libraries).
#include <stdarg.h>
#include <stdio.h>

#include "abi_checks.h"

namespace distpp {
namespace {

thread_local char g_message[512] = "";

#define DISTPP_TRY(expr)                 \
  do {                                   \
    const int s_ = (expr);               \
    if (s_ != DISTPP_SUCCESS) return s_; \
  } while (0)

struct Buffer {
  const char* name;
  const void* ptr;
  int32_t dtype;  // for the alignment check
  bool required;
};

int check_buffers(const Buffer* bufs, int count) {
  for (int i = 0; i < count; ++i) {
    if (bufs[i].ptr == nullptr) {
      if (bufs[i].required) return fail(DISTPP_ERROR_NULL_POINTER, "%s is NULL; pass a buffer", bufs[i].name);
      continue;
    }
    if (!valid_dtype(bufs[i].dtype))
      return fail(DISTPP_ERROR_INVALID_DTYPE, "%s has dtype %d; pass DISTPP_FLOAT32 (0), DISTPP_FLOAT16 (1) "
                  "or DISTPP_BFLOAT16 (2)", bufs[i].name, (int)bufs[i].dtype);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(bufs[i].ptr);
    if (addr % (uintptr_t)dtype_size(bufs[i].dtype) != 0)
      return fail(DISTPP_ERROR_MISALIGNED, "%s (%p) is not aligned to its %d-byte elements", bufs[i].name,
                  bufs[i].ptr, (int)dtype_size(bufs[i].dtype));
  }
  return DISTPP_SUCCESS;
}

int check_sizes(int64_t batch, int64_t numel) {
  if (batch < 1 || batch > kMaxBatch)
    return fail(DISTPP_ERROR_INVALID_SIZE, "batch is %lld; pass 1 <= batch <= %lld", (long long)batch,
                (long long)kMaxBatch);
  if (numel < 1 || numel % batch != 0)
    return fail(DISTPP_ERROR_INVALID_SIZE, "numel is %lld; pass a positive multiple of batch (%lld): the "
                "element count of x", (long long)numel, (long long)batch);
  if (numel / batch > kMaxPer)
    return fail(DISTPP_ERROR_INVALID_SIZE, "numel is %lld: %lld elements per sample, more than the %lld one "
                "launch covers; pass the element count of x (split larger latents)", (long long)numel,
                (long long)(numel / batch), (long long)kMaxPer);
  return DISTPP_SUCCESS;
}

// A table of `rows` rows of `row_floats` float32 values, indexed by `step` (row_floats <= 65535 * 4).
int check_table(int64_t step, int64_t rows, int64_t row_floats, const char* table) {
  if (rows < 1)
    return fail(DISTPP_ERROR_INVALID_SIZE, "%s has %lld rows; pass its row count (>= 1)", table, (long long)rows);
  if (rows > INT64_MAX / (row_floats * 4))
    return fail(DISTPP_ERROR_INVALID_SIZE, "%s has %lld rows: its byte count overflows int64; pass its row count",
                table, (long long)rows);
  if (step < 0 || step >= rows)
    return fail(DISTPP_ERROR_INVALID_STEP, "step %lld is outside %s's %lld rows", (long long)step, table,
                (long long)rows);
  return DISTPP_SUCCESS;
}

int check_teacher_rows(int64_t rows, int64_t batch) {
  if (rows != 2 * batch)
    return fail(DISTPP_ERROR_INVALID_SIZE, "teacher_rows is %lld; this version takes 2 * batch (%lld): the CFG "
                "pair, uncond rows first (batch rows, for an embedded-guidance teacher, are reserved)",
                (long long)rows, (long long)(2 * batch));
  return DISTPP_SUCCESS;
}

int check_noise(const float* z, int32_t draws_noise) {
  if (draws_noise != 0 && draws_noise != 1)
    return fail(DISTPP_ERROR_INVALID_ARGUMENT, "draws_noise is %d; pass 1 on a step that adds fresh noise (with "
                "z) or 0 on one that draws none (z = NULL)", (int)draws_noise);
  if (draws_noise == 1 && z == nullptr)
    return fail(DISTPP_ERROR_NULL_POINTER, "z is NULL but draws_noise is 1; pass the step's fresh noise");
  if (draws_noise == 0 && z != nullptr)
    return fail(DISTPP_ERROR_INVALID_ARGUMENT, "z is set but draws_noise is 0; pass z = NULL on a step that "
                "draws no noise, or draws_noise = 1");
  return DISTPP_SUCCESS;
}

// The params struct's header, checked before any other field is read.
template <class Params>
int check_header(const Params* p, const char* type) {
  if (p == nullptr) return fail(DISTPP_ERROR_NULL_POINTER, "params is NULL; pass a %s", type);
  if (p->struct_size != sizeof(Params))
    return fail(DISTPP_ERROR_ABI_MISMATCH, "params struct_size is %u but this library's %s has %u bytes (ABI "
                "version %d); rebuild against its distpp_kernels.h and fill the header with DISTPP_PARAMS_HEADER",
                (unsigned)p->struct_size, type, (unsigned)sizeof(Params), DISTPP_ABI_VERSION);
  if (p->abi_version != DISTPP_ABI_VERSION)
    return fail(DISTPP_ERROR_ABI_MISMATCH, "params abi_version is %u but this library implements ABI version %d; "
                "rebuild against its distpp_kernels.h", (unsigned)p->abi_version, DISTPP_ABI_VERSION);
  return DISTPP_SUCCESS;
}

}  // namespace

int fail(int status, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_message, sizeof(g_message), fmt, args);
  va_end(args);
  return status;
}

int ok() {
  g_message[0] = '\0';
  return DISTPP_SUCCESS;
}

bool vectorizable(int64_t per, const void* const* ptrs, int count) {
  if (per % 8 != 0) return false;
  for (int i = 0; i < count; ++i)
    if (ptrs[i] != nullptr && reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return false;
  return true;
}

int check_student_update(const distpp_student_update_params* p) {
  DISTPP_TRY(check_header(p, "distpp_student_update_params"));
  const Buffer bufs[] = {{"x", p->x, DISTPP_FLOAT32, true},         {"m_s", p->m_s, p->m_s_dtype, true},
                         {"n", p->n, DISTPP_FLOAT32, true},         {"coef", p->coef, DISTPP_FLOAT32, true},
                         {"gcoef", p->gcoef, DISTPP_FLOAT32, true}, {"out", p->out, p->out_dtype, true}};
  DISTPP_TRY(check_buffers(bufs, 6));
  DISTPP_TRY(check_sizes(p->batch, p->numel));
  DISTPP_TRY(check_teacher_rows(p->teacher_rows, p->batch));
  DISTPP_TRY(check_table(p->step, p->num_steps, DISTPP_NUM_COLS, "coef"));
  DISTPP_TRY(check_table(p->step, p->num_guided, p->batch * DISTPP_NUM_GCOLS, "gcoef"));
  return ok();
}

int check_guided_update(const distpp_guided_update_params* p) {
  DISTPP_TRY(check_header(p, "distpp_guided_update_params"));
  const Buffer bufs[] = {{"x", p->x, DISTPP_FLOAT32, true},         {"m_s", p->m_s, p->m_s_dtype, true},
                         {"n", p->n, DISTPP_FLOAT32, true},         {"m_t", p->m_t, p->m_t_dtype, true},
                         {"z", p->z, DISTPP_FLOAT32, false},        {"coef", p->coef, DISTPP_FLOAT32, true},
                         {"gcoef", p->gcoef, DISTPP_FLOAT32, true}, {"lam", p->lam, DISTPP_FLOAT32, true},
                         {"cfg", p->cfg, DISTPP_FLOAT32, true},     {"x_out", p->x_out, DISTPP_FLOAT32, true},
                         {"xin_out", p->xin_out, p->xin_dtype, false}};
  DISTPP_TRY(check_buffers(bufs, 11));
  DISTPP_TRY(check_noise(p->z, p->draws_noise));
  DISTPP_TRY(check_sizes(p->batch, p->numel));
  DISTPP_TRY(check_teacher_rows(p->teacher_rows, p->batch));
  DISTPP_TRY(check_table(p->step, p->num_steps, DISTPP_NUM_COLS, "coef"));
  DISTPP_TRY(check_table(p->step, p->num_guided, p->batch * DISTPP_NUM_GCOLS, "gcoef"));
  return ok();
}

int check_plain_update(const distpp_plain_update_params* p) {
  DISTPP_TRY(check_header(p, "distpp_plain_update_params"));
  const Buffer bufs[] = {{"x", p->x, DISTPP_FLOAT32, true},       {"m_s", p->m_s, p->m_s_dtype, true},
                         {"z", p->z, DISTPP_FLOAT32, false},      {"coef", p->coef, DISTPP_FLOAT32, true},
                         {"x_out", p->x_out, DISTPP_FLOAT32, true}, {"xin_out", p->xin_out, p->xin_dtype, false}};
  DISTPP_TRY(check_buffers(bufs, 6));
  DISTPP_TRY(check_noise(p->z, p->draws_noise));
  DISTPP_TRY(check_sizes(p->batch, p->numel));
  DISTPP_TRY(check_table(p->step, p->num_steps, DISTPP_NUM_COLS, "coef"));
  return ok();
}

}  // namespace distpp

extern "C" {

DISTPP_API const char* distpp_error_string(int status) {
  switch (status) {
    case DISTPP_SUCCESS: return "DISTPP_SUCCESS: no error";
    case DISTPP_ERROR_NULL_POINTER: return "DISTPP_ERROR_NULL_POINTER: a required pointer is NULL";
    case DISTPP_ERROR_INVALID_SIZE: return "DISTPP_ERROR_INVALID_SIZE: batch/numel/table sizes are invalid";
    case DISTPP_ERROR_INVALID_DTYPE: return "DISTPP_ERROR_INVALID_DTYPE: a dtype is not a distpp_dtype";
    case DISTPP_ERROR_MISALIGNED: return "DISTPP_ERROR_MISALIGNED: a pointer is not aligned to its element size";
    case DISTPP_ERROR_INVALID_STEP: return "DISTPP_ERROR_INVALID_STEP: step is outside the schedule tables";
    case DISTPP_ERROR_CUDA: return "DISTPP_ERROR_CUDA: the CUDA launch failed";
    case DISTPP_ERROR_UNSUPPORTED: return "DISTPP_ERROR_UNSUPPORTED: reserved (not returned by this version)";
    case DISTPP_ERROR_INVALID_ARGUMENT:
      return "DISTPP_ERROR_INVALID_ARGUMENT: a flag is invalid or contradicts a pointer";
    case DISTPP_ERROR_ABI_MISMATCH: return "DISTPP_ERROR_ABI_MISMATCH: the params struct is from another ABI version";
    default: return "DISTPP_ERROR_UNKNOWN: not a distpp_status";
  }
}

DISTPP_API const char* distpp_last_error_message(void) { return distpp::g_message; }

DISTPP_API int distpp_abi_version(void) { return DISTPP_ABI_VERSION; }

}  // extern "C"
