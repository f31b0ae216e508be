// y = x W^T on AMX tiles for many rows of x (prefill, batched decode) on GGUF blocks as stored.
//
// A tile product `tdpbusd` / `tdpbssd` adds to a 16 x 16 int32 tile C the products of a 16 x 64
// byte tile A (here: 16 weight rows, 64 weights of K each) and a 16 x 64 byte tile B (here: the same
// 64 activations of 16 rows of x, four consecutive ones a 32-bit lane), so C[n][m] = sum_k w[n][k] x[m][k]
// in integers: 16 K multiply-adds in one instruction. What a tile cannot do is scale: every weight of
// a block shares the block's float scale, and k-quants scale each sub-block of 16 or 32 weights by
// its own 6- or 8-bit integer. So each weight row is unpacked, once per chunk of K for every tile of
// activation rows, into planes of bytes whose sum is exact:
//
//   Q4_K, Q5_K: w = d sc q - dmin m with q < 32, sc < 64: sc = 8 hi + lo (both < 8), so sc q =
//               8 (hi q) + (lo q), two planes of unsigned bytes < 256; C = 8 C_hi + C_lo over the
//               whole super-block of 256, and the minimums meet the sums of the activations of
//               each 32 (`dpwssd`) when the super-block is scaled.
//   Q6_K:       w = d sc (q - 32) with sc a signed byte: sc = d0 + 8 d1 + 64 d2 with digits in
//               [-3, 4], so each d_i (q - 32) is a signed byte; three planes (`tdpbssd`), C = C0 +
//               8 C1 + 64 C2 over the super-block.
//   legacy:     one plane of unsigned codes per block of 32 (Q8_0: its values + 128), against the
//               activations' 8 bits and their 6-bit rest (x = d (q + r / 64), as the other kernels
//               read them), scaled a block at a time; each weight's offset meets the block's sum.
//
// Activations are quantized as for the VNNI kernels (gguf_blocks.h), so both paths compute the same
// integer sums. Tile permission: asked of the kernel once (arch_prctl), then a probe product runs in
// a forked child, so a virtual machine that faults on the tile instructions costs a log line, not the
// process.
#include "gguf_amx.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "gguf_simd.h"
#include "gguf_x16.h"

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(LMK_K512) && defined(__AVX512VNNI__) && defined(__linux__)
#define LMK_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#endif

namespace lmk {

static std::atomic<bool> amx_switch{true};

void amx_enable(bool on) { amx_switch.store(on); }

#ifdef LMK_AMX

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig& tile(int t, int rows_, int colsb_) {
    rows[t] = static_cast<uint8_t>(rows_);
    colsb[t] = static_cast<uint16_t>(colsb_);
    return *this;
  }
};

// One 16 x 16 x 64 product against a scalar reference; run in a child process.
static bool probe_product() {
  alignas(64) uint8_t a[16 * 64];
  alignas(64) int8_t b[16 * 64];
  alignas(64) int32_t c[16 * 16];
  for (int i = 0; i < 16 * 64; ++i) a[i] = static_cast<uint8_t>((i * 7) % 251), b[i] = static_cast<int8_t>((i * 13) % 255 - 127);
  TileConfig cfg;
  cfg.tile(0, 16, 64).tile(1, 16, 64).tile(2, 16, 64);
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_loadd(1, a, 64);
  _tile_loadd(2, b, 64);
  _tile_dpbusd(0, 1, 2);
  _tile_stored(0, c, 64);
  _tile_release();
  for (int n = 0; n < 16; ++n)
    for (int m = 0; m < 16; ++m) {
      int32_t s = 0;
      for (int k = 0; k < 64; ++k) s += a[n * 64 + k] * b[(k / 4) * 64 + m * 4 + k % 4];
      if (s != c[n * 16 + m]) return false;
    }
  return true;
}

struct AmxState {
  bool usable;
  std::string status;
};

static AmxState decide() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 25)))
    return {false, "the CPU reports no AMX int8 tiles"};
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0)
    return {false, std::string("the kernel refused the tile data permission (arch_prctl: ") + std::strerror(errno) + ")"};
  const pid_t child = fork();
  if (child == 0) _exit(probe_product() ? 0 : 3);
  if (child < 0) return {false, "could not fork the tile probe"};
  int status = 0;
  while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status))
    return {false, "a probe tile product died with signal " + std::to_string(WTERMSIG(status))};
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return {false, "a probe tile product gave a wrong sum"};
  return {true, "granted"};
}

