#pragma once

#include <cstdint>

namespace lmk {

// y[n] = x[n] / rms(x[n]) * w for N rows of D (y may be x).
void rms_rows(const float* x, const float* w, float* y, int64_t N, int64_t D, float eps);
// y = silu(gate) * up over n values (y may be gate).
void silu_mul_rows(const float* gate, const float* up, float* y, int64_t n);
// Rotary embedding of x [N, H, D] by cos/sin [N, D] (halves: x1 cos - x2 sin, x2 cos + x1 sin); y may be x.
void rotate_rows(const float* x, const float* cos, const float* sin, float* y, int64_t N, int64_t H, int64_t D);

}  // namespace lmk
