// Error reporting, version and argument checks of the C ABI (compiled into both libraries).
#include <stdarg.h>
#include <stdio.h>

#include "abi_checks.h"

namespace distpp {
namespace {

thread_local char g_message[512] = "";

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
  return DISTPP_SUCCESS;
}

int check_step(int64_t step, int64_t rows, const char* table) {
  if (rows < 1)
    return fail(DISTPP_ERROR_INVALID_SIZE, "%s has %lld rows; pass its row count (>= 1)", table, (long long)rows);
  if (step < 0 || step >= rows)
    return fail(DISTPP_ERROR_INVALID_STEP, "step %lld is outside %s's %lld rows", (long long)step, table,
                (long long)rows);
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

#define DISTPP_TRY(expr)                 \
  do {                                   \
    const int s_ = (expr);               \
    if (s_ != DISTPP_SUCCESS) return s_; \
  } while (0)

int check_student_update(const distpp_student_update_params* p) {
  if (p == nullptr) return fail(DISTPP_ERROR_NULL_POINTER, "params is NULL; pass a distpp_student_update_params");
  const Buffer bufs[] = {{"x", p->x, DISTPP_FLOAT32, true},         {"m_s", p->m_s, p->m_s_dtype, true},
                         {"n", p->n, DISTPP_FLOAT32, true},         {"coef", p->coef, DISTPP_FLOAT32, true},
                         {"gcoef", p->gcoef, DISTPP_FLOAT32, true}, {"out", p->out, p->out_dtype, true}};
  DISTPP_TRY(check_buffers(bufs, 6));
  DISTPP_TRY(check_sizes(p->batch, p->numel));
  DISTPP_TRY(check_step(p->step, p->num_steps, "coef"));
  DISTPP_TRY(check_step(p->step, p->num_guided, "gcoef"));
  return ok();
}

int check_guided_update(const distpp_guided_update_params* p) {
  if (p == nullptr) return fail(DISTPP_ERROR_NULL_POINTER, "params is NULL; pass a distpp_guided_update_params");
  const Buffer bufs[] = {{"x", p->x, DISTPP_FLOAT32, true},         {"m_s", p->m_s, p->m_s_dtype, true},
                         {"n", p->n, DISTPP_FLOAT32, true},         {"m_t", p->m_t, p->m_t_dtype, true},
                         {"z", p->z, DISTPP_FLOAT32, false},        {"coef", p->coef, DISTPP_FLOAT32, true},
                         {"gcoef", p->gcoef, DISTPP_FLOAT32, true}, {"lam", p->lam, DISTPP_FLOAT32, true},
                         {"cfg", p->cfg, DISTPP_FLOAT32, true},     {"x_out", p->x_out, DISTPP_FLOAT32, true},
                         {"xin_out", p->xin_out, p->xin_dtype, false}};
  DISTPP_TRY(check_buffers(bufs, 11));
  DISTPP_TRY(check_sizes(p->batch, p->numel));
  DISTPP_TRY(check_step(p->step, p->num_steps, "coef"));
  DISTPP_TRY(check_step(p->step, p->num_guided, "gcoef"));
  return ok();
}

int check_plain_update(const distpp_plain_update_params* p) {
  if (p == nullptr) return fail(DISTPP_ERROR_NULL_POINTER, "params is NULL; pass a distpp_plain_update_params");
  const Buffer bufs[] = {{"x", p->x, DISTPP_FLOAT32, true},       {"m_s", p->m_s, p->m_s_dtype, true},
                         {"z", p->z, DISTPP_FLOAT32, false},      {"coef", p->coef, DISTPP_FLOAT32, true},
                         {"x_out", p->x_out, DISTPP_FLOAT32, true}, {"xin_out", p->xin_out, p->xin_dtype, false}};
  DISTPP_TRY(check_buffers(bufs, 6));
  DISTPP_TRY(check_sizes(p->batch, p->numel));
  DISTPP_TRY(check_step(p->step, p->num_steps, "coef"));
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
    case DISTPP_ERROR_UNSUPPORTED: return "DISTPP_ERROR_UNSUPPORTED: not available in this build";
    default: return "DISTPP_ERROR_UNKNOWN: not a distpp_status";
  }
}

DISTPP_API const char* distpp_last_error_message(void) { return distpp::g_message; }

DISTPP_API int distpp_abi_version(void) { return DISTPP_ABI_VERSION; }

}  // extern "C"
