// student_update per element: the student's x0 re-noised to the teacher's level (kernels/student_update.py).
#ifndef DISTPP_STUDENT_UPDATE_H_
#define DISTPP_STUDENT_UPDATE_H_

#include "fused_math.h"

namespace distpp {

// x_s = a_s (P_x x + P_m m_s) + s_s n: written to rows b and B + b of a CFG teacher's input (teacher_rows
// 2B), to row b only of an embedded-guidance teacher's (teacher_rows B).
DISTPP_HD float student_update_elem(const StepCoef& c, const GuideCoef& g, float x, float m, float n) {
  return renoise(g, student_x0(c, x, m), n);
}

}  // namespace distpp

#endif  // DISTPP_STUDENT_UPDATE_H_