static const AmxState& state() {
  static const AmxState s = decide();  // once a process
  return s;
}

bool amx_usable() { return state().usable; }
std::string amx_status() { return state().status; }
bool amx_active() { return amx_switch.load() && amx_usable(); }

bool amx_supports(int type, int64_t K) {
  switch (type) {
    case GGML_Q4_0: case GGML_Q4_1: case GGML_Q5_0: case GGML_Q5_1: case GGML_Q8_0: return K % 32 == 0;
    case GGML_Q4_K: case GGML_Q5_K: case GGML_Q6_K: return K % 256 == 0;
    default: return false;
  }
}

template <int TYPE> struct Amx {
  static constexpr bool legacy = TYPE != GGML_Q4_K && TYPE != GGML_Q5_K && TYPE != GGML_Q6_K;
  static constexpr int64_t UNIT = legacy ? 32 : 256;      // weights that take one float scaling
  static constexpr int64_t TK = legacy ? 32 : 64;         // weights of K a tile product
  static constexpr int D = legacy ? 1 : TYPE == GGML_Q6_K ? 3 : 2;  // planes of bytes
  static constexpr bool MINS = TYPE == GGML_Q4_K || TYPE == GGML_Q5_K;
  static constexpr int64_t TILE = 16 * TK;                // bytes of an A tile
};
// Bytes of v (unsigned) times the 16-bit factor of their pair; every product < 256.
static inline __m512i mul_u8(__m512i v, __m512i k) {
  const __m512i low = _mm512_set1_epi16(0xFF);
  const __m512i lo = _mm512_mullo_epi16(_mm512_and_si512(v, low), k);
  const __m512i hi = _mm512_mullo_epi16(_mm512_srli_epi16(v, 8), k);
  return _mm512_or_si512(_mm512_and_si512(lo, low), _mm512_slli_epi16(hi, 8));
}
// Signed bytes of v times the 16-bit factor of their pair; every product in [-128, 127].
static inline __m512i mul_s8(__m512i v, __m512i k) {
  const __m512i lo = _mm512_mullo_epi16(_mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8), k);
  const __m512i hi = _mm512_mullo_epi16(_mm512_srai_epi16(v, 8), k);
  return _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi16(0xFF)), _mm512_slli_epi16(hi, 8));
}
static inline __m512i digit(__m512i v) {  // ((v + 3) mod 8) - 3, in [-3, 4]
  return _mm512_sub_epi16(_mm512_and_si512(_mm512_add_epi16(v, _mm512_set1_epi16(3)), _mm512_set1_epi16(7)),
                          _mm512_set1_epi16(3));
}

static inline int32_t pair16(int lo, int hi) {
  return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(lo)) |
                              (static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16));
}

// Tile loads from L2 cost twice a product's time, so each operand must serve several products: a work
// item is a pair of 16-row weight tiles (each activation tile loaded once feeds both) against a group
// of MG blocks of 16 activation rows (the pair's tiles of one unit, 8-24 KB, stay in L1 for all of them).
static constexpr int64_t MG = 4;

// Unpacked weights of a pair of tiles over all of K: planes [2][D][K / TK] tiles of 16 rows; per tile,
// unit and row the float scale d, the offset (legacy) or -dmin (Q4_K / Q5_K), and 16-bit pairs of
// minimums (Q4_K / Q5_K).
template <int TYPE> struct Unpacked {
  using L = Amx<TYPE>;
  int64_t units, tiles;
  std::vector<uint8_t> planes;
  std::vector<float> d, off;
  std::vector<int32_t> mins;
  explicit Unpacked(int64_t K)
      : units(K / L::UNIT), tiles(K / L::TK), planes(2 * L::D * tiles * L::TILE + 64), d(2 * units * 16),
        off(2 * units * 16), mins(L::MINS ? 2 * units * 64 : 0) {}
  uint8_t* plane(int g, int p, int64_t t) {
    uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(planes.data()) + 63) & ~uintptr_t{63});
    return base + ((g * L::D + p) * tiles + t) * L::TILE;
  }
};

