// Entry points on GGUF blocks kept as stored: y = x W^T (any number of rows), rows of a table
// (embeddings), and dequantization.
#include <torch/extension.h>

#include <algorithm>

#include "checks.h"
#include "gguf_blocks.h"
#include "gguf_gemm.h"
#include "kernels.h"
#include "simd.h"

namespace lmk {

static constexpr int64_t GEMM_ROWS = 16;  // from this many rows of x on, the prefill kernel runs

static BlockInfo checked_layout(int64_t type, const torch::Tensor& w, int64_t K) {
  bool known;
  const BlockInfo info = block_info(static_cast<int>(type), &known);
  TORCH_CHECK(known, "GGML type ", type, " has no kernel");
  TORCH_CHECK(K > 0 && K % info.elements == 0, "a row of ", K, " weights is not a whole number of blocks of ",
              info.elements);
  check_tensor(w, "w", torch::kByte, 2);
  check_size(w, "w", 1, K / info.elements * info.bytes);
  return info;
}

std::vector<int64_t> gguf_block_layout(int64_t type) {
  bool known;
  const BlockInfo info = block_info(static_cast<int>(type), &known);
  if (!known) return {};
  return {info.elements, info.bytes, static_cast<int64_t>(info.family)};
}

torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t type, c10::optional<torch::Tensor> bias) {
  // x [M, K] float32, w uint8 [N, bytes of a row] -> [M, N] float32. Rows of x are quantized to 8 bits
  // per block (legacy and k-quant types). From GEMM_ROWS rows on, the prefill kernel repacks tiles of
  // weight rows once (gguf_gemm.cpp); below, each thread takes 16 weight rows at a time and runs every
  // row of x against them, four at a time, while they are in its cache.
  check_tensor(x, "x", torch::kFloat32, 2);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const BlockInfo info = checked_layout(type, w, K);
  if (bias.has_value()) {
    check_tensor(*bias, "bias", torch::kFloat32, 1);
    check_size(*bias, "bias", 0, N);
  }
  auto y = torch::empty({M, N}, x.options());
  QuantizedActs acts;
  quantize_acts(x.data_ptr<float>(), M, K, info.family, acts);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = w.size(1), chunk = 16, nchunks = (N + chunk - 1) / chunk;
  if (M >= GEMM_ROWS && gguf_gemm(static_cast<int>(type), wp, row_bytes, N, acts, yp)) {
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
      for (int64_t m0 = 0; m0 < M; m0 += 4)
        gguf_rows(static_cast<int>(type), wp, row_bytes, acts, m0, static_cast<int>(std::min<int64_t>(4, M - m0)), n0, n1,
                  yp, N);
    }
  }
  if (bias.has_value()) y.add_(*bias);
  return y;
}

torch::Tensor gguf_dequantize(torch::Tensor w, int64_t type, int64_t K) {
  // w uint8 [N, bytes of a row] -> [N, K] float32.
  checked_layout(type, w, K);
  const int64_t N = w.size(0), row_bytes = w.size(1);
  auto y = torch::empty({N, K}, torch::kFloat32);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      dequantize_rows(static_cast<int>(type), wp + n * row_bytes, row_bytes, 1, K, yp + n * K);
    }
  }
  return y;
}

torch::Tensor gguf_embedding(torch::Tensor ids, torch::Tensor w, int64_t type, int64_t K) {
  // ids int64 [T] -> the rows they name, dequantized: [T, K] float32.
  checked_layout(type, w, K);
  check_tensor(ids, "ids", torch::kLong, 1);
  const int64_t T = ids.size(0), V = w.size(0), row_bytes = w.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(ip[t] >= 0 && ip[t] < V, "ids: ", ip[t], " is outside [0, ", V, ")");
  auto y = torch::empty({T, K}, torch::kFloat32);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
#pragma omp parallel if (T >= 64)
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      dequantize_rows(static_cast<int>(type), wp + ip[t] * row_bytes, row_bytes, 1, K, yp + t * K);
    }
  }
  return y;
}

}  // namespace lmk
