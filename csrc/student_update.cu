// student_update on the GPU: one launch writes both halves of a CFG teacher's batch-2B input, or the B rows
// of an embedded-guidance teacher's.
#include <cuda_runtime.h>

#include "abi_checks.h"
#include "student_update.h"
#include "vec_io.cuh"

namespace distpp {
namespace {

template <int VEC, bool CFG_PAIR>
__global__ void __launch_bounds__(kThreads) student_update_kernel(distpp_student_update_params p, int64_t per) {
  const int64_t b = blockIdx.y;
  const int64_t j = ((int64_t)blockIdx.x * kThreads + threadIdx.x) * VEC;
  if (j >= per) return;  // VEC == 8 only when per % 8 == 0, so a vector never straddles the end
  const int64_t i = b * per + j;
  const StepCoef c = load_step(p.coef, p.step);
  const GuideCoef g = load_guide(p.gcoef, p.step, p.batch, b);
  float x[VEC], m[VEC], n[VEC];
  load_vec<VEC>(p.x, DISTPP_FLOAT32, i, x);
  load_vec<VEC>(p.m_s, p.m_s_dtype, i, m);
  load_vec<VEC>(p.n, DISTPP_FLOAT32, i, n);
#pragma unroll
  for (int k = 0; k < VEC; ++k) x[k] = student_update_elem(c, g, x[k], m[k], n[k]);
  store_vec<VEC>(p.out, p.out_dtype, i, x);
  if (CFG_PAIR) store_vec<VEC>(p.out, p.out_dtype, p.numel + i, x);
}

}  // namespace
}  // namespace distpp

extern "C" DISTPP_API int distpp_student_update(const distpp_student_update_params* p, cudaStream_t stream) {
  using namespace distpp;
  const int s = check_student_update(p);
  if (s != DISTPP_SUCCESS) return s;
  const int64_t per = p->numel / p->batch;
  // The upper half of `out` starts numel elements in: aligned when the base is (per % 8 == 0).
  const void* ptrs[] = {p->x, p->m_s, p->n, p->out};
  const bool vec = vectorizable(per, ptrs, 4);
  const dim3 grid = grid_for(per, p->batch, vec ? 8 : 1);
  if (p->teacher_rows == 2 * p->batch) {  // checked: else teacher_rows == batch (embedded guidance)
    if (vec) student_update_kernel<8, true><<<grid, kThreads, 0, stream>>>(*p, per);
    else student_update_kernel<1, true><<<grid, kThreads, 0, stream>>>(*p, per);
  } else {
    if (vec) student_update_kernel<8, false><<<grid, kThreads, 0, stream>>>(*p, per);
    else student_update_kernel<1, false><<<grid, kThreads, 0, stream>>>(*p, per);
  }
  return launch_status();
}
