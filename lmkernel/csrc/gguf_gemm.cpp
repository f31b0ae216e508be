// Prefill on GGUF blocks: y = x W^T for many rows of x (AVX-512 with VNNI).
//
// The decode kernels unpack a block for every four rows of x; with hundreds of rows that unpacking is
// most of the work. Here each thread repacks a tile of weight rows once, then runs every row of x
// against the tile from cache, eight rows at a time.
//
// K-quants (8-bit activations per 256): the tile interleaves 16 weight rows, one vector holding four
// codes of each, so that one `dpbusd` against four activations broadcast to every lane adds to 16
// outputs at once. A sub-block's integer sums take its scale once (`mullo`), a super-block's one float
// scaling (d of the weights, of the activations); no horizontal sums. The minimums (Q4_K, Q5_K) meet
// the integer sums of the activations of their sub-block (`dpwssd`, in pairs), and so does Q6_K's -32.
//
// Legacy types (8 + 6 bits per 32, x = d (q + r / 64)) in the same tiles: codes times q and times r,
// combined as 64 q + r, one float scaling per block of 32; each weight's offset (minimums, -8 / -16 /
// -128 of symmetric types) meets the sum of the activations of its block in float.
#include "gguf_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "gguf_simd.h"
#include "gguf_x16.h"

namespace lmk {

#if defined(LMK_K512) && defined(__AVX512VNNI__)

bool gemm_supports(int type, int64_t K) {
  switch (type) {
    case GGML_Q4_0: case GGML_Q4_1: case GGML_Q5_0: case GGML_Q5_1: case GGML_Q8_0: return K % 32 == 0;
    case GGML_Q4_K: case GGML_Q5_K: case GGML_Q6_K: return K % 256 == 0;
    default: return false;
  }
}

// The blocks of a type as the tile holds them: `UNIT` weights take one float scaling (a block of 32, a
// super-block of 256), in sub-blocks of `SUB` weights with an integer scale each (k-quants), and
// `PAIRS` 16-bit pairs of offset terms (k-quants' minimums or Q6_K's -32, against the activations' sums).
template <int TYPE> struct Layout {
  static constexpr bool legacy = TYPE != GGML_Q4_K && TYPE != GGML_Q5_K && TYPE != GGML_Q6_K;
  static constexpr int64_t UNIT = legacy ? 32 : 256;
  static constexpr int SUB = TYPE == GGML_Q6_K ? 16 : 32;
  static constexpr int NSUB = legacy ? 0 : 256 / SUB;
  static constexpr int PAIRS = legacy ? 0 : TYPE == GGML_Q6_K ? 8 : 4;
  static constexpr int64_t CHUNK = 2048 / UNIT;  // units of a tile run against every row before the next
};
static constexpr int KC = 8;  // activation rows a register block

// 16 weight rows interleaved, a vector a lane each: codes [K / 4][16 rows][4]; per unit and row, d and
// `off` (legacy types: each weight's offset, w = d code + off; Q4_K / Q5_K: -dmin, w = d sc q - dmin m);
// k-quants' scales [super-block][sub-block][16] and `pairs` [super-block][pair][16] (Q4_K / Q5_K:
// minimums m_2p, m_2p+1 against the activations' sums of 32; Q6_K: -32 sc_2p, -32 sc_2p+1 against
// their sums of 16).
template <int TYPE> struct Tile {
  using L = Layout<TYPE>;
  std::vector<uint8_t> codes;
  std::vector<int32_t> scales, pairs;
  std::vector<float> d, off;
  explicit Tile(int64_t K)
      : codes(K * 16), scales(K / 256 * L::NSUB * 16), pairs(K / 256 * L::PAIRS * 16), d(K / L::UNIT * 16),
        off(K / L::UNIT * 16) {}

  uint32_t* fours(int64_t k4) { return reinterpret_cast<uint32_t*>(codes.data()) + k4 * 16; }
};

static inline int32_t pack16(int lo, int hi) {
  return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(lo)) |
                              (static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16));
}