// Row r of tile g from the stored row w (null: a row past the matrix, zeros), or (k-quants, `packed`
// not null) from row `pr` of the packed group `packed` (gguf_x16.h), read in place.
template <int TYPE>
static void unpack_row(const uint8_t* w, Unpacked<TYPE>& t, int g, int r, const __m512i* pick,
                       const uint8_t* packed = nullptr, int pr = 0) {
  using L = Amx<TYPE>;
  for (int64_t u = 0; u < t.units; ++u) {
    float* d = &t.d[(g * t.units + u) * 16 + r];
    float* off = &t.off[(g * t.units + u) * 16 + r];
    if (w == nullptr && packed == nullptr) {
      for (int p = 0; p < L::D; ++p)
        for (int64_t j = 0; j < L::UNIT / L::TK; ++j) std::memset(t.plane(g, p, u * (L::UNIT / L::TK) + j) + r * L::TK, 0, L::TK);
      *d = *off = 0.f;
      if constexpr (L::MINS) for (int p = 0; p < 4; ++p) t.mins[((g * t.units + u) * 4 + p) * 16 + r] = 0;
      continue;
    }
    if constexpr (L::legacy) {
      __m256i codes = legacy_codes<TYPE>(w + u * Legacy<TYPE>::bytes, d, off);
      if (TYPE == GGML_Q8_0) {  // signed values -> unsigned codes: q + 128, offset -128 d
        codes = _mm256_xor_si256(codes, _mm256_set1_epi8(static_cast<char>(0x80)));
        *off = -128.f * *d;
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.plane(g, 0, u) + r * 32), codes);
    } else {
      KSpans s;
      uint8_t sc[8], mn[8];
      if (packed != nullptr) {
        unpack_k512_x16<TYPE>(packed + u * 16 * x16_bytes(TYPE), pr, pick, s, mn);
      } else {
        const uint8_t* blk = w + u * KQuant<TYPE>::bytes;
        unpack_k512<TYPE>(blk, pick, s);
        if constexpr (L::MINS) k4_scales(blk + 4, sc, mn);
      }
      *d = s.d;
      *off = -s.dmin;
      if constexpr (L::MINS)
        for (int p = 0; p < 4; ++p) t.mins[((g * t.units + u) * 4 + p) * 16 + r] = pair16(mn[2 * p], mn[2 * p + 1]);
      for (int j = 0; j < 4; ++j) {
        const int64_t tile = u * 4 + j;
        if constexpr (TYPE == GGML_Q6_K) {
          const __m512i q = _mm512_sub_epi8(s.codes[j], _mm512_set1_epi8(32));
          const __m512i d0 = digit(s.scales[j]);
          const __m512i s1 = _mm512_srai_epi16(_mm512_sub_epi16(s.scales[j], d0), 3);
          const __m512i d1 = digit(s1);
          const __m512i d2 = _mm512_srai_epi16(_mm512_sub_epi16(s1, d1), 3);
          _mm512_store_si512(t.plane(g, 0, tile) + r * 64, mul_s8(q, d0));
          _mm512_store_si512(t.plane(g, 1, tile) + r * 64, mul_s8(q, d1));
          _mm512_store_si512(t.plane(g, 2, tile) + r * 64, mul_s8(q, d2));
        } else {
          _mm512_store_si512(t.plane(g, 0, tile) + r * 64, mul_u8(s.codes[j], _mm512_and_si512(s.scales[j], _mm512_set1_epi16(7))));
          _mm512_store_si512(t.plane(g, 1, tile) + r * 64, mul_u8(s.codes[j], _mm512_srli_epi16(s.scales[j], 3)));
        }
      }
    }
  }
}

// The activations as tiles: for each block of 16 rows, [K / 4][16 rows][4 bytes] of q (and r), so
// the tile of 64 (32) activations at k is 1,024 (512) contiguous bytes; per block, unit and row the
// scale (legacy: d / 64), the float sums (legacy) or the 16-bit pairs of q's sums of 32 (Q4_K / Q5_K).
struct ActTiles {
  int64_t blocks = 0, units = 0;
  std::vector<int32_t> q, r, pairs;
  std::vector<float> d, sums;
};

