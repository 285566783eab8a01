// Host ctest suite: the shared per-element math (through the host library's C ABI) against a double
// reference, the 16-bit conversions against known encodings, and every ABI argument check.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <random>
#include <string>
#include <vector>

#include "distpp_kernels.h"
#include "fused_math.h"

namespace {

int g_failures = 0;

#define EXPECT(cond, ...)                                              \
  do {                                                                 \
    if (!(cond)) {                                                     \
      ++g_failures;                                                    \
      fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                    \
      fprintf(stderr, "\n");                                           \
    }                                                                  \
  } while (0)

struct Rng {
  std::mt19937 gen{1234};
  std::vector<float> normal(size_t n) {
    std::normal_distribution<float> d;
    std::vector<float> v(n);
    for (auto& e : v) e = d(gen);
    return v;
  }
  std::vector<float> uniform(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& e : v) e = d(gen);
    return v;
  }
};

// 16-bit copies of a float vector (rounded like the kernels) and their exact float values.
std::vector<uint16_t> to16(const std::vector<float>& v, int dtype) {
  std::vector<uint16_t> o(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    o[i] = dtype == DISTPP_FLOAT16 ? distpp::float_to_half(v[i]) : distpp::float_to_bf16(v[i]);
  return o;
}
double value(const void* p, int dtype, size_t i) { return distpp::load_elem(p, dtype, (int64_t)i); }

double rel_err(const std::vector<double>& out, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(out[i])) return INFINITY;  // unwritten (NaN-poisoned) elements fail here
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return sqrt(num / den);
}

double tol_of(int dtype) { return dtype == DISTPP_FLOAT32 ? 2e-6 : dtype == DISTPP_FLOAT16 ? 2e-3 : 1.6e-2; }

// A buffer of `n` elements of `dtype` holding `v` (rounded), plus the same with NaN for outputs.
struct Buf {
  std::vector<float> f;
  std::vector<uint16_t> h;
  int dtype;
  Buf(const std::vector<float>& v, int dt) : f(v), dtype(dt) { if (dt != DISTPP_FLOAT32) h = to16(v, dt); }
  static Buf nan(size_t n, int dt) { return Buf(std::vector<float>(n, NAN), dt); }
  void* ptr() { return dtype == DISTPP_FLOAT32 ? (void*)f.data() : (void*)h.data(); }
  double at(size_t i) { return value(ptr(), dtype, i); }
};

void test_conversions() {
  using namespace distpp;
  EXPECT(float_to_half(1.0f) == 0x3c00, "1.0 -> %04x", float_to_half(1.0f));
  EXPECT(float_to_half(65504.0f) == 0x7bff, "max half");
  EXPECT(float_to_half(65520.0f) == 0x7c00, "65520 rounds to inf");
  EXPECT(float_to_half(5.9604644775390625e-8f) == 0x0001, "smallest subnormal");
  EXPECT(float_to_half(1.0f + 1.0f / 2048) == 0x3c00, "tie rounds to even (down)");
  EXPECT(float_to_half(1.0f + 3.0f / 2048) == 0x3c02, "tie rounds to even (up)");
  EXPECT((float_to_half(NAN) & 0x7c00) == 0x7c00 && (float_to_half(NAN) & 0x3ff) != 0, "NaN stays NaN");
  EXPECT(float_to_bf16(1.0f) == 0x3f80, "bf16 1.0");
  EXPECT(float_to_bf16(bits_float(0x3f808000u)) == 0x3f80, "bf16 tie to even (down)");
  EXPECT(float_to_bf16(bits_float(0x3f818000u)) == 0x3f82, "bf16 tie to even (up)");
  EXPECT(isnan(bf16_to_float(float_to_bf16(NAN))), "bf16 NaN");
  for (uint32_t h = 0; h < 0x7c00; ++h)  // every finite positive half round-trips
    if (float_to_half(half_to_float((uint16_t)h)) != h) { EXPECT(false, "half %04x does not round-trip", h); break; }
}

