/* distpp_kernels: the fused per-step ops of the Distillation++ sampler behind a C ABI.
 *
 * Three ops, the same math as distpp.kernels (docs/ARCHITECTURE.md, "Fused-op convention"):
 *   distpp_student_update: x0 = P_x x + P_m m_s; x_s = a_s[b] x0 + s_s[b] n; out[b] = out[B + b] = x_s
 *   distpp_guided_update:  teacher CFG combine, teacher x0, proximal step, the student's native update
 *   distpp_plain_update:   the student's native update (unguided steps)
 * All latent buffers are contiguous [B, per-sample] arrays; arithmetic is float32. The schedule tables
 * (coef [num_steps, 8], gcoef [num_guided, B, 4]) and lam/cfg ([B]) are read from device memory at run
 * time, so a CUDA graph captured around these calls stays valid when lam or cfg change; `step` is a host
 * integer (baked into a captured launch).
 *
 * Every entry point checks its arguments first and returns a distpp_status; it never aborts the caller.
 * distpp_error_string() names a status, distpp_last_error_message() gives the detail of the calling
 * thread's last failure. The CUDA library (libdistpp_kernels) takes device pointers and enqueues one
 * kernel on `stream`; the host library (libdistpp_kernels_host) takes host pointers, ignores `stream`
 * and runs the same per-element math on the CPU (for tests and CPU engines).
 *
 * Sizes: no check can protect a buffer smaller than the caller claims, but every size whose element
 * offsets or byte counts would overflow int64 is refused (batch <= 65535, per-sample size <= 2^31 - 1
 * blocks of 256 elements, table rows whose byte counts fit), so the kernels' int64 index math is exact.
 *
 * Versioning. Every params struct begins with struct_size and abi_version; fill them with
 * DISTPP_PARAMS_HEADER(type). A library refuses any struct_size or abi_version but its own with
 * DISTPP_ERROR_ABI_MISMATCH before it reads another field, so a struct compiled against another header
 * is an error, never misread. Any change to a params struct, an enum value or a signature bumps
 * DISTPP_ABI_VERSION. Reserved field values (teacher_rows other than 2 * batch) are refused with
 * DISTPP_ERROR_INVALID_SIZE; a later version may accept them without a layout change, and a caller that
 * needs one tells an older library by that status.
 * History: 1 first release. 2: struct_size/abi_version, draws_noise (guided, plain), teacher_rows
 * (student, guided; batch rows reserved for an embedded-guidance teacher), statuses 8 and 9, and the
 * int64 size limits above; DISTPP_ERROR_UNSUPPORTED documented as reserved.
 */
#ifndef DISTPP_KERNELS_H_
#define DISTPP_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Same declaration as the CUDA runtime's, so this header needs no CUDA headers. */
typedef struct CUstream_st* cudaStream_t;

/* Bumped on any change to a params struct, an enum value or a signature (history above). */
#define DISTPP_ABI_VERSION 2

#if defined(_WIN32)
#define DISTPP_API __declspec(dllexport)
#else
#define DISTPP_API __attribute__((visibility("default")))
#endif

/* Element type of the buffers that may be reduced precision (predictions, model inputs). */
typedef enum distpp_dtype {
  DISTPP_FLOAT32 = 0,
  DISTPP_FLOAT16 = 1,
  DISTPP_BFLOAT16 = 2
} distpp_dtype;

typedef enum distpp_status {
  DISTPP_SUCCESS = 0,
  DISTPP_ERROR_NULL_POINTER = 1,  /* a required pointer (or the params struct) is NULL */
  DISTPP_ERROR_INVALID_SIZE = 2,  /* batch/numel zero, negative, inconsistent or too large */
  DISTPP_ERROR_INVALID_DTYPE = 3, /* a dtype field is not a distpp_dtype */
  DISTPP_ERROR_MISALIGNED = 4,    /* a pointer is not aligned to its element size */
  DISTPP_ERROR_INVALID_STEP = 5,  /* step outside the coef / gcoef tables */
  DISTPP_ERROR_CUDA = 6,          /* the kernel launch failed (message has the CUDA error) */
  DISTPP_ERROR_UNSUPPORTED = 7,   /* reserved: no entry point of this version returns it */
  DISTPP_ERROR_INVALID_ARGUMENT = 8, /* a flag outside its values, or one that contradicts a pointer */
  DISTPP_ERROR_ABI_MISMATCH = 9   /* struct_size / abi_version are not this library's: rebuild against it */
} distpp_status;

/* Column layout of coef rows and gcoef rows (as distpp.schedules.COL_* / GCOL_*). */
enum {
  DISTPP_COL_PX = 0, DISTPP_COL_PM, DISTPP_COL_QX, DISTPP_COL_QM,
  DISTPP_COL_A, DISTPP_COL_B, DISTPP_COL_C, DISTPP_COL_CIN_NEXT, DISTPP_NUM_COLS
};
enum { DISTPP_GCOL_A = 0, DISTPP_GCOL_S, DISTPP_GCOL_TPX, DISTPP_GCOL_TPM, DISTPP_NUM_GCOLS };

/* The first two fields of every params struct, for positional initialization:
 *   distpp_plain_update_params p = {DISTPP_PARAMS_HEADER(distpp_plain_update_params), x, m_s, ...}; */