template <int TYPE>
static void tile_acts(const QuantizedActs& a, ActTiles& t) {
  using L = Amx<TYPE>;
  const int64_t M = a.M, K = a.K, K4 = K / 4;
  t.blocks = (M + 15) / 16;
  t.units = K / L::UNIT;
  t.q.assign(t.blocks * K4 * 16, 0);
  if (L::legacy) t.r.assign(t.blocks * K4 * 16, 0), t.sums.assign(t.blocks * t.units * 16, 0.f);
  if (L::MINS) t.pairs.assign(t.blocks * t.units * 4 * 16, 0);
  t.d.assign(t.blocks * t.units * 16, 0.f);
#pragma omp parallel for schedule(static) if (M >= 32)
  for (int64_t m = 0; m < M; ++m) {
    const int64_t b = m / 16, i = m % 16;
    const int32_t* q4 = reinterpret_cast<const int32_t*>(a.q.data() + m * K);
    int32_t* qt = t.q.data() + b * K4 * 16 + i;
    for (int64_t k4 = 0; k4 < K4; ++k4) qt[k4 * 16] = q4[k4];
    for (int64_t u = 0; u < t.units; ++u) {
      const int64_t at = (b * t.units + u) * 16 + i;
      t.d[at] = a.d[m * t.units + u] / (L::legacy ? REST_STEPS : 1);
      if constexpr (L::legacy) t.sums[at] = a.sums32[m * t.units + u];
      if constexpr (L::MINS) {
        const int16_t* s16 = a.qsums16.data() + m * (K / 16) + u * 16;
        for (int p = 0; p < 4; ++p)
          t.pairs[(b * t.units + u) * 64 + p * 16 + i] = pair16(s16[4 * p] + s16[4 * p + 1], s16[4 * p + 2] + s16[4 * p + 3]);
      }
    }
    if constexpr (L::legacy) {
      const int32_t* r4 = reinterpret_cast<const int32_t*>(a.r.data() + m * K);
      int32_t* rt = t.r.data() + b * K4 * 16 + i;
      for (int64_t k4 = 0; k4 < K4; ++k4) rt[k4 * 16] = r4[k4];
    }
  }
}

// One unit of the pair against activation block b on the tiles, its integer sums left in c: k-quants
// c[h * D + p] (tile h, plane p); legacy c[2 h] (against q), c[2 h + 1] (against r). Tiles 0-5: sums;
// 6: the activations; 7: weights (k-quants; legacy: 6-7 q and r, 5 weights).
template <int TYPE>
static void unit_product(Unpacked<TYPE>& w, const ActTiles& a, int64_t b, int64_t K, int64_t u, int32_t (*c)[256]) {
  using L = Amx<TYPE>;
  const int8_t* q = reinterpret_cast<const int8_t*>(a.q.data()) + b * K * 16;
  const int64_t k0 = u * L::UNIT;
  if constexpr (L::legacy) {
    const int8_t* r = reinterpret_cast<const int8_t*>(a.r.data()) + b * K * 16;
    _tile_loadd(6, q + k0 * 16, 64);
    _tile_loadd(7, r + k0 * 16, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(5, w.plane(0, 0, u), 32);
    _tile_dpbusd(0, 5, 6);
    _tile_dpbusd(1, 5, 7);
    _tile_loadd(5, w.plane(1, 0, u), 32);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
  } else if constexpr (TYPE == GGML_Q6_K) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(4);
    _tile_zero(5);
    for (int j = 0; j < 4; ++j) {
      const int64_t tile = u * 4 + j;
      _tile_loadd(6, q + (k0 + 64 * j) * 16, 64);
      _tile_loadd(7, w.plane(0, 0, tile), 64);
      _tile_dpbssd(0, 7, 6);
      _tile_loadd(7, w.plane(0, 1, tile), 64);
      _tile_dpbssd(1, 7, 6);
      _tile_loadd(7, w.plane(0, 2, tile), 64);
      _tile_dpbssd(2, 7, 6);
      _tile_loadd(7, w.plane(1, 0, tile), 64);
      _tile_dpbssd(3, 7, 6);
      _tile_loadd(7, w.plane(1, 1, tile), 64);
      _tile_dpbssd(4, 7, 6);
      _tile_loadd(7, w.plane(1, 2, tile), 64);
      _tile_dpbssd(5, 7, 6);
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    _tile_stored(4, c[4], 64);
    _tile_stored(5, c[5], 64);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int j = 0; j < 4; ++j) {
      const int64_t tile = u * 4 + j;
      _tile_loadd(6, q + (k0 + 64 * j) * 16, 64);
      _tile_loadd(7, w.plane(0, 0, tile), 64);
      _tile_loadd(5, w.plane(0, 1, tile), 64);
      _tile_dpbusd(0, 7, 6);
      _tile_dpbusd(1, 5, 6);
      _tile_loadd(7, w.plane(1, 0, tile), 64);
      _tile_loadd(5, w.plane(1, 1, tile), 64);
      _tile_dpbusd(2, 7, 6);
      _tile_dpbusd(3, 5, 6);
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
  }
}

// acc[i] (tile h's weight row i; lanes: block b's 16 activation rows) += unit u's scaled sums.
template <int TYPE>
static void unit_scale(Unpacked<TYPE>& w, int h, const ActTiles& a, int64_t b, int64_t u, int32_t (*c)[256], float* acc) {
  using L = Amx<TYPE>;
  const int64_t au = (b * a.units + u) * 16;
  const __m512 dx = _mm512_loadu_ps(a.d.data() + au);
  const float* dw = &w.d[(h * w.units + u) * 16];
  const float* off = &w.off[(h * w.units + u) * 16];
  if constexpr (L::legacy) {
    const int32_t* cq = c[2 * h];
    const int32_t* cr = c[2 * h + 1];
    const __m512 sums = _mm512_loadu_ps(a.sums.data() + au);
    for (int i = 0; i < 16; ++i) {
      const __m512i v = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(cq + 16 * i), 6), _mm512_load_si512(cr + 16 * i));
      __m512 s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(dx, _mm512_set1_ps(dw[i])), _mm512_load_ps(acc + 16 * i));
      _mm512_store_ps(acc + 16 * i, _mm512_fmadd_ps(sums, _mm512_set1_ps(off[i]), s));
    }
  } else {
    const int32_t* c0 = c[h * L::D];
    const int32_t* c1 = c[h * L::D + 1];
    const int32_t* c2 = c[h * L::D + (L::D - 1)];
    for (int i = 0; i < 16; ++i) {
      __m512i v = _mm512_add_epi32(_mm512_load_si512(c0 + 16 * i), _mm512_slli_epi32(_mm512_load_si512(c1 + 16 * i), 3));
      if constexpr (L::D == 3) v = _mm512_add_epi32(v, _mm512_slli_epi32(_mm512_load_si512(c2 + 16 * i), 6));
      __m512 s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(dx, _mm512_set1_ps(dw[i])), _mm512_load_ps(acc + 16 * i));
      if constexpr (L::MINS) {
        const int32_t* mins = &w.mins[(h * w.units + u) * 64 + i];
        const int32_t* pairs = a.pairs.data() + au * 4;
        __m512i m = _mm512_setzero_si512();
        for (int p = 0; p < 4; ++p) m = _mm512_dpwssd_epi32(m, _mm512_loadu_si512(pairs + 16 * p), _mm512_set1_epi32(mins[16 * p]));
        s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), _mm512_mul_ps(dx, _mm512_set1_ps(off[i])), s);
      }
      _mm512_store_ps(acc + 16 * i, s);
    }
  }
}

