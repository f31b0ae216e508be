// A whole Llama decoder for a decode step of up to 64 sequences, one call instead of ~30 framework
// calls a layer:
//   x = rms(h) ; q, k, v = x Wq + bq, x Wk + bk, x Wv + bv ; rope(q, k) ; cache <- k, v
//   h += attend(q, cache) Wo ; x = rms(h) ; h += (silu(x Wgate) * x Wup) Wdown
// Each projection group (QKV; O; gate/up; down) is one parallel loop over output rows.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>

#include "attention.h"
#include "checks.h"
#include "dense_rows.h"
#include "elementwise.h"
#include "gguf_amx.h"
#include "gguf_blocks.h"
#include "gguf_x16.h"
#include "kernels.h"
#include "simd.h"

namespace lmk {

enum Kind { FLOAT32 = 0, INT8_ROW = 1, INT8_GROUP = 2, INT4 = 3, GGUF = 4 };

static int kind_of(const std::string& kind) {
  if (kind == "float32") return FLOAT32;
  if (kind == "int8") return INT8_ROW;
  if (kind == "int8_group") return INT8_GROUP;
  if (kind == "int4") return INT4;
  if (kind == "gguf" || kind == "gguf_packed") return GGUF;
  TORCH_CHECK(false, "projection kind '", kind, "' is not one of float32, int8, int8_group, int4, gguf, gguf_packed");
  return -1;
}

Projection::Projection(std::string kind_name, torch::Tensor w, c10::optional<torch::Tensor> sc,
                       c10::optional<torch::Tensor> mn, c10::optional<torch::Tensor> b, int64_t type, int64_t in)
    : kind(kind_of(kind_name)), weight(w), gguf_type(type), in_features(in), padded_in(in), group(0),
      family(ACT_FLOAT), packed(kind_name == "gguf_packed") {
  TORCH_CHECK(w.dim() == 2, "weight: expected 2 dimensions, got ", w.dim());
  out_features = w.size(0);
  switch (kind) {
    case FLOAT32:
      check_tensor(w, "weight", torch::kFloat32, 2);
      check_size(w, "weight", 1, in);
      break;
    case INT8_ROW: case INT8_GROUP:
      check_tensor(w, "weight", torch::kChar, 2);
      check_size(w, "weight", 1, in);
      TORCH_CHECK(sc.has_value(), "scale: an int8 projection needs its scales");
      scale = *sc;
      check_tensor(scale, "scale", torch::kFloat32, kind == INT8_ROW ? 1 : 2);
      check_size(scale, "scale", 0, out_features);
      if (kind == INT8_GROUP) {
        TORCH_CHECK(scale.size(1) > 0 && in % scale.size(1) == 0, "scale: ", scale.size(1), " groups do not divide ", in);
        group = in / scale.size(1);
      }
      break;
    case INT4:
      check_tensor(w, "weight", torch::kByte, 2);
      padded_in = 2 * w.size(1);
      TORCH_CHECK(padded_in >= in, "weight: ", padded_in, " packed codes a row, fewer than the ", in, " inputs");
      TORCH_CHECK(sc.has_value() && mn.has_value(), "scale, mins: an int4 projection needs both");
      scale = *sc;
      mins = *mn;
      check_tensor(scale, "scale", torch::kFloat32, 2);
      check_tensor(mins, "mins", torch::kFloat32, 2);
      check_size(scale, "scale", 0, out_features);
      TORCH_CHECK(mins.sizes() == scale.sizes(), "mins: expected the shape of scale");
      TORCH_CHECK(scale.size(1) > 0 && padded_in % scale.size(1) == 0, "scale: groups do not divide ", padded_in);
      group = padded_in / scale.size(1);
      TORCH_CHECK(group % (2 * W) == 0, "int4 group ", group, " is not a multiple of ", 2 * W);
      break;
    default: {  // GGUF
      check_tensor(w, "weight", torch::kByte, 2);
      bool known;
      const BlockInfo info = block_info(static_cast<int>(type), &known);
      TORCH_CHECK(known, "GGML type ", type, " has no kernel");
      TORCH_CHECK(in % info.elements == 0, "a row of ", in, " weights is not a whole number of blocks");
      if (packed) {  // groups of 16 rows in the decode layout (gguf_x16.h)
        const int64_t unit = x16_bytes(static_cast<int>(type));
        TORCH_CHECK(unit > 0 && in % 256 == 0, "GGML type ", type, " has no packed layout for rows of ", in);
        check_size(w, "weight", 1, in / 256 * 16 * unit);
        out_features = 16 * w.size(0);
      } else {
        check_size(w, "weight", 1, in / info.elements * info.bytes);
      }
      family = info.family;
    }
  }
  if (b.has_value() && b->numel()) {
    bias = *b;
    check_tensor(bias, "bias", torch::kFloat32, 1);
    check_size(bias, "bias", 0, out_features);
  }
}

WeightRows Projection::rows() const {
  bool known;
  const BlockInfo info = block_info(static_cast<int>(gguf_type), &known);
  return {weight.data_ptr<uint8_t>(), in_features / info.elements * info.bytes, out_features, in_features, packed};
}

DecoderLayer::DecoderLayer(torch::Tensor in_norm, torch::Tensor post, Projection q_, Projection k_, Projection v_,
                           Projection o_, Projection gate_, Projection up_, Projection down_, int64_t window_)
    : input_norm(in_norm), post_norm(post), q(q_), k(k_), v(v_), o(o_), gate(gate_), up(up_), down(down_),
      window(window_) {
  TORCH_CHECK(window >= 0, "window must be 0 (the whole context) or positive, got ", window);
  const int64_t hidden = in_norm.numel();
  check_tensor(input_norm, "input_norm", torch::kFloat32, 1);
  check_tensor(post_norm, "post_norm", torch::kFloat32, 1);
  check_size(post_norm, "post_norm", 0, hidden);
  for (const Projection* p : {&q, &k, &v, &gate, &up})
    TORCH_CHECK(p->in_features == hidden, "a projection reading the hidden state has ", p->in_features,
                " inputs, expected ", hidden);
  TORCH_CHECK(o.in_features == q.out_features, "o_proj: ", o.in_features, " inputs, expected ", q.out_features);
  TORCH_CHECK(o.out_features == hidden && down.out_features == hidden, "o_proj and down_proj must give ", hidden);
  TORCH_CHECK(up.out_features == gate.out_features && down.in_features == gate.out_features,
              "gate, up and down projections disagree on the intermediate size");
  TORCH_CHECK(!o.bias.defined() && !gate.bias.defined() && !up.bias.defined() && !down.bias.defined(),
              "only the q, k and v projections may have a bias");
}

LlamaDecoder::LlamaDecoder(std::vector<DecoderLayer> layers, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           double eps)
    : layers_(std::move(layers)), num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim),
      eps_(static_cast<float>(eps)) {
  TORCH_CHECK(!layers_.empty(), "a decoder needs at least one layer");
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, num_heads, " query heads do not share ",
              num_kv_heads, " KV heads evenly");
  hidden_ = layers_[0].input_norm.numel();
  intermediate_ = layers_[0].gate.out_features;
  for (const DecoderLayer& l : layers_) {
    TORCH_CHECK(l.input_norm.numel() == hidden_ && l.gate.out_features == intermediate_, "layers differ in size");
    TORCH_CHECK(l.q.out_features == num_heads * head_dim && l.k.out_features == num_kv_heads * head_dim &&
                    l.v.out_features == num_kv_heads * head_dim,
                "q/k/v projections do not match ", num_heads, "/", num_kv_heads, " heads of ", head_dim);
  }
}

