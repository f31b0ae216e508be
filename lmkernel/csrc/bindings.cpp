// The Python module: every entry point of kernels.h, and the named weight records of the fused decode.
#include <malloc.h>
#include <torch/extension.h>

#include "gguf_amx.h"
#include "gguf_x16.h"
#include "kernels.h"

namespace py = pybind11;

// A prefill's temporaries are tens of megabytes each (512 rows of an 8,960-wide layer: 18 MB), made and
// dropped several times a layer. glibc maps each allocation past 128 KiB afresh and unmaps it when
// freed, so every page of every temporary faults on first use (a twentieth of a prefill). Keep
// allocations up to 32 MiB (glibc's most) on the heap, and the heap from shrinking after each one.
static const bool heap_for_large_temporaries = [] {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  return true;
}();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_linear", &lmk::small_linear, "x [M<=4, K] @ w[N, K]^T (+ bias), w float32 or bfloat16");
  m.def("int4_chunk", &lmk::int4_chunk, "codes per chunk of the int4 kernel's nibble layout");
  m.def("pack_int4", &lmk::pack_int4, "codes [N, K] -> the int4 kernel's layout [N, K/2]");
  m.def("int8_linear", &lmk::int8_linear, "x [M<=4, K] times int8 w [N, K] with per-row scales");
  m.def("int8_group_linear", &lmk::int8_group_linear, "x [M<=4, K] times int8 w [N, K] with per-group scales");
  m.def("int4_linear", &lmk::int4_linear, "x [M<=4, K] times a pack_int4 weight");
  m.def("gguf_block_layout", &lmk::gguf_block_layout, "(weights, bytes, activation family) of a GGML type; [] if none");
  m.def("gguf_linear", &lmk::gguf_linear, "x [M, K] float32 times GGUF blocks w [N, row bytes] (or packed) -> [M, N]",
        py::arg("x"), py::arg("w"), py::arg("type"), py::arg("bias") = py::none(), py::arg("packed") = false, py::arg("invariant") = false);
  m.def("gguf_dequantize", &lmk::gguf_dequantize, "GGUF blocks [N, row bytes] (or packed) -> float32 [N, K]",
        py::arg("w"), py::arg("type"), py::arg("K"), py::arg("packed") = false);
  m.def("gguf_pack", &lmk::gguf_pack, "stored k-quant blocks [N, row bytes] -> the decode layout [N / 16, ...]");
  m.def("gguf_packed_kernel", &lmk::x16_kernel, "whether this build decodes the packed layout directly");
  m.def("gguf_packed_bytes", [](int64_t type) { return lmk::x16_bytes(static_cast<int>(type)); },
        "bytes of one row's super-block in the decode layout; 0 for a type without it");
  m.def("release_pages", &lmk::release_pages, "hand the whole pages of a tensor's bytes back to the OS (MADV_PAGEOUT)");
  m.def("gguf_embedding", &lmk::gguf_embedding, "rows `ids` of GGUF blocks, dequantized -> float32 [T, K]");
  m.def("amx_usable", &lmk::amx_usable, "whether this process may run AMX tiles (asked and probed once)");
  m.def("amx_status", &lmk::amx_status, "why AMX tiles are or are not usable");
  m.def("amx_enable", &lmk::amx_enable, "switch the AMX tiles on (where usable) or off");
  m.def("amx_active", &lmk::amx_active, "whether products of many rows run on AMX tiles now");
  m.def("int8_peak", &lmk::int8_peak, "int8 multiply-adds a second on tiles or 512-bit vectors, all threads (0: none)");
  m.def("isa", [] {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return std::string("avx512-vnni");
#elif defined(__AVX512BW__)
    return std::string("avx512");
#elif defined(__AVX2__)
    return std::string("avx2");
#else
    return std::string("portable");
#endif
  }, "the widest vector instructions this build's kernels use");
  m.def("paged_decode", &lmk::paged_decode, "one query per sequence against its paged K/V context (its last `window` "
        "tokens when window > 0)", py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("lens"),
        py::arg("block_size"), py::arg("scale"), py::arg("window") = 0);
  m.def("rms_norm", &lmk::rms_norm, "RMS norm of rows");
  m.def("rotary", &lmk::rotary, "rotary embedding of rows [N, heads, D]");
  m.def("silu_mul", &lmk::silu_mul, "silu(gate) * up");
  py::class_<lmk::Projection>(m, "Projection", py::module_local())
      .def(py::init<std::string, torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                    c10::optional<torch::Tensor>, int64_t, int64_t>(),
           py::arg("kind"), py::arg("weight"), py::arg("scale") = py::none(), py::arg("mins") = py::none(),
           py::arg("bias") = py::none(), py::arg("gguf_type") = -1, py::arg("in_features"))
      .def_readonly("out_features", &lmk::Projection::out_features)
      .def_readonly("in_features", &lmk::Projection::in_features);
  py::class_<lmk::DecoderLayer>(m, "DecoderLayer", py::module_local())
      .def(py::init<torch::Tensor, torch::Tensor, lmk::Projection, lmk::Projection, lmk::Projection, lmk::Projection,
                    lmk::Projection, lmk::Projection, lmk::Projection, int64_t>(),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"),
           py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("window") = 0);
  py::class_<lmk::LlamaDecoder>(m, "LlamaDecoder", py::module_local())
      .def(py::init<std::vector<lmk::DecoderLayer>, int64_t, int64_t, int64_t, double>(), py::arg("layers"),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"))
      .def("forward", &lmk::LlamaDecoder::forward, py::arg("h"), py::arg("k_caches"), py::arg("v_caches"), py::arg("cos"),
           py::arg("sin"), py::arg("slots"), py::arg("tables"), py::arg("lens"), py::arg("block_size"),
           py::arg("invariant") = false, py::call_guard<py::gil_scoped_release>())
      .def_readonly_static("MAX_SEQUENCES", &lmk::LlamaDecoder::MAX_SEQUENCES);
}
