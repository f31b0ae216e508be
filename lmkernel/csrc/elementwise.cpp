// Elementwise steps (RMS norm, rotary, SwiGLU): one pass over every thread where PyTorch makes four or five.
#include "elementwise.h"

#include "simd.h"

#include <algorithm>
#include <cmath>

namespace lmk {

static constexpr int64_t PARALLEL_ELEMENTS = 1 << 16;  // below this, one thread does it sooner

void rms_rows(const float* xp, const float* wp, float* yp, int64_t N, int64_t D, float eps) {
#pragma omp parallel if (N * D >= PARALLEL_ELEMENTS)
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float* xr = xp + n * D; float* yr = yp + n * D;
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) ss += xr[d] * xr[d];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * inv * wp[d];
    }
  }
}

void silu_mul_rows(const float* gate, const float* up, float* y, int64_t n) {
  constexpr int64_t chunk = 4096;
#pragma omp parallel if (n >= PARALLEL_ELEMENTS)
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n; c += chunk) {
      const int64_t end = std::min(n, c + chunk);
#pragma omp simd
      for (int64_t i = c; i < end; ++i) y[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  }
}

void rotate_rows(const float* xp, const float* cp, const float* sp, float* yp, int64_t N, int64_t H, int64_t D) {
  // x [N, H, D], cos/sin [N, D]; y may be x itself.
  const int64_t half = D / 2;
#pragma omp parallel if (N * H * D >= PARALLEL_ELEMENTS)
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t h = 0; h < H; ++h) {
        const float* xr = xp + (n * H + h) * D; float* yr = yp + (n * H + h) * D;
        const float* c = cp + n * D; const float* sn = sp + n * D;
        for (int64_t d = 0; d < half; ++d) {
          const float x1 = xr[d], x2 = xr[d + half];
          yr[d] = x1 * c[d] - x2 * sn[d];
          yr[d + half] = x2 * c[d + half] + x1 * sn[d + half];
        }
      }
    }
  }
}


}  // namespace lmk

#include <torch/extension.h>

#include "checks.h"
#include "kernels.h"
#include "simd.h"

namespace lmk {

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  // x [N, D] float32 contiguous, w [D] float32 -> x / rms(x) * w, row by row.
  check_tensor(x, "x", torch::kFloat32, 2);
  check_tensor(w, "w", torch::kFloat32, 1);
  check_size(w, "w", 0, x.size(1));
  auto y = torch::empty_like(x);
  rms_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps));
  return y;
}

torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  // silu(gate) * up, elementwise (SwiGLU), float32 contiguous of one shape.
  check_tensor(gate, "gate", torch::kFloat32, -1);
  check_tensor(up, "up", torch::kFloat32, -1);
  TORCH_CHECK(gate.sizes() == up.sizes(), "up: expected the shape of gate ", gate.sizes(), ", got ", up.sizes());
  auto y = torch::empty_like(gate);
  silu_mul_rows(gate.data_ptr<float>(), up.data_ptr<float>(), y.data_ptr<float>(), gate.numel());
  return y;
}

torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  // x [N, H, D] float32 contiguous, cos/sin [N, D] float32 -> x rotated (halves: x1 cos - x2 sin, x2 cos + x1 sin).
  check_tensor(x, "x", torch::kFloat32, 3);
  check_tensor(cos, "cos", torch::kFloat32, 2);
  check_tensor(sin, "sin", torch::kFloat32, 2);
  TORCH_CHECK(cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && sin.sizes() == cos.sizes(),
              "cos/sin: expected [", x.size(0), ", ", x.size(2), "], got ", cos.sizes(), " and ", sin.sizes());
  auto y = torch::empty_like(x);
  rotate_rows(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), y.data_ptr<float>(), x.size(0),
              x.size(1), x.size(2));
  return y;
}

}  // namespace lmk