struct Target {
  const Projection* p;
  float* y;
};

template <int M>
static void project_rows(const Projection& p, const float* x, float* y, int64_t n0, int64_t n1) {
  const int64_t K = p.padded_in, N = p.out_features;
  switch (p.kind) {
    case FLOAT32: rows_kernel<M>(x, p.weight.data_ptr<float>(), nullptr, y, n0, n1, K, N); break;
    case INT8_ROW: rows_kernel<M>(x, p.weight.data_ptr<int8_t>(), p.scale.data_ptr<float>(), y, n0, n1, K, N); break;
    case INT8_GROUP:
      int8_group_rows<M>(x, p.weight.data_ptr<int8_t>(), p.scale.data_ptr<float>(), y, n0, n1, K, N, p.group);
      break;
    default:
      int4_rows<M>(x, p.weight.data_ptr<uint8_t>(), p.scale.data_ptr<float>(), p.mins.data_ptr<float>(), y, n0, n1, K,
                   N, p.group);
      break;
  }
}

// y_t = x W_t^T (+ b_t) for projections that read the same input x [M, K], their output rows in one
// parallel loop of 16-row chunks (each thread's share even to within a few rows).
// From AMX_ROWS sequences on (PACKED_AMX_ROWS on packed rows), GGUF projections run one at a time on AMX
// tiles where the CPU grants them.
// `invariant`: never the tiles, and k-quant activations keep their rest at any M, so that each row's result
// is the same bits whatever rows share the call.
static void project(int64_t M, const float* x, int64_t K, std::initializer_list<Target> targets, bool invariant) {
  constexpr int64_t chunk = 16;
  Target ts[4];
  int count = 0;
  QuantizedActs tiled;
  for (const Target& t : targets) {
    const Projection& p = *t.p;
    if (!invariant && p.kind == GGUF && M >= (p.packed ? PACKED_AMX_ROWS : AMX_ROWS) && amx_active() &&
        amx_supports(static_cast<int>(p.gguf_type), K)) {
      if (tiled.family != p.family) quantize_acts(x, M, K, static_cast<ActFamily>(p.family), tiled, keeps_rest(p.family, M));
      amx_gemm(static_cast<int>(p.gguf_type), p.rows(), tiled, t.y);
      if (p.bias.defined()) {
        const float* b = p.bias.data_ptr<float>();
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < p.out_features; ++n) t.y[m * p.out_features + n] += b[n];
      }
      continue;
    }
    ts[count++] = t;
  }
  if (count == 0) return;
  int64_t first[5] = {0, 0, 0, 0, 0};
  const float* xs[4];
  std::vector<float> padded[4];
  QuantizedActs acts[3];  // by family, quantized once for every projection that needs it
  bool quantized[3] = {false, false, false};
  for (int t = 0; t < count; ++t) {
    const Projection& p = *ts[t].p;
    first[t + 1] = first[t] + (p.out_features + chunk - 1) / chunk;
    xs[t] = x;
    if (p.padded_in != K) {  // int4 with the input padded to whole groups
      padded[t].assign(M * p.padded_in, 0.f);
      for (int64_t m = 0; m < M; ++m) std::memcpy(padded[t].data() + m * p.padded_in, x + m * K, K * sizeof(float));
      xs[t] = padded[t].data();
    }
    if (p.kind == GGUF && !quantized[p.family]) {
      quantize_acts(x, M, K, static_cast<ActFamily>(p.family), acts[p.family], invariant || keeps_rest(p.family, M));
      quantized[p.family] = true;
    }
  }
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t c = 0; c < first[count]; ++c) {
      int t = 0;
      while (c >= first[t + 1]) ++t;
      const Projection& p = *ts[t].p;
      const int64_t N = p.out_features, n0 = (c - first[t]) * chunk, n1 = std::min(N, n0 + chunk);
      float* y = ts[t].y;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int rows = static_cast<int>(std::min<int64_t>(4, M - m0));
        if (p.kind == GGUF && p.packed && x16_kernel()) {  // a chunk of 16 rows is one group
          x16_rows(static_cast<int>(p.gguf_type), p.weight.data_ptr<uint8_t>(), p.in_features, acts[p.family], m0, rows,
                   n0 / 16, n0 / 16 + 1, y, N);
          continue;
        }
        if (p.kind == GGUF && p.packed) {
          std::vector<uint8_t> stored(16 * p.rows().row_bytes);
          x16_restore(static_cast<int>(p.gguf_type), p.weight.data_ptr<uint8_t>(), n0 / 16, p.in_features, stored.data());
          gguf_rows(static_cast<int>(p.gguf_type), stored.data(), p.rows().row_bytes, acts[p.family], m0, rows, 0, 16,
                    y + n0, N);
          continue;
        }
        if (p.kind == GGUF) {
          gguf_rows(static_cast<int>(p.gguf_type), p.weight.data_ptr<uint8_t>(), p.weight.size(1), acts[p.family], m0,
                    rows, n0, n1, y, N);
          continue;
        }
        const float* xm = xs[t] + m0 * p.padded_in;
        float* ym = y + m0 * N;
        switch (rows) {
          case 1: project_rows<1>(p, xm, ym, n0, n1); break;
          case 2: project_rows<2>(p, xm, ym, n0, n1); break;
          case 3: project_rows<3>(p, xm, ym, n0, n1); break;
          default: project_rows<4>(p, xm, ym, n0, n1); break;
        }
      }
      if (p.bias.defined()) {
        const float* b = p.bias.data_ptr<float>();
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n) y[m * N + n] += b[n];
      }
    }
  }
}

