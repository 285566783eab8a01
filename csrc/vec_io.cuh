// Vectorized element I/O of the CUDA kernels: VEC = 8 elements per thread, as two 16-byte float4
// accesses for float32 buffers or one 16-byte uint4 for fp16/bf16 buffers; VEC = 1 is the scalar path
// taken when a pointer is not 16-byte aligned or the per-sample size is not a multiple of 8.
#ifndef DISTPP_VEC_IO_CUH_
#define DISTPP_VEC_IO_CUH_

#include "abi_checks.h"
#include "fused_math.h"

namespace distpp {

constexpr int kThreads = (int)kBlockThreads;  // grid_for's blocks stay within abi_checks.h's kMaxPer

template <int VEC>
__device__ __forceinline__ void load_vec(const void* p, int32_t dtype, int64_t i, float (&v)[VEC]) {
  if constexpr (VEC == 8) {
    if (dtype == DISTPP_FLOAT32) {
      const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
      const float4 a = q[0], b = q[1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint16_t lo = (uint16_t)(w[k] & 0xffffu), hi = (uint16_t)(w[k] >> 16);
        v[2 * k] = dtype == DISTPP_FLOAT16 ? half_to_float(lo) : bf16_to_float(lo);
        v[2 * k + 1] = dtype == DISTPP_FLOAT16 ? half_to_float(hi) : bf16_to_float(hi);
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = load_elem(p, dtype, i + k);
  }
}

template <int VEC>
__device__ __forceinline__ void store_vec(void* p, int32_t dtype, int64_t i, const float (&v)[VEC]) {
  if constexpr (VEC == 8) {
    if (dtype == DISTPP_FLOAT32) {
      float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i);
      q[0] = make_float4(v[0], v[1], v[2], v[3]);
      q[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint16_t lo = dtype == DISTPP_FLOAT16 ? float_to_half(v[2 * k]) : float_to_bf16(v[2 * k]);
        const uint16_t hi = dtype == DISTPP_FLOAT16 ? float_to_half(v[2 * k + 1]) : float_to_bf16(v[2 * k + 1]);
        w[k] = (uint32_t)lo | ((uint32_t)hi << 16);
      }
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + i) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) store_elem(p, dtype, i + k, v[k]);
  }
}

// Grid of one op: x = blocks per sample, y = sample (per-sample coefficients are then block-uniform).
inline dim3 grid_for(int64_t per, int64_t batch, int vec) {
  const int64_t per_block = (int64_t)kThreads * vec;
  return dim3((unsigned)((per + per_block - 1) / per_block), (unsigned)batch, 1);
}

// DISTPP_ERROR_CUDA with the runtime's message when the launch was refused; DISTPP_SUCCESS otherwise.
int launch_status();

}  // namespace distpp

#endif  // DISTPP_VEC_IO_CUH_