// Row r of the tile from its stored blocks; w null (rows past the matrix): zeros.
template <int TYPE>
static void repack_row(const uint8_t* w, int64_t K, Tile<TYPE>& t, int r, const __m512i* pick) {
  using L = Layout<TYPE>;
  alignas(64) uint32_t fours[64];
  for (int64_t u = 0; u < K / L::UNIT; ++u) {
    constexpr int64_t F = L::UNIT / 4;  // fours of weights a unit
    if (w == nullptr) {
      for (int64_t k4 = 0; k4 < F; ++k4) t.fours(u * F + k4)[r] = 0;
      for (int s = 0; s < L::NSUB; ++s) t.scales[(u * L::NSUB + s) * 16 + r] = 0;
      for (int p = 0; p < L::PAIRS; ++p) t.pairs[(u * L::PAIRS + p) * 16 + r] = 0;
      t.d[u * 16 + r] = t.off[u * 16 + r] = 0.f;
      continue;
    }
    if constexpr (L::legacy) {
      float d, off;
      __m256i codes = legacy_codes<TYPE>(w + u * Legacy<TYPE>::bytes, &d, &off);
      if (TYPE == GGML_Q8_0) {  // signed values -> unsigned codes: q + 128, offset -128 d
        codes = _mm256_xor_si256(codes, _mm256_set1_epi8(static_cast<char>(0x80)));
        off = -128.f * d;
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(fours), codes);
      t.d[u * 16 + r] = d;
      t.off[u * 16 + r] = off;
    } else {
      const uint8_t* blk = w + u * KQuant<TYPE>::bytes;
      KSpans sp;
      unpack_k512<TYPE>(blk, pick, sp);
      for (int j = 0; j < 4; ++j) _mm512_store_si512(fours + 16 * j, sp.codes[j]);
      t.d[u * 16 + r] = sp.d;
      t.off[u * 16 + r] = -sp.dmin;
      int32_t* scales = t.scales.data() + u * L::NSUB * 16 + r;
      int32_t* pairs = t.pairs.data() + u * L::PAIRS * 16 + r;
      if constexpr (TYPE == GGML_Q6_K) {
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
        for (int s = 0; s < 16; ++s) scales[16 * s] = sc[s];
        for (int p = 0; p < 8; ++p) pairs[16 * p] = pack16(-32 * sc[2 * p], -32 * sc[2 * p + 1]);
      } else {
        uint8_t sc[8], mn[8];
        k4_scales(blk + 4, sc, mn);
        for (int s = 0; s < 8; ++s) scales[16 * s] = sc[s];
        for (int p = 0; p < 4; ++p) pairs[16 * p] = pack16(mn[2 * p], mn[2 * p + 1]);
      }
    }
    for (int64_t k4 = 0; k4 < F; ++k4) t.fours(u * F + k4)[r] = fours[k4];
  }
}

static inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Sums over `n` fours of weights from k4 of the tile: acc + the codes times activations xs of each row
// (four at a time, broadcast to the 16 weight rows).
template <int CC>
static inline void dot_fours(const uint32_t* codes, const int8_t* x, int64_t K, int n, __m512i* acc) {
  for (int i = 0; i < n; ++i) {
    const __m512i w = _mm512_loadu_si512(codes + 16 * i);
    for (int c = 0; c < CC; ++c) acc[c] = _mm512_dpbusd_epi32(acc[c], w, bcast4(x + c * K + 4 * i));
  }
}

// The tile's 16 outputs for activation rows c0 .. c0 + CC over units [u0, u1): written to y (the first
// chunk) or added to it. `sums`: each row's 16-bit pairs of activation sums, `sums_row` of them a row.
template <int TYPE, int CC>
static void micro(Tile<TYPE>& t, const QuantizedActs& a, const int32_t* sums, int64_t sums_row, int64_t c0,
                  int64_t u0, int64_t u1, float* y, int64_t ldy, __mmask16 lanes) {
  using L = Layout<TYPE>;
  constexpr int F = L::UNIT / 4;
  const int64_t K = a.K, units = K / L::UNIT;
  __m512 facc[CC];
  for (int c = 0; c < CC; ++c) facc[c] = _mm512_setzero_ps();
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t k0 = u * L::UNIT;
    const __m512 dw = _mm512_loadu_ps(t.d.data() + u * 16), off = _mm512_loadu_ps(t.off.data() + u * 16);
    if constexpr (L::legacy) {
      // x = d (q + r / 64): codes times q and times r, as 64 q + r in steps of d / 64.
      __m512i tq[CC], tr[CC];
      for (int c = 0; c < CC; ++c) tq[c] = tr[c] = _mm512_setzero_si512();
      dot_fours<CC>(t.fours(k0 / 4), a.q.data() + c0 * K + k0, K, F, tq);
      dot_fours<CC>(t.fours(k0 / 4), a.r.data() + c0 * K + k0, K, F, tr);
      for (int c = 0; c < CC; ++c) {
        const float dx = a.d[(c0 + c) * units + u];
        const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(tq[c], 6), tr[c]);
        facc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, _mm512_set1_ps(dx / REST_STEPS)), facc[c]);
        facc[c] = _mm512_fmadd_ps(off, _mm512_set1_ps(a.sums32[(c0 + c) * units + u]), facc[c]);
      }
    } else {
      __m512i iacc[CC];
      for (int c = 0; c < CC; ++c) iacc[c] = _mm512_setzero_si512();
      for (int s = 0; s < L::NSUB; ++s) {  // a sub-block's sums take its scale once
        __m512i sub[CC];
        for (int c = 0; c < CC; ++c) sub[c] = _mm512_setzero_si512();
        dot_fours<CC>(t.fours((k0 + s * L::SUB) / 4), a.q.data() + c0 * K + k0 + s * L::SUB, K, L::SUB / 4, sub);
        const __m512i scale = _mm512_loadu_si512(t.scales.data() + (u * L::NSUB + s) * 16);
        for (int c = 0; c < CC; ++c) iacc[c] = _mm512_add_epi32(iacc[c], _mm512_mullo_epi32(sub[c], scale));
      }
      // Offset terms against the activations' sums: Q6_K's -32 joins the sums, minimums scale by -dmin.
      __m512i offs[CC];
      for (int c = 0; c < CC; ++c) offs[c] = TYPE == GGML_Q6_K ? iacc[c] : _mm512_setzero_si512();
      for (int p = 0; p < L::PAIRS; ++p) {
        const __m512i pr = _mm512_loadu_si512(t.pairs.data() + (u * L::PAIRS + p) * 16);
        for (int c = 0; c < CC; ++c)
          offs[c] = _mm512_dpwssd_epi32(offs[c], pr, _mm512_set1_epi32(sums[(c0 + c) * sums_row + u * L::PAIRS + p]));
      }
      for (int c = 0; c < CC; ++c) {
        const __m512 dx = _mm512_set1_ps(a.d[(c0 + c) * units + u]);
        if constexpr (TYPE == GGML_Q6_K) {
          facc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(offs[c]), _mm512_mul_ps(dw, dx), facc[c]);
        } else {
          facc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[c]), _mm512_mul_ps(dw, dx), facc[c]);
          facc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(offs[c]), _mm512_mul_ps(off, dx), facc[c]);
        }
      }
    }
  }
  for (int c = 0; c < CC; ++c) {
    float* out = y + (c0 + c) * ldy;
    if (u0 > 0) facc[c] = _mm512_add_ps(facc[c], _mm512_maskz_loadu_ps(lanes, out));
    _mm512_mask_storeu_ps(out, lanes, facc[c]);
  }
}

