// Argument checks shared by the entry points: a wrong tensor raises a Python error naming the
// argument, never a read past a buffer.
#pragma once

#include <torch/extension.h>

namespace lmk {

static inline void check_tensor(const torch::Tensor& t, const char* name, c10::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor");
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", c10::toString(dtype), ", got ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(dim < 0 || t.dim() == dim, name, ": expected ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

static inline void check_size(const torch::Tensor& t, const char* name, int64_t dim, int64_t size) {
  TORCH_CHECK(t.size(dim) == size, name, ": expected size ", size, " in dimension ", dim, ", got ", t.size(dim));
}

}  // namespace lmk