#define DISTPP_PARAMS_HEADER(type) (uint32_t)sizeof(type), (uint32_t)DISTPP_ABI_VERSION

typedef struct distpp_student_update_params {
  uint32_t struct_size; /* sizeof(distpp_student_update_params) as the caller compiled it */
  uint32_t abi_version; /* DISTPP_ABI_VERSION of the caller's header */
  const float* x;     /* [B, per] float32 sampler state */
  const void* m_s;    /* [B, per] student prediction, m_s_dtype */
  const float* n;     /* [B, per] float32 guidance re-noise of this step */
  const float* coef;  /* [num_steps, 8] float32 schedule table */
  const float* gcoef; /* [num_guided, B, 4] float32 guidance table */
  void* out;          /* [teacher_rows, per] teacher input, out_dtype: rows b and B + b both get x_s */
  int64_t batch;      /* B: 1 <= B <= 65535 */
  int64_t numel;      /* B * per: elements of x (not of out) */
  int64_t num_steps;  /* rows of coef */
  int64_t num_guided; /* G: rows of gcoef */
  int64_t step;       /* k: 0 <= k < min(num_steps, num_guided) */
  int64_t teacher_rows; /* rows of out: 2 * B (the CFG pair); B is reserved (embedded-guidance teacher) */
  int32_t m_s_dtype;  /* distpp_dtype */
  int32_t out_dtype;  /* distpp_dtype */
} distpp_student_update_params;

typedef struct distpp_guided_update_params {
  uint32_t struct_size; /* sizeof(distpp_guided_update_params) as the caller compiled it */
  uint32_t abi_version; /* DISTPP_ABI_VERSION of the caller's header */
  const float* x;     /* [B, per] float32 sampler state */
  const void* m_s;    /* [B, per] student prediction, m_s_dtype */
  const float* n;     /* [B, per] float32 guidance re-noise (the one student_update used) */
  const void* m_t;    /* [teacher_rows, per] teacher prediction, m_t_dtype; uncond rows first */
  const float* z;     /* [B, per] float32 fresh noise of this step; NULL exactly when draws_noise is 0 */
  const float* coef;  /* [num_steps, 8] float32 */
  const float* gcoef; /* [num_guided, B, 4] float32 */
  const float* lam;   /* [B] float32 guidance strength, read at run time */
  const float* cfg;   /* [B] float32 teacher CFG scale, read at run time */
  float* x_out;       /* [B, per] float32 next state; may equal x (elementwise in place) */
  void* xin_out;      /* [B, per] next model input c_in[k+1] * x_next in xin_dtype, or NULL */
  int64_t batch;
  int64_t numel;
  int64_t num_steps;
  int64_t num_guided;
  int64_t step;
  int64_t teacher_rows; /* rows of m_t: 2 * B (the CFG pair); B is reserved (embedded-guidance teacher) */
  int32_t m_s_dtype;
  int32_t m_t_dtype;
  int32_t xin_dtype;  /* ignored when xin_out is NULL */
  int32_t draws_noise; /* 1: the step adds C * z (z required); 0: it draws none (z must be NULL). A host
                          field because the CUDA library cannot read coef's C column without a sync. */
} distpp_guided_update_params;

typedef struct distpp_plain_update_params {
  uint32_t struct_size; /* sizeof(distpp_plain_update_params) as the caller compiled it */
  uint32_t abi_version; /* DISTPP_ABI_VERSION of the caller's header */
  const float* x;    /* [B, per] float32 sampler state */
  const void* m_s;   /* [B, per] student prediction, m_s_dtype */
  const float* z;    /* [B, per] float32 fresh noise of this step; NULL exactly when draws_noise is 0 */
  const float* coef; /* [num_steps, 8] float32 */
  float* x_out;      /* [B, per] float32 next state; may equal x */
  void* xin_out;     /* [B, per] next model input in xin_dtype, or NULL (last step) */
  int64_t batch;
  int64_t numel;
  int64_t num_steps;
  int64_t step;      /* 0 <= step < num_steps */
  int32_t m_s_dtype;
  int32_t xin_dtype; /* ignored when xin_out is NULL */
  int32_t draws_noise; /* as in distpp_guided_update_params */
} distpp_plain_update_params;

DISTPP_API int distpp_student_update(const distpp_student_update_params* params, cudaStream_t stream);
DISTPP_API int distpp_guided_update(const distpp_guided_update_params* params, cudaStream_t stream);
DISTPP_API int distpp_plain_update(const distpp_plain_update_params* params, cudaStream_t stream);

/* A static name for a distpp_status ("DISTPP_ERROR_NULL_POINTER: ..."); never NULL. */
DISTPP_API const char* distpp_error_string(int status);
/* Detail of this thread's last failed call ("m_s is NULL"); "" after a success. */
DISTPP_API const char* distpp_last_error_message(void);
/* DISTPP_ABI_VERSION of the built library: compare with the header's before the first call. */
DISTPP_API int distpp_abi_version(void);
/* 1 for the CUDA library (device pointers), 0 for the host library (host pointers). */
DISTPP_API int distpp_is_cuda(void);

#ifdef __cplusplus
}
#endif

#endif /* DISTPP_KERNELS_H_ */
