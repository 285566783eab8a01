// Argument checks of the C ABI entry points, shared by the CUDA and the host library. Each returns
// DISTPP_SUCCESS or an error status after recording a message for distpp_last_error_message().
#ifndef DISTPP_ABI_CHECKS_H_
#define DISTPP_ABI_CHECKS_H_

#include <stdint.h>

#include "distpp_kernels.h"

namespace distpp {

// Records `message` (printf-style) as this thread's last error; returns `status`.
int fail(int status, const char* fmt, ...);
// Clears this thread's last error; returns DISTPP_SUCCESS.
int ok();

inline bool valid_dtype(int32_t d) { return d == DISTPP_FLOAT32 || d == DISTPP_FLOAT16 || d == DISTPP_BFLOAT16; }
inline int64_t dtype_size(int32_t d) { return d == DISTPP_FLOAT32 ? 4 : 2; }

// Size limits of one call, the same in both libraries. The CUDA grid is (blocks per sample, B): B on
// gridDim.y (at most 65535) and at most 2^31 - 1 blocks of kBlockThreads elements on x (the scalar path).
constexpr int64_t kBlockThreads = 256;
constexpr int64_t kMaxBatch = 65535;
constexpr int64_t kMaxPer = (((int64_t)1 << 31) - 1) * kBlockThreads;
// So numel < 2^56 and the largest latent buffer, [2B, per] float32, has a byte count (and every
// element offset, numel + i included) well inside int64.
static_assert(kMaxBatch * kMaxPer <= INT64_MAX / (2 * 4), "latent byte counts must fit in int64");

int check_student_update(const distpp_student_update_params* p);
int check_guided_update(const distpp_guided_update_params* p);
int check_plain_update(const distpp_plain_update_params* p);

// True when every non-null pointer is 16-byte aligned and per-sample rows keep that alignment for
// 8-element vectors (per % 8 == 0): the CUDA kernels then use 16-byte loads and stores.
bool vectorizable(int64_t per, const void* const* ptrs, int count);

}  // namespace distpp

#endif  // DISTPP_ABI_CHECKS_H_
