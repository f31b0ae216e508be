// Entry points on GGUF blocks kept as stored: y = x W^T (any number of rows), rows of a table
// (embeddings), and dequantization.
#include <torch/extension.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>

#include "checks.h"
#include "gguf_amx.h"
#include "gguf_blocks.h"
#include "gguf_gemm.h"
#include "gguf_x16.h"
#include "kernels.h"
#include "simd.h"

namespace lmk {

static constexpr int64_t GEMM_ROWS = 16;  // from this many rows of x on, the prefill kernel runs
static constexpr int64_t PACKED_GEMM_ROWS = 64;  // on packed rows, without AMX tiles

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

// The rows of w as the kernels read them: stored blocks [N, row bytes], or (packed) groups of 16 rows
// in the decode layout [N / 16, K / 256 * 16 * x16_bytes] (gguf_x16.h).
static WeightRows checked_rows(int64_t type, const torch::Tensor& w, int64_t K, bool packed, BlockInfo* info) {
  if (!packed) {
    *info = checked_layout(type, w, K);
    return {w.data_ptr<uint8_t>(), w.size(1), w.size(0), K, false};
  }
  bool known;
  *info = block_info(static_cast<int>(type), &known);
  const int64_t unit = x16_bytes(static_cast<int>(type));
  TORCH_CHECK(known && unit > 0, "GGML type ", type, " has no packed layout");
  TORCH_CHECK(K > 0 && K % 256 == 0, "a row of ", K, " weights is not a whole number of super-blocks");
  check_tensor(w, "w", torch::kByte, 2);
  check_size(w, "w", 1, K / 256 * 16 * unit);
  return {w.data_ptr<uint8_t>(), K / 256 * info->bytes, 16 * w.size(0), K, true};
}

std::vector<int64_t> gguf_block_layout(int64_t type) {
  bool known;
  const BlockInfo info = block_info(static_cast<int>(type), &known);
  if (!known) return {};
  return {info.elements, info.bytes, static_cast<int64_t>(info.family)};
}

torch::Tensor gguf_pack(torch::Tensor w, int64_t type, int64_t K) {
  // Stored blocks [N, row bytes] (N a multiple of 16) -> the decode layout of gguf_x16.h.
  checked_layout(type, w, K);
  const int64_t unit = x16_bytes(static_cast<int>(type)), N = w.size(0);
  TORCH_CHECK(unit > 0, "GGML type ", type, " has no packed layout");
  TORCH_CHECK(N % 16 == 0, "w: ", N, " rows do not fill groups of 16");
  auto out = torch::empty({N / 16, K / 256 * 16 * unit}, w.options());
  {  // the stored rows' pages (usually the mapped file) faulted in as one batch, not one fault a page
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t start = reinterpret_cast<uintptr_t>(w.data_ptr()) & ~(page - 1);
    madvise(reinterpret_cast<void*>(start), reinterpret_cast<uintptr_t>(w.data_ptr()) + w.nbytes() - start, MADV_POPULATE_READ);
  }
  {  // huge pages where the OS lends them: a tenth of the page faults of filling ~1 GB at load
    const uintptr_t huge = 2u << 20, start = reinterpret_cast<uintptr_t>(out.data_ptr()), end = start + out.nbytes();
    const uintptr_t first = (start + huge - 1) & ~(huge - 1), last = end & ~(huge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
  x16_pack(static_cast<int>(type), w.data_ptr<uint8_t>(), w.size(1), N, K, out.data_ptr<uint8_t>());
  return out;
}

// Decode rows (M < AMX_ROWS or no tiles) of packed weights: each thread takes groups of 16 rows.
static void packed_rows(int type, const WeightRows& w, const QuantizedActs& acts, float* y) {
  const int64_t groups = w.N / 16, M = acts.M;
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole loop
    RowReader reader(type, w);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int rows = static_cast<int>(std::min<int64_t>(4, M - m0));
        if (x16_kernel()) {
          x16_rows(type, w.data, w.K, acts, m0, rows, g, g + 1, y, w.N);
        } else {  // no kernel for the layout in this build: the stored rows, restored
          gguf_rows(type, reader.row(16 * g), w.row_bytes, acts, m0, rows, 0, 16, y + 16 * g, w.N);
        }
      }
    }
  }
}

torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t type, c10::optional<torch::Tensor> bias, bool packed,
                          bool invariant) {
  // x [M, K] float32, w uint8 [N, bytes of a row] (or packed) -> [M, N] float32. Rows of x are quantized
  // to 8 bits per block (legacy and k-quant types). From AMX_ROWS rows on, AMX tiles run the product where
  // the CPU grants them (gguf_amx.cpp); else from GEMM_ROWS rows on, the prefill kernel repacks tiles of
  // weight rows once (gguf_gemm.cpp); below, each thread takes 16 weight rows at a time and runs every
  // row of x against them, four at a time, while they are in its cache. `invariant`: every row through that
  // last kernel, with its rest, so a row's result is the same bits whatever else is in x (--deterministic).
  check_tensor(x, "x", torch::kFloat32, 2);
  const int64_t M = x.size(0), K = x.size(1);
  BlockInfo info;
  const WeightRows rows = checked_rows(type, w, K, packed, &info);
  const int64_t N = rows.N;
  if (bias.has_value()) {
    check_tensor(*bias, "bias", torch::kFloat32, 1);
    check_size(*bias, "bias", 0, N);
  }
  auto y = torch::empty({M, N}, x.options());
  QuantizedActs acts;
  quantize_acts(x.data_ptr<float>(), M, K, info.family, acts, invariant || keeps_rest(info.family, M));
  float* yp = y.data_ptr<float>();
  const int t = static_cast<int>(type);
  // Packed rows: their own kernel below PACKED_AMX_ROWS, and without tiles below PACKED_GEMM_ROWS (the
  // prefill kernel restores every group a call, which only a prompt's rows pay back).
  if (!invariant && ((M >= (packed ? PACKED_AMX_ROWS : AMX_ROWS) && amx_gemm(t, rows, acts, yp)) ||
                     (M >= (packed ? PACKED_GEMM_ROWS : GEMM_ROWS) && gguf_gemm(t, rows, acts, yp)))) {
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
  if (packed) {
    packed_rows(t, rows, acts, yp);
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
  const uint8_t* wp = rows.data;
  const int64_t row_bytes = rows.row_bytes, chunk = 16, nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
      for (int64_t m0 = 0; m0 < M; m0 += 4)
        gguf_rows(t, wp, row_bytes, acts, m0, static_cast<int>(std::min<int64_t>(4, M - m0)), n0, n1, yp, N);
    }
  }
  if (bias.has_value()) y.add_(*bias);
  return y;
}

torch::Tensor gguf_dequantize(torch::Tensor w, int64_t type, int64_t K, bool packed) {
  // w uint8 [N, bytes of a row] (or packed) -> [N, K] float32.
  BlockInfo info;
  const WeightRows rows = checked_rows(type, w, K, packed, &info);
  const int64_t N = rows.N;
  auto y = torch::empty({N, K}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole loop
    RowReader reader(static_cast<int>(type), rows);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      dequantize_rows(static_cast<int>(type), reader.row(n), rows.row_bytes, 1, K, yp + n * K);
    }
  }
  return y;
}

void release_pages(torch::Tensor t) {
  // The whole pages inside t's bytes handed back to the OS (MADV_PAGEOUT: clean file pages are dropped and
  // read again on the next touch; anonymous ones are kept where there is no swap). Used on the mapped
  // file's blocks once a packed copy replaces them, so the file's pages do not count twice.
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr()), end = start + t.nbytes();
  const uintptr_t first = (start + page - 1) & ~(page - 1), last = end & ~(page - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_PAGEOUT);
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