template <int TYPE>
static void gemm(const WeightRows& w, const QuantizedActs& a, float* y) {
  using L = Amx<TYPE>;
  const int64_t N = w.N, M = a.M, K = a.K, pairs = (N + 31) / 32;
  ActTiles acts;
  tile_acts<TYPE>(a, acts);
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole region
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.tile(t, 16, 64);
    if constexpr (L::legacy) cfg.tile(5, 16, 32).tile(6, 8, 64).tile(7, 8, 64);
    _tile_loadconfig(&cfg);
    Unpacked<TYPE> unpacked(K);
    RowReader rows(TYPE, w);
    __m512i pick[4];
    for (int j = 0; j < 4; ++j) pick[j] = span_scale_index<TYPE == GGML_Q6_K ? GGML_Q6_K : GGML_Q4_K>(j);
    alignas(64) int32_t c[6][256];
    std::vector<float> accs(MG * 2 * 256 + 16);
    float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(accs.data()) + 63) & ~uintptr_t{63});
#pragma omp for schedule(dynamic, 1)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      for (int h = 0; h < 2; ++h)
        for (int r = 0; r < 16; ++r) {
          const int64_t n = pair * 32 + h * 16 + r;
          if (w.packed && !L::legacy && n < N)  // the packed group read in place
            unpack_row<TYPE>(nullptr, unpacked, h, r, pick, w.data + (n / 16) * (K / 256) * 16 * x16_bytes(TYPE), n % 16);
          else
            unpack_row<TYPE>(n < N ? rows.row(n) : nullptr, unpacked, h, r, pick);
        }
      for (int64_t b0 = 0; b0 < acts.blocks; b0 += MG) {
        const int64_t blocks = std::min(MG, acts.blocks - b0);
        std::fill_n(acc, blocks * 512, 0.f);
        for (int64_t u = 0; u < acts.units; ++u)
          for (int64_t b = 0; b < blocks; ++b) {
            unit_product<TYPE>(unpacked, acts, b0 + b, K, u, c);
            unit_scale<TYPE>(unpacked, 0, acts, b0 + b, u, c, acc + (2 * b) * 256);
            unit_scale<TYPE>(unpacked, 1, acts, b0 + b, u, c, acc + (2 * b + 1) * 256);
          }
        for (int64_t b = 0; b < blocks; ++b)  // acc [h][weight row][activation row] -> y [activation row][n]
          for (int h = 0; h < 2; ++h) {
            const int64_t n0 = pair * 32 + h * 16, nrows = std::min<int64_t>(16, N - n0), m0 = (b0 + b) * 16;
            const float* t = acc + (2 * b + h) * 256;
            for (int64_t m = 0; m < std::min<int64_t>(16, M - m0); ++m)
              for (int64_t i = 0; i < nrows; ++i) y[(m0 + m) * N + n0 + i] = t[i * 16 + m];
          }
      }
    }
    _tile_release();
  }
}

