// plain_update per element: the student's native update on an unguided step (kernels/plain_update.py).
#ifndef DISTPP_PLAIN_UPDATE_H_
#define DISTPP_PLAIN_UPDATE_H_

#include "fused_math.h"

namespace distpp {

// x_next = A x0 + B e + C z (z = 0 and has_z false where the step draws no fresh noise).
DISTPP_HD float plain_update_elem(const StepCoef& c, float x, float m, bool has_z, float z) {
  const float nxt = native_next(c, student_x0(c, x, m), student_eps(c, x, m));
  return has_z ? nxt + c.c * z : nxt;
}

}  // namespace distpp

#endif  // DISTPP_PLAIN_UPDATE_H_