struct Case {
  int64_t B, per;
  std::vector<float> x, n, z, coef, gcoef, lam, cfg, ms, mt;
  int64_t steps = 5, guided = 3, k = 2;
  Case(int64_t B_, int64_t per_, Rng& r) : B(B_), per(per_) {
    const size_t N = (size_t)(B * per);
    x = r.normal(N); n = r.normal(N); z = r.normal(N); ms = r.normal(N); mt = r.normal(2 * N);
    coef = r.uniform((size_t)steps * 8, -0.5f, 1.5f);
    gcoef = r.uniform((size_t)(guided * B * 4), 0.1f, 1.6f);
    lam = r.uniform((size_t)B, 0.05f, 0.55f);
    cfg = r.uniform((size_t)B, 1.0f, 8.0f);
  }
  const float* row() const { return coef.data() + k * 8; }
  const float* grow(int64_t b) const { return gcoef.data() + (k * B + b) * 4; }
};

void test_ops(int64_t B, int64_t per, int dt, bool with_z) {
  Rng r;
  Case c(B, per, r);
  const size_t N = (size_t)(B * per);
  Buf ms(c.ms, dt), mt(c.mt, dt);
  const float* R = c.row();
  // float64 truth from the (rounded) inputs.
  std::vector<double> plain(N), guided(N), student(2 * N);
  for (int64_t b = 0; b < B; ++b) {
    const float* g = c.grow(b);
    for (int64_t j = 0; j < per; ++j) {
      const size_t i = (size_t)(b * per + j);
      const double x = c.x[i], m = ms.at(i), zz = with_z ? c.z[i] : 0.0;
      const double x0 = (double)R[0] * x + (double)R[1] * m, e = (double)R[2] * x + (double)R[3] * m;
      const double xs = (double)g[0] * x0 + (double)g[1] * c.n[i];
      student[i] = student[N + i] = xs;
      plain[i] = R[4] * x0 + R[5] * e + R[6] * zz;
      const double mu = mt.at(i), mc = mt.at(N + i);
      const double mT = mu + (double)c.cfg[b] * (mc - mu);
      const double x0T = (double)g[2] * xs + (double)g[3] * mT;
      const double x0g = x0 + (double)c.lam[b] * (x0T - x0);
      guided[i] = R[4] * x0g + R[5] * e + R[6] * zz;
    }
  }
  const std::string what = "B=" + std::to_string(B) + " per=" + std::to_string(per) + " dtype=" + std::to_string(dt);

  Buf xo = Buf::nan(N, DISTPP_FLOAT32), xin = Buf::nan(N, dt);
  distpp_plain_update_params pp = {DISTPP_PARAMS_HEADER(distpp_plain_update_params),
                                   c.x.data(), ms.ptr(), with_z ? c.z.data() : nullptr, c.coef.data(),
                                   xo.f.data(), xin.ptr(), B, (int64_t)N, c.steps, c.k, dt, dt, with_z};
  EXPECT(distpp_plain_update(&pp, nullptr) == DISTPP_SUCCESS, "%s", distpp_last_error_message());
  std::vector<double> o(N), oi(N), ri(N);
  for (size_t i = 0; i < N; ++i) { o[i] = xo.at(i); oi[i] = xin.at(i); ri[i] = R[7] * plain[i]; }
  EXPECT(rel_err(o, plain) <= 2e-6, "plain x_out %s: %g", what.c_str(), rel_err(o, plain));
  EXPECT(rel_err(oi, ri) <= tol_of(dt), "plain xin_out %s: %g", what.c_str(), rel_err(oi, ri));

  Buf out = Buf::nan(2 * N, dt);
  distpp_student_update_params sp = {DISTPP_PARAMS_HEADER(distpp_student_update_params),
                                     c.x.data(), ms.ptr(), c.n.data(), c.coef.data(), c.gcoef.data(), out.ptr(),
                                     B, (int64_t)N, c.steps, c.guided, c.k, 2 * B, dt, dt};
  EXPECT(distpp_student_update(&sp, nullptr) == DISTPP_SUCCESS, "%s", distpp_last_error_message());
  std::vector<double> so(2 * N);
  for (size_t i = 0; i < 2 * N; ++i) so[i] = out.at(i);
  EXPECT(rel_err(so, student) <= tol_of(dt), "student out %s: %g", what.c_str(), rel_err(so, student));

  Buf go = Buf::nan(N, DISTPP_FLOAT32), gin = Buf::nan(N, dt);
  distpp_guided_update_params gp = {DISTPP_PARAMS_HEADER(distpp_guided_update_params),
                                    c.x.data(), ms.ptr(), c.n.data(), mt.ptr(), with_z ? c.z.data() : nullptr,
                                    c.coef.data(), c.gcoef.data(), c.lam.data(), c.cfg.data(), go.f.data(),
                                    gin.ptr(), B, (int64_t)N, c.steps, c.guided, c.k, 2 * B, dt, dt, dt, with_z};
  EXPECT(distpp_guided_update(&gp, nullptr) == DISTPP_SUCCESS, "%s", distpp_last_error_message());
  for (size_t i = 0; i < N; ++i) { o[i] = go.at(i); oi[i] = gin.at(i); ri[i] = R[7] * guided[i]; }
  EXPECT(rel_err(o, guided) <= 2e-6, "guided x_out %s: %g", what.c_str(), rel_err(o, guided));
  EXPECT(rel_err(oi, ri) <= tol_of(dt), "guided xin_out %s: %g", what.c_str(), rel_err(oi, ri));
}