static double tile_peak(int64_t reps) {
  if (!amx_usable()) return 0;
  alignas(64) static const uint8_t a[16 * 64] = {1};
  alignas(64) static const int8_t b[16 * 64] = {1};
  const auto start = omp_get_wtime();
  int threads = 1;
#pragma omp parallel
  {
#pragma omp single
    threads = omp_get_num_threads();
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.tile(t, 16, 64);
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, a, 64);
    _tile_loadd(5, a, 64);
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b, 64);
    for (int64_t r = 0; r < reps; ++r) {
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
    alignas(64) int32_t c[256];
    _tile_stored(0, c, 64);
    _tile_release();
  }
  return 4.0 * 16 * 16 * 64 * reps * threads / (omp_get_wtime() - start);
}

bool amx_gemm(int type, const WeightRows& w, const QuantizedActs& a, float* y) {
  if (!amx_active() || !amx_supports(type, a.K) || a.M == 0) return false;
  switch (type) {
    case GGML_Q4_0: gemm<GGML_Q4_0>(w, a, y); return true;
    case GGML_Q4_1: gemm<GGML_Q4_1>(w, a, y); return true;
    case GGML_Q5_0: gemm<GGML_Q5_0>(w, a, y); return true;
    case GGML_Q5_1: gemm<GGML_Q5_1>(w, a, y); return true;
    case GGML_Q8_0: gemm<GGML_Q8_0>(w, a, y); return true;
    case GGML_Q4_K: gemm<GGML_Q4_K>(w, a, y); return true;
    case GGML_Q5_K: gemm<GGML_Q5_K>(w, a, y); return true;
    case GGML_Q6_K: gemm<GGML_Q6_K>(w, a, y); return true;
    default: return false;
  }
}

#else

bool amx_usable() { return false; }
std::string amx_status() {
#if defined(__x86_64__)
  return "this build has no AMX instructions (the compiler's -march=native did not include amx-int8)";
#else
  return "not an x86-64 CPU";
#endif
}
bool amx_active() { return false; }
bool amx_supports(int, int64_t) { return false; }
bool amx_gemm(int, const WeightRows&, const QuantizedActs&, float*) { return false; }
static double tile_peak(int64_t) { return 0; }

#endif

static double vector_peak(int64_t reps) {
#if defined(__AVX512VNNI__) && defined(LMK_K512)
  const auto start = omp_get_wtime();
  int threads = 1;
  int64_t sink = 0;
#pragma omp parallel reduction(+ : sink)
  {
#pragma omp single
    threads = omp_get_num_threads();
    const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(1);
    __m512i acc[8];
    for (auto& v : acc) v = _mm512_setzero_si512();
    for (int64_t r = 0; r < reps; ++r)
      for (auto& v : acc) {
        v = _mm512_dpbusd_epi32(v, a, b);
        __asm__ volatile("" : "+v"(v));
      }
    for (auto& v : acc) sink += _mm512_reduce_add_epi32(v);
  }
  const double seconds = omp_get_wtime() - start;
  return sink == 0 ? 0 : 8.0 * 64 * reps * threads / seconds;
#else
  (void)reps;
  return 0;
#endif
}

double int8_peak(bool tiles, int64_t reps) { return tiles ? tile_peak(reps) : vector_peak(reps); }

}  // namespace lmk
