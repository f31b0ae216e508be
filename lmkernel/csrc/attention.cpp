// Paged decode attention: one new query per sequence against its whole cached context, read through
// the block tables in one pass; each key and value row is read once for every query head that shares it.
#include "attention.h"

#include <algorithm>
#include <vector>

#include <omp.h>

#include "simd.h"

namespace lmk {

static inline float dot(const float* a, const float* b, int64_t D, bool simd) {
  float s = 0.f;
#ifdef LMK_SIMD
  if (simd) {
    vec a0 = vzero(), a1 = vzero();
    int64_t d = 0;
    for (; d + 2 * W <= D; d += 2 * W) {
      a0 = vfma(vload(a + d), vload(b + d), a0);
      a1 = vfma(vload(a + d + W), vload(b + d + W), a1);
    }
    for (; d < D; d += W) a0 = vfma(vload(a + d), vload(b + d), a0);
    return vsum(vadd(a0, a1));
  }
#endif
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

static inline void axpy(float a, const float* x, float* y, int64_t D, bool simd) {
#ifdef LMK_SIMD
  if (simd) {
    const vec av = vset(a);
    for (int64_t d = 0; d < D; d += W) vstore(y + d, vfma(av, vload(x + d), vload(y + d)));
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

static void attend_span(const float* qb, const float* kp, const float* vp, const int64_t* table, int64_t j_begin,
                        int64_t j_end, int64_t block_size, int64_t Hkv, int64_t G, int64_t D, int64_t hkv, float sc,
                        float* o, float* mx, float* sum) {
  // The G query heads that share KV head hkv, over cached tokens [j_begin, j_end) of one sequence: each
  // key and value row of that head is read once for all G. Leaves, per head, the running maximum score,
  // the sum of exp(score - maximum) and the value rows weighted by those terms (not yet divided), so
  // that spans of one sequence can be merged (flash-decoding).
  const int64_t n = j_end - j_begin;
  const bool simd = SIMD_ON && D % W == 0;
  const float* q0 = qb + hkv * G * D;
  std::vector<float> scores(G * std::max<int64_t>(n, 1));
  // Cached token j sits in row slot(j) = table[j / block_size] * block_size + j % block_size, taken a block at a time.
  for (int64_t j = j_begin; j < j_end;) {
    const int64_t blk = j / block_size, end = std::min(j_end, (blk + 1) * block_size);
    const int64_t shift = (table[blk] - blk) * block_size;  // token j of this block is cache row j + shift
    for (; j < end; ++j) {
      const float* kh = kp + ((j + shift) * Hkv + hkv) * D;
      for (int64_t g = 0; g < G; ++g) scores[g * n + j - j_begin] = dot(q0 + g * D, kh, D, simd) * sc;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sh = scores.data() + g * n;
    float m = -INFINITY, total = 0.f;
    for (int64_t j = 0; j < n; ++j) m = sh[j] > m ? sh[j] : m;
    for (int64_t j = 0; j < n; ++j) { sh[j] = std::exp(sh[j] - m); total += sh[j]; }
    mx[g] = m;
    sum[g] = total;
  }
  for (int64_t i = 0; i < G * D; ++i) o[i] = 0.f;
  for (int64_t j = j_begin; j < j_end;) {
    const int64_t blk = j / block_size, end = std::min(j_end, (blk + 1) * block_size);
    const int64_t shift = (table[blk] - blk) * block_size;
    for (; j < end; ++j) {
      const float* vh = vp + ((j + shift) * Hkv + hkv) * D;
      for (int64_t g = 0; g < G; ++g) axpy(scores[g * n + j - j_begin], vh, o + g * D, D, simd);
    }
  }
}

void attend_all(const float* qp, const float* kp, const float* vp, const int64_t* tp, const int64_t* lp,
                       int64_t B, int64_t nb, int64_t block_size, int64_t Hq, int64_t Hkv, int64_t D, float sc,
                       int64_t window, float* op) {
  // One task per (sequence, KV head, span of the context). With fewer KV heads than twice the threads,
  // each context is cut into spans so that batch-1 decode gives every thread work while each cached row is
  // still read once; the spans' partial results are then merged. The cut depends on the sequence alone,
  // never on the batch: a row's attention is the same number whatever else the step holds (speculative
  // proposals checked as rows of one step must match plain decoding's rows bit for bit).
  const int64_t G = Hq / Hkv, pairs = B * Hkv, threads = omp_get_max_threads();
  const int64_t spans = Hkv >= 2 * threads ? 1 : (2 * threads + Hkv - 1) / Hkv;
  std::vector<float> part_o(pairs * spans * G * D), part_m(pairs * spans * G), part_l(pairs * spans * G);
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < pairs * spans; ++t) {
      const int64_t b = t / (Hkv * spans), hkv = t / spans % Hkv, c = t % spans, L = lp[b];
      const int64_t first = window > 0 && L > window ? L - window : 0, n = L - first;  // the keys this query reads
      attend_span(qp + b * Hq * D, kp, vp, tp + b * nb, first + c * n / spans, first + (c + 1) * n / spans, block_size,
                  Hkv, G, D, hkv, sc, part_o.data() + t * G * D, part_m.data() + t * G, part_l.data() + t * G);
    }
  }
  for (int64_t pr = 0; pr < pairs; ++pr) {
    const int64_t b = pr / Hkv, hkv = pr % Hkv;
    for (int64_t g = 0; g < G; ++g) {
      float m = -INFINITY, total = 0.f;
      for (int64_t c = 0; c < spans; ++c) m = std::max(m, part_m[(pr * spans + c) * G + g]);
      float* out = op + b * Hq * D + (hkv * G + g) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
      for (int64_t c = 0; c < spans; ++c) {
        const int64_t at = (pr * spans + c) * G + g;
        if (part_l[at] == 0.f) continue;  // an empty span
        const float w = std::exp(part_m[at] - m);
        total += w * part_l[at];
        for (int64_t d = 0; d < D; ++d) out[d] += w * part_o[at * D + d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) out[d] *= inv;
    }
  }
}

}  // namespace lmk

#include <torch/extension.h>

#include "checks.h"
#include "kernels.h"

namespace lmk {

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                           torch::Tensor lens, int64_t block_size, double scale, int64_t window) {
  // q [B, Hq, D]; caches [slots, Hkv, D]; tables [B, max_blocks] (int64); lens [B] (int64)
  check_tensor(q, "q", torch::kFloat32, 3);
  check_tensor(k_cache, "k_cache", torch::kFloat32, 3);
  check_tensor(v_cache, "v_cache", torch::kFloat32, 3);
  check_tensor(tables, "tables", torch::kLong, 2);
  check_tensor(lens, "lens", torch::kLong, 1);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache: expected the shape of k_cache");
  check_size(k_cache, "k_cache", 2, D);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "q: ", Hq, " heads is not a multiple of the cache's ", Hkv, " KV heads");
  check_size(tables, "tables", 0, B);
  check_size(lens, "lens", 0, B);
  check_block_tables(tables, lens, block_size, k_cache.size(0));
  TORCH_CHECK(window >= 0, "window must be 0 (the whole context) or positive, got ", window);
  auto out = torch::empty_like(q);
  attend_all(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tables.data_ptr<int64_t>(),
             lens.data_ptr<int64_t>(), B, tables.size(1), block_size, Hq, Hkv, D, static_cast<float>(scale), window,
             out.data_ptr<float>());
  return out;
}

void check_block_tables(const torch::Tensor& tables, const torch::Tensor& lens, int64_t block_size, int64_t slots) {
  TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  const int64_t B = tables.size(0), nb = tables.size(1), blocks = slots / block_size;
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= nb * block_size, "lens[", b, "] = ", lp[b], " does not fit ", nb,
                " blocks of ", block_size);
    for (int64_t i = 0; i < (lp[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tp[b * nb + i] >= 0 && tp[b * nb + i] < blocks, "tables[", b, ", ", i, "] = ", tp[b * nb + i],
                  " is not a block of the cache (", blocks, " blocks)");
  }
}

}  // namespace lmk
