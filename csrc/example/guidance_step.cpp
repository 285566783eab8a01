// A guided Distillation++ step from C++ with libdistpp_kernels: copy this into an engine.
//
// The engine owns the model forwards (here: stand-in predictions); distpp_kernels does everything between
// them in one launch each. Build: find_package(distpp_kernels) and link distpp_kernels::distpp_kernels.
#include <cuda_runtime.h>
#include <stdio.h>

#include <vector>

#include <distpp/distpp_kernels.h>

#define CHECK_CUDA(expr)                                                               \
  do {                                                                                 \
    cudaError_t e_ = (expr);                                                           \
    if (e_ != cudaSuccess) { fprintf(stderr, "%s: %s\n", #expr, cudaGetErrorString(e_)); return 1; } \
  } while (0)
#define CHECK_DISTPP(expr)                                                                              \
  do {                                                                                                  \
    int s_ = (expr);                                                                                    \
    if (s_ != DISTPP_SUCCESS) {                                                                         \
      fprintf(stderr, "%s: %s (%s)\n", #expr, distpp_error_string(s_), distpp_last_error_message());    \
      return 1;                                                                                         \
    }                                                                                                   \
  } while (0)

int main() {
  if (distpp_abi_version() != DISTPP_ABI_VERSION) {
    fprintf(stderr, "libdistpp_kernels ABI %d, header %d: rebuild against the installed header\n",
            distpp_abi_version(), DISTPP_ABI_VERSION);
    return 1;
  }
  const int64_t B = 2, per = 4 * 64 * 64, N = B * per;  // SD1.5 latents, float32 model I/O here
  // One schedule row (step 0 of 2) and one guidance row per sample: in an engine these come from
  // distpp.schedules (Schedule.coef, the sampler's gcoef) exported once per schedule.
  const std::vector<float> coef = {1.2f, -0.3f, 0.1f, 0.9f, 0.8f, 0.0f, 0.6f, 1.0f,
                                   1.0f, -0.5f, 0.0f, 1.0f, 1.0f, 0.0f, 0.0f, 0.0f};
  const std::vector<float> gcoef = {0.7f, 0.7f, 1.4f, -1.0f, 0.7f, 0.7f, 1.4f, -1.0f};
  const std::vector<float> lam = {0.01f, 0.01f}, cfg = {7.5f, 7.5f};
  std::vector<float> host(N);
  for (int64_t i = 0; i < N; ++i) host[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;

  float *x, *m_s, *n, *z, *teacher_in, *m_t, *x_in, *d_coef, *d_gcoef, *d_lam, *d_cfg;
  CHECK_CUDA(cudaMalloc(&x, N * 4));
  CHECK_CUDA(cudaMalloc(&m_s, N * 4));
  CHECK_CUDA(cudaMalloc(&n, N * 4));
  CHECK_CUDA(cudaMalloc(&z, N * 4));
  CHECK_CUDA(cudaMalloc(&x_in, N * 4));
  CHECK_CUDA(cudaMalloc(&teacher_in, 2 * N * 4));
  CHECK_CUDA(cudaMalloc(&m_t, 2 * N * 4));
  CHECK_CUDA(cudaMalloc(&d_coef, coef.size() * 4));
  CHECK_CUDA(cudaMalloc(&d_gcoef, gcoef.size() * 4));
  CHECK_CUDA(cudaMalloc(&d_lam, B * 4));
  CHECK_CUDA(cudaMalloc(&d_cfg, B * 4));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  for (float* p : {x, m_s, n, z}) CHECK_CUDA(cudaMemcpyAsync(p, host.data(), N * 4, cudaMemcpyHostToDevice, stream));
  CHECK_CUDA(cudaMemcpyAsync(m_t, host.data(), N * 4, cudaMemcpyHostToDevice, stream));
  CHECK_CUDA(cudaMemcpyAsync(m_t + N, host.data(), N * 4, cudaMemcpyHostToDevice, stream));
  CHECK_CUDA(cudaMemcpyAsync(d_coef, coef.data(), coef.size() * 4, cudaMemcpyHostToDevice, stream));
  CHECK_CUDA(cudaMemcpyAsync(d_gcoef, gcoef.data(), gcoef.size() * 4, cudaMemcpyHostToDevice, stream));
  CHECK_CUDA(cudaMemcpyAsync(d_lam, lam.data(), B * 4, cudaMemcpyHostToDevice, stream));
  CHECK_CUDA(cudaMemcpyAsync(d_cfg, cfg.data(), B * 4, cudaMemcpyHostToDevice, stream));

  // Guided step 0: student forward -> m_s (stand-in above); re-noise into the teacher's 2B input.
  const distpp_student_update_params sp = {DISTPP_PARAMS_HEADER(distpp_student_update_params),
                                           x, m_s, n, d_coef, d_gcoef, teacher_in, B, N, 2, 1, 0, 2 * B,
                                           DISTPP_FLOAT32, DISTPP_FLOAT32};
  CHECK_DISTPP(distpp_student_update(&sp, stream));
  // Teacher forward on teacher_in -> m_t [2B] (uncond rows first); then the fused guided update in place.
  const distpp_guided_update_params gp = {DISTPP_PARAMS_HEADER(distpp_guided_update_params),
                                          x, m_s, n, m_t, z, d_coef, d_gcoef, d_lam, d_cfg, x, x_in,
                                          B, N, 2, 1, 0, 2 * B, DISTPP_FLOAT32, DISTPP_FLOAT32, DISTPP_FLOAT32,
                                          /*draws_noise=*/1};
  CHECK_DISTPP(distpp_guided_update(&gp, stream));
  // Step 1 (unguided, last): no fresh noise, no next model input.
  const distpp_plain_update_params pp = {DISTPP_PARAMS_HEADER(distpp_plain_update_params),
                                         x, m_s, nullptr, d_coef, x, nullptr, B, N, 2, 1,
                                         DISTPP_FLOAT32, DISTPP_FLOAT32, /*draws_noise=*/0};
  CHECK_DISTPP(distpp_plain_update(&pp, stream));

  std::vector<float> out(N);
  CHECK_CUDA(cudaMemcpyAsync(out.data(), x, N * 4, cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  double sum = 0;
  for (float v : out) sum += v;
  printf("distpp_kernels example: %lld latents, mean %.6f\n", (long long)N, sum / (double)N);
  for (float* p : {x, m_s, n, z, x_in, teacher_in, m_t, d_coef, d_gcoef, d_lam, d_cfg}) cudaFree(p);
  cudaStreamDestroy(stream);
  return 0;
}
