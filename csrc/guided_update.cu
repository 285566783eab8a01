// guided_update on the GPU: CFG combine, teacher x0, proximal step and native update in one launch.
#include <cuda_runtime.h>

#include "abi_checks.h"
#include "guided_update.h"
#include "vec_io.cuh"

namespace distpp {
namespace {

template <int VEC>
__global__ void __launch_bounds__(kThreads) guided_update_kernel(distpp_guided_update_params p, int64_t per) {
  const int64_t b = blockIdx.y;
  const int64_t j = ((int64_t)blockIdx.x * kThreads + threadIdx.x) * VEC;
  if (j >= per) return;
  const int64_t i = b * per + j;
  const StepCoef c = load_step(p.coef, p.step);
  const GuideCoef g = load_guide(p.gcoef, p.step, p.batch, b);
  const float lam = p.lam[b], cfg = p.cfg[b];  // read at run time: graph replays see updated values
  const bool has_z = p.draws_noise != 0;  // checked: z is set exactly then
  float x[VEC], m[VEC], n[VEC], mu[VEC], mc[VEC], z[VEC];
  load_vec<VEC>(p.x, DISTPP_FLOAT32, i, x);
  load_vec<VEC>(p.m_s, p.m_s_dtype, i, m);
  load_vec<VEC>(p.n, DISTPP_FLOAT32, i, n);
  load_vec<VEC>(p.m_t, p.m_t_dtype, i, mu);
  load_vec<VEC>(p.m_t, p.m_t_dtype, p.numel + i, mc);
  if (has_z) load_vec<VEC>(p.z, DISTPP_FLOAT32, i, z);
#pragma unroll
  for (int k = 0; k < VEC; ++k)
    x[k] = guided_update_elem(c, g, lam, cfg, x[k], m[k], n[k], mu[k], mc[k], has_z, has_z ? z[k] : 0.0f);
  store_vec<VEC>(p.x_out, DISTPP_FLOAT32, i, x);
  if (p.xin_out != nullptr) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] *= c.cin_next;
    store_vec<VEC>(p.xin_out, p.xin_dtype, i, x);
  }
}

}  // namespace
}  // namespace distpp

extern "C" DISTPP_API int distpp_guided_update(const distpp_guided_update_params* p, cudaStream_t stream) {
  using namespace distpp;
  const int s = check_guided_update(p);
  if (s != DISTPP_SUCCESS) return s;
  const int64_t per = p->numel / p->batch;
  const void* ptrs[] = {p->x, p->m_s, p->n, p->m_t, p->z, p->x_out, p->xin_out};
  if (vectorizable(per, ptrs, 7))
    guided_update_kernel<8><<<grid_for(per, p->batch, 8), kThreads, 0, stream>>>(*p, per);
  else
    guided_update_kernel<1><<<grid_for(per, p->batch, 1), kThreads, 0, stream>>>(*p, per);
  return launch_status();
}