template <int TYPE>
static void gemm_type(const WeightRows& w, const QuantizedActs& a, float* y) {
  using L = Layout<TYPE>;
  const int64_t N = w.N, K = a.K, M = a.M, units = K / L::UNIT, tiles = (N + 15) / 16;
  // K-quants: each activation row's 16-bit pairs of sums for `pairs`: of each 32 (Q4_K / Q5_K), of each
  // 16 (Q6_K).
  const int64_t sums_row = units * L::PAIRS;
  std::vector<int32_t> sums(M * sums_row);
  for (int64_t m = 0; m < M; ++m) {
    const int16_t* q16 = L::legacy ? nullptr : a.qsums16.data() + m * (K / 16);
    for (int64_t p = 0; p < sums_row; ++p)
      sums[m * sums_row + p] = TYPE == GGML_Q6_K ? pack16(q16[2 * p], q16[2 * p + 1])
                                                 : pack16(q16[4 * p] + q16[4 * p + 1], q16[4 * p + 2] + q16[4 * p + 3]);
  }
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole region
    Tile<TYPE> t(K);
    RowReader rows_of(TYPE, w);
    __m512i pick[4];
    for (int j = 0; j < 4; ++j) pick[j] = span_scale_index<TYPE == GGML_Q6_K ? GGML_Q6_K : GGML_Q4_K>(j);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t n0 = tile * 16, rows = std::min<int64_t>(16, N - n0);
      for (int r = 0; r < 16; ++r) repack_row<TYPE>(r < rows ? rows_of.row(n0 + r) : nullptr, K, t, r, pick);
      const __mmask16 lanes = static_cast<__mmask16>((1u << rows) - 1);
      for (int64_t u0 = 0; u0 < units; u0 += L::CHUNK) {
        const int64_t u1 = std::min(units, u0 + L::CHUNK);
        int64_t c0 = 0;
        for (; c0 + KC <= M; c0 += KC) micro<TYPE, KC>(t, a, sums.data(), sums_row, c0, u0, u1, y + n0, N, lanes);
        for (; c0 < M; ++c0) micro<TYPE, 1>(t, a, sums.data(), sums_row, c0, u0, u1, y + n0, N, lanes);
      }
    }
  }
}

bool gguf_gemm(int type, const WeightRows& w, const QuantizedActs& a, float* y) {
  if (!gemm_supports(type, a.K)) return false;
  switch (type) {
    case GGML_Q4_0: gemm_type<GGML_Q4_0>(w, a, y); return true;
    case GGML_Q4_1: gemm_type<GGML_Q4_1>(w, a, y); return true;
    case GGML_Q5_0: gemm_type<GGML_Q5_0>(w, a, y); return true;
    case GGML_Q5_1: gemm_type<GGML_Q5_1>(w, a, y); return true;
    case GGML_Q8_0: gemm_type<GGML_Q8_0>(w, a, y); return true;
    case GGML_Q4_K: gemm_type<GGML_Q4_K>(w, a, y); return true;
    case GGML_Q5_K: gemm_type<GGML_Q5_K>(w, a, y); return true;
    case GGML_Q6_K: gemm_type<GGML_Q6_K>(w, a, y); return true;
    default: return false;
  }
}

#else

bool gemm_supports(int, int64_t) { return false; }
bool gguf_gemm(int, const WeightRows&, const QuantizedActs&, float*) { return false; }

#endif

}  // namespace lmk
