// plain_update on the GPU: the student's native update and the next model input in one launch.
#include <cuda_runtime.h>

#include "abi_checks.h"
#include "plain_update.h"
#include "vec_io.cuh"

namespace distpp {
namespace {

template <int VEC>
__global__ void __launch_bounds__(kThreads) plain_update_kernel(distpp_plain_update_params p, int64_t per) {
  const int64_t j = ((int64_t)blockIdx.x * kThreads + threadIdx.x) * VEC;
  if (j >= per) return;
  const int64_t i = (int64_t)blockIdx.y * per + j;
  const StepCoef c = load_step(p.coef, p.step);
  const bool has_z = p.draws_noise != 0;  // checked: z is set exactly then
  float x[VEC], m[VEC], z[VEC];
  load_vec<VEC>(p.x, DISTPP_FLOAT32, i, x);
  load_vec<VEC>(p.m_s, p.m_s_dtype, i, m);
  if (has_z) load_vec<VEC>(p.z, DISTPP_FLOAT32, i, z);
#pragma unroll
  for (int k = 0; k < VEC; ++k) x[k] = plain_update_elem(c, x[k], m[k], has_z, has_z ? z[k] : 0.0f);
  store_vec<VEC>(p.x_out, DISTPP_FLOAT32, i, x);
  if (p.xin_out != nullptr) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] *= c.cin_next;
    store_vec<VEC>(p.xin_out, p.xin_dtype, i, x);
  }
}

}  // namespace
}  // namespace distpp

extern "C" DISTPP_API int distpp_plain_update(const distpp_plain_update_params* p, cudaStream_t stream) {
  using namespace distpp;
  const int s = check_plain_update(p);
  if (s != DISTPP_SUCCESS) return s;
  const int64_t per = p->numel / p->batch;
  const void* ptrs[] = {p->x, p->m_s, p->z, p->x_out, p->xin_out};
  if (vectorizable(per, ptrs, 5))
    plain_update_kernel<8><<<grid_for(per, p->batch, 8), kThreads, 0, stream>>>(*p, per);
  else
    plain_update_kernel<1><<<grid_for(per, p->batch, 1), kThreads, 0, stream>>>(*p, per);
  return launch_status();
}
