"""Single-token (decode) attention that reads K/V through the block table in one pass, on CPU.

PyTorch has no paged attention: the portable path gathers each context out of the cache and then
attention reads it again. This kernel reads every key and value once, for all the query heads that
share it (grouped-query attention), one OpenMP task per sequence. It is compiled on
first use; when it cannot be built, `attend` keeps using the portable path.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <cmath>
#include <vector>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor lens, int64_t block_size, double scale) {
  // q [B, Hq, D]; caches [slots, Hkv, D]; tables [B, max_blocks] (int64); lens [B] (int64)
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  const int64_t G = Hq / Hkv, nb = tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
#pragma omp parallel for schedule(dynamic)
  for (int64_t b = 0; b < B; ++b) {
    // One sequence per task: each cache row (all KV heads of a token) is read once, whole.
    const int64_t L = lp[b];
    std::vector<float> scores(Hq * L);
    const float* qb = qp + b * Hq * D;
    for (int64_t j = 0; j < L; ++j) {
      const int64_t slot = tp[b * nb + j / block_size] * block_size + j % block_size;
      const float* krow = kp + slot * Hkv * D;
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const float* kh = krow + (hq / G) * D;
        const float* qh = qb + hq * D;
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qh[d] * kh[d];
        scores[hq * L + j] = s * sc;
      }
    }
    for (int64_t hq = 0; hq < Hq; ++hq) {
      float* sh = scores.data() + hq * L;
      float m = -INFINITY;
      for (int64_t j = 0; j < L; ++j) m = sh[j] > m ? sh[j] : m;
      float total = 0.f;
      for (int64_t j = 0; j < L; ++j) { sh[j] = std::exp(sh[j] - m); total += sh[j]; }
      const float inv = 1.f / total;
      for (int64_t j = 0; j < L; ++j) sh[j] *= inv;
    }
    float* ob = op + b * Hq * D;
    for (int64_t i = 0; i < Hq * D; ++i) ob[i] = 0.f;
    for (int64_t j = 0; j < L; ++j) {
      const int64_t slot = tp[b * nb + j / block_size] * block_size + j % block_size;
      const float* vrow = vp + slot * Hkv * D;
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const float pr = scores[hq * L + j];
        const float* vh = vrow + (hq / G) * D;
        float* oh = ob + hq * D;
        for (int64_t d = 0; d < D; ++d) oh[d] += pr * vh[d];
      }
    }
  }
  return out;
}
"""


@lru_cache(maxsize=1)
def _kernel() -> object | None:
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name="lmkernel_paged_decode_cpu",
            cpp_sources=_SOURCE,
            functions=["paged_decode"],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja: the portable path still works
        log.warning("paged decode kernel unavailable, using the gather path: %s", exc)
        return None


def available(q: torch.Tensor) -> bool:
    """Whether the compiled kernel can serve this query (float32 on CPU) and has been built."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and _kernel() is not None


def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    block_size: int, scale: float,
) -> torch.Tensor:
    """Attention of one query per sequence over its whole cached context: q [B, Hq, D] -> [B, Hq, D]."""
    return _kernel().paged_decode(q.contiguous(), k_cache, v_cache, tables, lens, block_size, scale)