void expect_status(int got, int want, const char* needle, const char* what) {
  EXPECT(got == want, "%s: status %d (%s), expected %d", what, got, distpp_error_string(got), want);
  EXPECT(strstr(distpp_last_error_message(), needle) != nullptr, "%s: message '%s' lacks '%s'", what,
         distpp_last_error_message(), needle);
}

void test_argument_checks() {
  Rng r;
  Case c(2, 24, r);
  const int64_t N = 48;
  std::vector<float> xo(N), xin(N), out(2 * N);
  const distpp_plain_update_params good = {DISTPP_PARAMS_HEADER(distpp_plain_update_params),
                                           c.x.data(), c.ms.data(), nullptr, c.coef.data(), xo.data(), xin.data(),
                                           2, N, c.steps, c.k, DISTPP_FLOAT32, DISTPP_FLOAT32, 0};
  distpp_plain_update_params p = good;
  EXPECT(distpp_plain_update(&p, nullptr) == DISTPP_SUCCESS, "good params");
  EXPECT(strcmp(distpp_last_error_message(), "") == 0, "message cleared after success");

  expect_status(distpp_plain_update(nullptr, nullptr), DISTPP_ERROR_NULL_POINTER, "params is NULL", "null params");
  p = good; p.m_s = nullptr;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_NULL_POINTER, "m_s is NULL", "null m_s");
  p = good; p.x_out = nullptr;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_NULL_POINTER, "x_out is NULL", "null x_out");
  p = good; p.numel = 0;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_INVALID_SIZE, "numel is 0", "zero numel");
  p = good; p.batch = 0;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_INVALID_SIZE, "batch is 0", "zero batch");
  p = good; p.numel = 47;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_INVALID_SIZE, "multiple of batch", "mismatched numel");
  p = good; p.step = 5;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_INVALID_STEP, "step 5", "step past the table");
  p = good; p.num_steps = 0;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_INVALID_SIZE, "rows", "empty table");
  p = good; p.m_s_dtype = 7;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_INVALID_DTYPE, "m_s has dtype 7", "unknown dtype");
  p = good; p.x = reinterpret_cast<const float*>(reinterpret_cast<const char*>(c.x.data()) + 2);
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_MISALIGNED, "x (", "misaligned x");
  p = good; p.xin_out = reinterpret_cast<char*>(xin.data()) + 1; p.xin_dtype = DISTPP_FLOAT16;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_MISALIGNED, "xin_out", "misaligned half");

  const distpp_student_update_params sgood = {DISTPP_PARAMS_HEADER(distpp_student_update_params),
                                              c.x.data(), c.ms.data(), c.n.data(), c.coef.data(), c.gcoef.data(),
                                              out.data(), 2, N, c.steps, c.guided, c.k, 4, DISTPP_FLOAT32,
                                              DISTPP_FLOAT32};
  distpp_student_update_params s = sgood;
  EXPECT(distpp_student_update(&s, nullptr) == DISTPP_SUCCESS, "good student params");
  s.gcoef = nullptr;
  expect_status(distpp_student_update(&s, nullptr), DISTPP_ERROR_NULL_POINTER, "gcoef is NULL", "null gcoef");
  s = sgood; s.step = c.guided;
  expect_status(distpp_student_update(&s, nullptr), DISTPP_ERROR_INVALID_STEP, "gcoef", "step past gcoef");
  s = sgood; s.out_dtype = -1;
  expect_status(distpp_student_update(&s, nullptr), DISTPP_ERROR_INVALID_DTYPE, "out has dtype -1", "bad out dtype");

  const distpp_guided_update_params ggood = {DISTPP_PARAMS_HEADER(distpp_guided_update_params),
                                             c.x.data(), c.ms.data(), c.n.data(), c.mt.data(), nullptr, c.coef.data(),
                                             c.gcoef.data(), c.lam.data(), c.cfg.data(), xo.data(), nullptr, 2, N,
                                             c.steps, c.guided, c.k, 4, DISTPP_FLOAT32, DISTPP_FLOAT32, 99, 0};
  distpp_guided_update_params g = ggood;
  EXPECT(distpp_guided_update(&g, nullptr) == DISTPP_SUCCESS, "xin_dtype ignored when xin_out is NULL: %s",
         distpp_last_error_message());
  g.lam = nullptr;
  expect_status(distpp_guided_update(&g, nullptr), DISTPP_ERROR_NULL_POINTER, "lam is NULL", "null lam");
  g = ggood; g.m_t_dtype = 3;
  expect_status(distpp_guided_update(&g, nullptr), DISTPP_ERROR_INVALID_DTYPE, "m_t has dtype 3", "bad m_t dtype");
  g = ggood; g.batch = 70000; g.numel = 70000;
  expect_status(distpp_guided_update(&g, nullptr), DISTPP_ERROR_INVALID_SIZE, "batch is 70000", "batch too large");
  g = ggood; g.teacher_rows = 2;
  expect_status(distpp_guided_update(&g, nullptr), DISTPP_ERROR_INVALID_SIZE, "teacher_rows is 2", "reserved rows");
  g = ggood; g.draws_noise = 1;
  expect_status(distpp_guided_update(&g, nullptr), DISTPP_ERROR_NULL_POINTER, "z is NULL but draws_noise is 1",
                "noisy step without z");
  g = ggood; g.struct_size -= 8;
  expect_status(distpp_guided_update(&g, nullptr), DISTPP_ERROR_ABI_MISMATCH, "struct_size", "smaller struct");

  p = good; p.draws_noise = 1;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_NULL_POINTER, "draws_noise is 1", "plain without z");
  p = good; p.z = c.z.data();
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_INVALID_ARGUMENT, "draws_noise is 0", "z ignored");
  p = good; p.draws_noise = -1;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_INVALID_ARGUMENT, "draws_noise is -1", "bad flag");
  p = good; p.abi_version = 1;
  expect_status(distpp_plain_update(&p, nullptr), DISTPP_ERROR_ABI_MISMATCH, "abi_version is 1", "old version");
  s = sgood; s.struct_size = 0;
  expect_status(distpp_student_update(&s, nullptr), DISTPP_ERROR_ABI_MISMATCH, "struct_size is 0", "zeroed header");
  s = sgood; s.teacher_rows = 2;
  expect_status(distpp_student_update(&s, nullptr), DISTPP_ERROR_INVALID_SIZE, "teacher_rows is 2", "student rows");

  EXPECT(distpp_abi_version() == DISTPP_ABI_VERSION, "abi version");
  EXPECT(distpp_is_cuda() == 0, "host library");
  EXPECT(strncmp(distpp_error_string(DISTPP_ERROR_MISALIGNED), "DISTPP_ERROR_MISALIGNED", 23) == 0, "error string");
  EXPECT(strstr(distpp_error_string(12345), "UNKNOWN") != nullptr, "unknown status string");
  EXPECT(strstr(distpp_error_string(DISTPP_ERROR_UNSUPPORTED), "reserved") != nullptr, "7 is reserved");
  EXPECT(DISTPP_ABI_VERSION == 2, "one bump for the hardening and flow-matching changes");
}

}  // namespace

int main() {
  test_conversions();
  for (int dt : {DISTPP_FLOAT32, DISTPP_FLOAT16, DISTPP_BFLOAT16}) {
    test_ops(1, 4 * 8 * 8, dt, true);
    test_ops(3, 5 * 7, dt, false);
    test_ops(2, 4 * 33 * 35, dt, true);
  }
  test_argument_checks();
  if (g_failures) {
    fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  printf("all host checks passed\n");
  return 0;
}
