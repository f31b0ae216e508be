// y = x W^T for one to four rows of x (a decode step) with W float32 / bfloat16, int8 (per-row or
// per-group scales) or packed int4, the output rows split over the threads.
#include <torch/extension.h>

#include <algorithm>

#include "checks.h"
#include "dense_rows.h"
#include "kernels.h"
#include "simd.h"

namespace lmk {

static constexpr int64_t MAX_ROWS = 4;

static torch::Tensor float_rows_of(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= MAX_ROWS, "x: expected [M, K] with 1 <= M <= 4, got ",
              x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor");
  return x.to(torch::kFloat32).contiguous();
}

torch::Tensor small_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  // x [M, K] with M <= 4, w [N, K] float32 or bfloat16 -> [M, N] in x's dtype, accumulated in float32.
  auto xf = float_rows_of(x);
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16,
              "w: expected float32 or bfloat16, got ", c10::toString(w.scalar_type()));
  check_tensor(w, "w", w.scalar_type(), 2);
  check_size(w, "w", 1, xf.size(1));
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0);
  if (bias.has_value()) check_size(*bias, "bias", 0, N);
  auto yf = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = yf.data_ptr<float>();
  const bool is_bf16 = w.scalar_type() == torch::kBFloat16;
  const void* wp = w.data_ptr();
  const int64_t chunk = 64, nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
      if (is_bf16) run_rows(M, xp, static_cast<const uint16_t*>(wp), nullptr, yp, n0, n1, K, N);
      else run_rows(M, xp, static_cast<const float*>(wp), nullptr, yp, n0, n1, K, N);
    }
  }
  if (bias.has_value()) yf.add_(bias->to(torch::kFloat32));
  return yf.to(x.scalar_type());
}

int64_t int4_chunk() { return 2 * W; }  // codes per chunk of the kernel's nibble layout

torch::Tensor pack_int4(torch::Tensor codes) {
  // codes [N, K] (values 0..15, K a multiple of 2W) -> [N, K/2] bytes; in each chunk of 2W codes,
  // byte j holds code j in its low nibble and code j + W in its high nibble.
  TORCH_CHECK(codes.dim() == 2, "codes: expected [N, K], got ", codes.sizes());
  auto c = codes.to(torch::kUInt8).contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  TORCH_CHECK(K % (2 * W) == 0, "codes: the width ", K, " is not a multiple of ", 2 * W);
  auto out = torch::empty({N, K / 2}, c.options());
  const uint8_t* cp = c.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k0 = 0; k0 < K; k0 += 2 * W)
      for (int64_t j = 0; j < W; ++j)
        op[n * K / 2 + k0 / 2 + j] = cp[n * K + k0 + j] | (cp[n * K + k0 + W + j] << 4);
  return out;
}

torch::Tensor int8_group_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales) {
  // x [M, K] (M <= 4), w int8 [N, K], scales [N, K/G] -> [M, N] float32.
  auto xf = float_rows_of(x);
  check_tensor(w, "w", torch::kChar, 2);
  check_size(w, "w", 1, xf.size(1));
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == w.size(0) && scales.size(1) > 0 && xf.size(1) % scales.size(1) == 0,
              "scales: expected [N, K/G] for w ", w.sizes(), ", got ", scales.sizes());
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0), G = K / scales.size(1);
  auto sf = scales.to(torch::kFloat32).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>(); const float* sp = sf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>(); float* yp = y.data_ptr<float>();
  const int64_t chunk = 32, nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
      switch (M) {
        case 1: int8_group_rows<1>(xp, wp, sp, yp, n0, n1, K, N, G); break;
        case 2: int8_group_rows<2>(xp, wp, sp, yp, n0, n1, K, N, G); break;
        case 3: int8_group_rows<3>(xp, wp, sp, yp, n0, n1, K, N, G); break;
        default: int8_group_rows<4>(xp, wp, sp, yp, n0, n1, K, N, G); break;
      }
    }
  }
  return y;
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  // x [M, K] (M <= 4), w int8 [N, K], scale [N] -> [M, N] float32.
  auto xf = float_rows_of(x);
  check_tensor(w, "w", torch::kChar, 2);
  check_size(w, "w", 1, xf.size(1));
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == w.size(0), "scale: expected [", w.size(0), "], got ", scale.sizes());
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0);
  auto sf = scale.to(torch::kFloat32).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>(); const float* sp = sf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>(); float* yp = y.data_ptr<float>();
  const int64_t chunk = 64, nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
      run_rows(M, xp, wp, sp, yp, n0, n1, K, N);
    }
  }
  return y;
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor mins, int64_t G) {
  // x [M, K] (M <= 4, K a multiple of G), w [N, K/2] from pack_int4, scales/mins [N, K/G] -> [M, N] float32.
  auto xf = float_rows_of(x);
  const int64_t M = xf.size(0), K = xf.size(1);
  TORCH_CHECK(G > 0 && K % G == 0 && G % (2 * W) == 0, "group size ", G, " must divide K = ", K,
              " and be a multiple of ", 2 * W);
  check_tensor(w, "w", torch::kByte, 2);
  check_size(w, "w", 1, K / 2);
  const int64_t N = w.size(0);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / G, "scales: expected [", N, ", ", K / G,
              "], got ", scales.sizes());
  TORCH_CHECK(mins.sizes() == scales.sizes(), "mins: expected the shape of scales ", scales.sizes(), ", got ", mins.sizes());
  auto sf = scales.to(torch::kFloat32).contiguous();
  auto mf = mins.to(torch::kFloat32).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>(); const float* sp = sf.data_ptr<float>(); const float* mp = mf.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>(); float* yp = y.data_ptr<float>();
  const int64_t chunk = 32, nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
      switch (M) {
        case 1: int4_rows<1>(xp, wp, sp, mp, yp, n0, n1, K, N, G); break;
        case 2: int4_rows<2>(xp, wp, sp, mp, yp, n0, n1, K, N, G); break;
        case 3: int4_rows<3>(xp, wp, sp, mp, yp, n0, n1, K, N, G); break;
        default: int4_rows<4>(xp, wp, sp, mp, yp, n0, n1, K, N, G); break;
      }
    }
  }
  return y;
}

}  // namespace lmk
