// PyTorch's int4 weight-only CPU kernel (at::_weight_int4pack_mm_for_cpu, which takes bfloat16 rows) for rows of
// the model's dtype in and out: the two conversions and the cut of the weight's padded rows in one dispatcher call,
// where Python made four (25 against 30 us a call at SmolLM2's 576 x 960, 120 calls a decode step).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_weight_int4pack_mm_for_cpu.h>
#include <torch/library.h>

namespace {

at::Tensor int4pack_linear(const at::Tensor& x, const at::Tensor& packed, int64_t group,
                           const at::Tensor& scales_zeros, int64_t rows) {
  at::Tensor y = at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16), packed, group, scales_zeros);
  if (y.size(-1) != rows) y = y.narrow(-1, 0, rows);
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.def("int4pack_linear(Tensor x, Tensor packed, int group, Tensor scales_zeros, int rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) { m.impl("int4pack_linear", &int4pack_linear); }
