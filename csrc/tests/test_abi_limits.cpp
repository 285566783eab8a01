// ctest abi_limits: sizes whose element offsets or byte counts overflow int64 (or exceed what the CUDA grid
// can cover) are refused with DISTPP_ERROR_INVALID_SIZE before any element is touched. The buffers here
// are small on purpose: a size that slips through reads far past them. Each case runs in a forked child,
// so an unchecked size shows up as one failed case (with its signal), not as a crashed suite.
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <vector>

#include "distpp_kernels.h"

namespace {

int g_failures = 0;

void expect_refused(const char* what, const std::function<int()>& call, const char* needle) {
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  if (pid == 0) {
    const int s = call();
    const bool ok = s == DISTPP_ERROR_INVALID_SIZE && strstr(distpp_last_error_message(), needle) != nullptr;
    if (!ok)
      fprintf(stderr, "%s: status %d (%s), message '%s'; expected DISTPP_ERROR_INVALID_SIZE mentioning '%s'\n",
              what, s, distpp_error_string(s), distpp_last_error_message(), needle);
    _exit(ok ? 0 : 1);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) {
    fprintf(stderr, "%s: crashed with signal %d instead of returning DISTPP_ERROR_INVALID_SIZE\n", what,
            WTERMSIG(status));
    ++g_failures;
  } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    ++g_failures;
  }
}

}  // namespace

int main() {
  std::vector<float> buf(4096, 0.5f);
  float* f = buf.data();
  const int64_t kMax = INT64_MAX;

  const auto plain = [&](int64_t batch, int64_t numel, int64_t num_steps, int64_t step) {
    distpp_plain_update_params p{};
    p.struct_size = sizeof p; p.abi_version = DISTPP_ABI_VERSION;
    p.x = f; p.m_s = f; p.coef = f; p.x_out = f;
    p.batch = batch; p.numel = numel; p.num_steps = num_steps; p.step = step;
    p.m_s_dtype = DISTPP_FLOAT32; p.xin_dtype = DISTPP_FLOAT32;
    return distpp_plain_update(&p, nullptr);
  };
  const auto student = [&](int64_t batch, int64_t numel, int64_t num_steps, int64_t num_guided, int64_t step) {
    distpp_student_update_params p{};
    p.struct_size = sizeof p; p.abi_version = DISTPP_ABI_VERSION;
    p.x = f; p.m_s = f; p.n = f; p.coef = f; p.gcoef = f; p.out = f;
    p.batch = batch; p.numel = numel; p.num_steps = num_steps; p.num_guided = num_guided; p.step = step;
    p.teacher_rows = 2 * batch;
    p.m_s_dtype = DISTPP_FLOAT32; p.out_dtype = DISTPP_FLOAT32;
    return distpp_student_update(&p, nullptr);
  };
  const auto guided = [&](int64_t batch, int64_t numel) {
    distpp_guided_update_params p{};
    p.struct_size = sizeof p; p.abi_version = DISTPP_ABI_VERSION;
    p.x = f; p.m_s = f; p.n = f; p.m_t = f; p.coef = f; p.gcoef = f; p.lam = f; p.cfg = f; p.x_out = f;
    p.batch = batch; p.numel = numel; p.num_steps = 4; p.num_guided = 4; p.step = 0;
    p.teacher_rows = 2 * batch;
    p.m_s_dtype = DISTPP_FLOAT32; p.m_t_dtype = DISTPP_FLOAT32; p.xin_dtype = DISTPP_FLOAT32;
    return distpp_guided_update(&p, nullptr);
  };

  expect_refused("plain numel INT64_MAX - 1", [&] { return plain(2, kMax - 1, 4, 0); }, "numel");
  expect_refused("plain numel INT64_MAX", [&] { return plain(1, kMax, 4, 0); }, "numel");
  expect_refused("plain per-sample size past the CUDA grid", [&] { return plain(1, (int64_t)1 << 40, 4, 0); },
                 "numel");
  expect_refused("student numel INT64_MAX (numel + i overflows)", [&] { return student(1, kMax, 4, 4, 0); }, "numel");
  expect_refused("student 2 * numel * 4 bytes overflow", [&] { return student(1, (int64_t)1 << 61, 4, 4, 0); },
                 "numel");
  expect_refused("guided 2 * numel * 4 bytes overflow", [&] { return guided(1, (int64_t)1 << 61); }, "numel");
  expect_refused("coef rows * 8 overflow", [&] { return plain(1, 8, kMax, kMax / 4); }, "coef");
  // 2^51 coef rows are 2^56 bytes (fine), but 2^51 gcoef rows of 65535 samples are ~2^71 bytes.
  expect_refused("gcoef rows * batch * 4 overflow",
                 [&] { return student(65535, 65535, (int64_t)1 << 51, (int64_t)1 << 51, (int64_t)1 << 50); }, "gcoef");

  if (g_failures) {
    fprintf(stderr, "%d case(s) failed\n", g_failures);
    return 1;
  }
  printf("all size limits hold\n");
  return 0;
}