torch::Tensor LlamaDecoder::forward(torch::Tensor h, std::vector<torch::Tensor> k_caches,
                                    std::vector<torch::Tensor> v_caches, torch::Tensor cos, torch::Tensor sin,
                                    torch::Tensor slots, torch::Tensor tables, torch::Tensor lens,
                                    int64_t block_size, bool invariant) const {
  const int64_t B = h.size(0), Dm = hidden_, D = head_dim_, Hq = num_heads_, Hkv = num_kv_heads_, I = intermediate_;
  check_tensor(h, "h", torch::kFloat32, 2);
  check_size(h, "h", 1, Dm);
  TORCH_CHECK(B >= 1 && B <= MAX_SEQUENCES, "h: ", B, " sequences, expected 1 to ", MAX_SEQUENCES);
  TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "expected one K and one V cache for each of ",
              layers_.size(), " layers");
  for (size_t l = 0; l < layers_.size(); ++l) {
    check_tensor(k_caches[l], "k_cache", torch::kFloat32, 3);
    TORCH_CHECK(v_caches[l].sizes() == k_caches[l].sizes() && v_caches[l].is_contiguous() &&
                    v_caches[l].scalar_type() == torch::kFloat32,
                "v_cache: expected the shape and dtype of k_cache");
    TORCH_CHECK(k_caches[l].size(1) == Hkv && k_caches[l].size(2) == D && k_caches[l].size(0) == k_caches[0].size(0),
                "k_cache: expected [slots, ", Hkv, ", ", D, "], got ", k_caches[l].sizes());
  }
  check_tensor(cos, "cos", torch::kFloat32, 2);
  check_tensor(sin, "sin", torch::kFloat32, 2);
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == D && sin.sizes() == cos.sizes(), "cos/sin: expected [", B, ", ", D, "]");
  check_tensor(slots, "slots", torch::kLong, 1);
  check_size(slots, "slots", 0, B);
  check_tensor(tables, "tables", torch::kLong, 2);
  check_tensor(lens, "lens", torch::kLong, 1);
  check_size(tables, "tables", 0, B);
  check_size(lens, "lens", 0, B);
  const int64_t cache_slots = k_caches[0].size(0);
  check_block_tables(tables, lens, block_size, cache_slots);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(slot[b] >= 0 && slot[b] < cache_slots, "slots[", b, "] is outside the cache");

  auto out = h.clone();
  auto buf = torch::empty({B * (Dm + (Hq + 2 * Hkv) * D + Hq * D + 2 * I)}, out.options());
  float* hp = out.data_ptr<float>();
  float* xn = buf.data_ptr<float>();
  float* q = xn + B * Dm;
  float* k = q + B * Hq * D;
  float* v = k + B * Hkv * D;
  float* att = v + B * Hkv * D;
  float* gate = att + B * Hq * D;
  float* up = gate + B * I;
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (size_t l = 0; l < layers_.size(); ++l) {
    const DecoderLayer& w = layers_[l];
    rms_rows(hp, w.input_norm.data_ptr<float>(), xn, B, Dm, eps_);
    project(B, xn, Dm, {{&w.q, q}, {&w.k, k}, {&w.v, v}}, invariant);
    rotate_rows(q, cp, sp, q, B, Hq, D);
    rotate_rows(k, cp, sp, k, B, Hkv, D);
    float* kc = k_caches[l].data_ptr<float>();
    float* vc = v_caches[l].data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(kc + slot[b] * Hkv * D, k + b * Hkv * D, Hkv * D * sizeof(float));
      std::memcpy(vc + slot[b] * Hkv * D, v + b * Hkv * D, Hkv * D * sizeof(float));
    }
    attend_all(q, kc, vc, tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), B, tables.size(1), block_size, Hq, Hkv,
               D, scale, w.window, att);
    project(B, att, Hq * D, {{&w.o, xn}}, invariant);
    for (int64_t i = 0; i < B * Dm; ++i) hp[i] += xn[i];
    rms_rows(hp, w.post_norm.data_ptr<float>(), xn, B, Dm, eps_);
    project(B, xn, Dm, {{&w.gate, gate}, {&w.up, up}}, invariant);
    silu_mul_rows(gate, up, gate, B * I);
    project(B, gate, I, {{&w.down, xn}}, invariant);
    for (int64_t i = 0; i < B * Dm; ++i) hp[i] += xn[i];
  }
  return out;
}

}  // namespace lmk
