// Per-element building blocks of the fused ops, shared by the CUDA kernels and the host library (one
// formula, two builds: the host ctest suite and the Python host tests exercise what the GPU runs). Each
// op's own element function is in csrc/<op>.h.
#ifndef DISTPP_FUSED_MATH_H_
#define DISTPP_FUSED_MATH_H_

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "distpp_kernels.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define DISTPP_HD __host__ __device__ __forceinline__
#else
#define DISTPP_HD inline
#endif

namespace distpp {

// One row of coef (the uniform step form of docs/ARCHITECTURE.md).
struct StepCoef {
  float px, pm, qx, qm, a, b, c, cin_next;
};
// One sample's row of gcoef: teacher re-noise (a_s, s_s) and teacher x0 map (tp_x, tp_m).
struct GuideCoef {
  float a_s, s_s, tp_x, tp_m;
};

DISTPP_HD StepCoef load_step(const float* coef, int64_t k) {
  const float* r = coef + k * DISTPP_NUM_COLS;
  return StepCoef{r[DISTPP_COL_PX], r[DISTPP_COL_PM], r[DISTPP_COL_QX], r[DISTPP_COL_QM],
                  r[DISTPP_COL_A],  r[DISTPP_COL_B],  r[DISTPP_COL_C],  r[DISTPP_COL_CIN_NEXT]};
}

DISTPP_HD GuideCoef load_guide(const float* gcoef, int64_t k, int64_t batch, int64_t b) {
  const float* r = gcoef + (k * batch + b) * DISTPP_NUM_GCOLS;
  return GuideCoef{r[DISTPP_GCOL_A], r[DISTPP_GCOL_S], r[DISTPP_GCOL_TPX], r[DISTPP_GCOL_TPM]};
}

// ---- the formulas (kernels/*.py docstrings) --------------------------------------------------------
DISTPP_HD float student_x0(const StepCoef& c, float x, float m) { return c.px * x + c.pm * m; }
DISTPP_HD float student_eps(const StepCoef& c, float x, float m) { return c.qx * x + c.qm * m; }
// The family's native update without the fresh-noise term (added as c.c * z where a step draws noise).
DISTPP_HD float native_next(const StepCoef& c, float x0, float e) { return c.a * x0 + c.b * e; }
DISTPP_HD float renoise(const GuideCoef& g, float x0, float n) { return g.a_s * x0 + g.s_s * n; }

// ---- 16-bit float conversions: CUDA intrinsics on the device, bit-exact software twins on the host
// (round to nearest even, subnormals, inf and NaN kept), so host tests see the device's rounding. ----
DISTPP_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
DISTPP_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

DISTPP_HD float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    const float v = (float)mant * 5.9604644775390625e-8f;  // mant * 2^-24
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

DISTPP_HD uint16_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                                    // below 2^-14: subnormal half (or 0)
    const float v = bits_float(ax) * 16777216.0f;            // exact: |v| < 2^10
    return (uint16_t)(sign | (uint32_t)nearbyintf(v));       // default rounding mode: to nearest even
  }
  ax += 0xfffu + ((ax >> 13) & 1u);
  return (uint16_t)(sign | ((ax - 0x38000000u) >> 13));
#endif
}

DISTPP_HD float bf16_to_float(uint16_t h) { return bits_float((uint32_t)h << 16); }

DISTPP_HD uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
#endif
}

DISTPP_HD float load_elem(const void* p, int32_t dtype, int64_t i) {
  switch (dtype) {
    case DISTPP_FLOAT16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case DISTPP_BFLOAT16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

DISTPP_HD void store_elem(void* p, int32_t dtype, int64_t i, float v) {
  switch (dtype) {
    case DISTPP_FLOAT16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    case DISTPP_BFLOAT16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

}  // namespace distpp

#endif  // DISTPP_FUSED_MATH_H_
