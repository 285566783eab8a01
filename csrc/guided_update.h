// guided_update per element: CFG combine, teacher x0, proximal step, native update (kernels/guided_update.py).
// The teacher form: cfg_pair (teacher_rows == 2B) combines the uncond/cond predictions mu, mc with cfg; an
// embedded-guidance teacher (teacher_rows == B) gave its guided prediction mu directly (mc and cfg unused).
#ifndef DISTPP_GUIDED_UPDATE_H_
#define DISTPP_GUIDED_UPDATE_H_

#include "fused_math.h"

namespace distpp {

// m_T: the CFG combine mu + cfg (mc - mu) of a CFG pair, else the embedded-guidance prediction mu as is.
DISTPP_HD float teacher_prediction(bool cfg_pair, float cfg, float mu, float mc) {
  return cfg_pair ? mu + cfg * (mc - mu) : mu;
}

// x0' = x0 + lam (x0_T - x0), with x0_T the teacher's x0 from its guided prediction at x_s.
DISTPP_HD float proximal_x0(const GuideCoef& g, float lam, bool cfg_pair, float cfg, float x0, float n, float mu,
                            float mc) {
  const float xs = renoise(g, x0, n);
  const float m_teacher = teacher_prediction(cfg_pair, cfg, mu, mc);
  const float x0_teacher = g.tp_x * xs + g.tp_m * m_teacher;
  return x0 + lam * (x0_teacher - x0);
}

// x_next = A x0' + B e + C z (z = 0 and has_z false where the step draws no fresh noise).
DISTPP_HD float guided_update_elem(const StepCoef& c, const GuideCoef& g, float lam, bool cfg_pair, float cfg,
                                   float x, float m, float n, float mu, float mc, bool has_z, float z) {
  const float nxt = native_next(c, proximal_x0(g, lam, cfg_pair, cfg, student_x0(c, x, m), n, mu, mc),
                                student_eps(c, x, m));
  return has_z ? nxt + c.c * z : nxt;
}

}  // namespace distpp

#endif  // DISTPP_GUIDED_UPDATE_H_
