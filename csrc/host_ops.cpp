// The host library: the C ABI on host pointers, one loop over the elements calling the same per-element
// math as the CUDA kernels (fused_math.h). For tests and CPU engines; `stream` is ignored.
#include "abi_checks.h"
#include "guided_update.h"
#include "plain_update.h"
#include "student_update.h"

using namespace distpp;

extern "C" {

DISTPP_API int distpp_student_update(const distpp_student_update_params* p, cudaStream_t) {
  const int s = check_student_update(p);
  if (s != DISTPP_SUCCESS) return s;
  const int64_t per = p->numel / p->batch;
  const StepCoef c = load_step(p->coef, p->step);
  for (int64_t b = 0; b < p->batch; ++b) {
    const GuideCoef g = load_guide(p->gcoef, p->step, p->batch, b);
    for (int64_t i = b * per; i < (b + 1) * per; ++i) {
      const float xs = student_update_elem(c, g, p->x[i], load_elem(p->m_s, p->m_s_dtype, i), p->n[i]);
      store_elem(p->out, p->out_dtype, i, xs);
      store_elem(p->out, p->out_dtype, p->numel + i, xs);
    }
  }
  return DISTPP_SUCCESS;
}

DISTPP_API int distpp_guided_update(const distpp_guided_update_params* p, cudaStream_t) {
  const int s = check_guided_update(p);
  if (s != DISTPP_SUCCESS) return s;
  const int64_t per = p->numel / p->batch;
  const StepCoef c = load_step(p->coef, p->step);
  for (int64_t b = 0; b < p->batch; ++b) {
    const GuideCoef g = load_guide(p->gcoef, p->step, p->batch, b);
    const float lam = p->lam[b], cfg = p->cfg[b];
    const bool has_z = p->draws_noise != 0;  // checked: z is set exactly then
    for (int64_t i = b * per; i < (b + 1) * per; ++i) {
      const float nxt = guided_update_elem(c, g, lam, cfg, p->x[i], load_elem(p->m_s, p->m_s_dtype, i), p->n[i],
                                           load_elem(p->m_t, p->m_t_dtype, i),
                                           load_elem(p->m_t, p->m_t_dtype, p->numel + i), has_z,
                                           has_z ? p->z[i] : 0.0f);
      p->x_out[i] = nxt;
      if (p->xin_out != nullptr) store_elem(p->xin_out, p->xin_dtype, i, c.cin_next * nxt);
    }
  }
  return DISTPP_SUCCESS;
}

DISTPP_API int distpp_plain_update(const distpp_plain_update_params* p, cudaStream_t) {
  const int s = check_plain_update(p);
  if (s != DISTPP_SUCCESS) return s;
  const StepCoef c = load_step(p->coef, p->step);
  for (int64_t i = 0; i < p->numel; ++i) {
    const bool has_z = p->draws_noise != 0;  // checked: z is set exactly then
    const float nxt = plain_update_elem(c, p->x[i], load_elem(p->m_s, p->m_s_dtype, i), has_z, has_z ? p->z[i] : 0.0f);
    p->x_out[i] = nxt;
    if (p->xin_out != nullptr) store_elem(p->xin_out, p->xin_dtype, i, c.cin_next * nxt);
  }
  return DISTPP_SUCCESS;
}

DISTPP_API int distpp_is_cuda(void) { return 0; }

}  // extern "C"
