// torch.ops.kiln_gguf: the kernels as dispatcher ops, so torch.compile and the profiler see them.
// Python (__init__.py) checks arguments and raises ValueError; the checks here only guard the
// kernels against a caller that goes around it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "gguf_kernels.h"

namespace {

at::Tensor gguf_matmul(const at::Tensor& x, const at::Tensor& w, int64_t fmt, int64_t out_features,
                       int64_t in_features, int64_t act_bits) {
  TORCH_CHECK(fmt >= 0 && fmt < kiln_gguf::kFormatCount, "kiln_gguf::matmul: unknown format ", fmt);
  const auto format = static_cast<kiln_gguf::Format>(fmt);
  const kiln_gguf::FormatInfo fi = kiln_gguf::format_info(format);
  TORCH_CHECK(kiln_gguf::takes_act_bits(format, static_cast<int>(act_bits)),
              "kiln_gguf::matmul: activations of ", act_bits, " bits are not taken for this format");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "kiln_gguf::matmul: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "kiln_gguf::matmul: x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(in_features > 0 && in_features % fi.block == 0 && x.size(1) == in_features,
              "kiln_gguf::matmul: bad in_features");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(0) == out_features &&
                  w.size(1) == in_features / fi.block * fi.bytes,
              "kiln_gguf::matmul: w must be a contiguous uint8 [out_features, blocks * block bytes] tensor");
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  kiln_gguf::matmul(x.data_ptr<float>(), x.size(0), in_features, w.data_ptr<uint8_t>(), out_features, format,
                    static_cast<int>(act_bits), y.data_ptr<float>());
  return y;
}

kiln_gguf::Format rows4_format(int64_t fmt, const char* op) {
  TORCH_CHECK(fmt >= 0 && fmt < kiln_gguf::kFormatCount && kiln_gguf::takes_rows4(static_cast<kiln_gguf::Format>(fmt)),
              op, ": no rows-of-four layout for format ", fmt);
  return static_cast<kiln_gguf::Format>(fmt);
}

at::Tensor gguf_repack_rows4(const at::Tensor& w, int64_t fmt, int64_t out_features, int64_t in_features) {
  const auto format = rows4_format(fmt, "kiln_gguf::repack_rows4");
  const kiln_gguf::FormatInfo fi = kiln_gguf::format_info(format);
  TORCH_CHECK(in_features > 0 && in_features % fi.block == 0, "kiln_gguf::repack_rows4: bad in_features");
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() &&
                  w.size(0) == out_features && w.size(1) == in_features / fi.block * fi.bytes,
              "kiln_gguf::repack_rows4: w must be a contiguous uint8 [out_features, blocks * block bytes] tensor");
  at::Tensor out = at::empty({kiln_gguf::rows4_bytes(format, out_features, in_features)}, w.options());
  kiln_gguf::repack_rows4(format, w.data_ptr<uint8_t>(), out_features, in_features, out.data_ptr<uint8_t>());
  return out;
}

at::Tensor gguf_matmul_rows4(const at::Tensor& x, const at::Tensor& w4, int64_t fmt, int64_t out_features,
                             int64_t in_features, int64_t act_bits) {
  const auto format = rows4_format(fmt, "kiln_gguf::matmul_rows4");
  const kiln_gguf::FormatInfo fi = kiln_gguf::format_info(format);
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "kiln_gguf::matmul_rows4: act_bits must be 8 or 16");
  TORCH_CHECK(x.device().is_cpu() && w4.device().is_cpu(), "kiln_gguf::matmul_rows4: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "kiln_gguf::matmul_rows4: x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(in_features > 0 && in_features % fi.block == 0 && x.size(1) == in_features,
              "kiln_gguf::matmul_rows4: bad in_features");
  TORCH_CHECK(w4.dim() == 1 && w4.scalar_type() == at::kByte && w4.is_contiguous() &&
                  w4.size(0) == kiln_gguf::rows4_bytes(format, out_features, in_features),
              "kiln_gguf::matmul_rows4: w4 must be repack_rows4's uint8 tensor for this shape");
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  kiln_gguf::matmul_rows4(format, x.data_ptr<float>(), x.size(0), in_features, w4.data_ptr<uint8_t>(), out_features,
                          static_cast<int>(act_bits), y.data_ptr<float>());
  return y;
}

std::string gguf_isa() { return kiln_gguf::isa_name(); }

}  // namespace

TORCH_LIBRARY(kiln_gguf, m) {
  m.def("matmul(Tensor x, Tensor w, int fmt, int out_features, int in_features, int act_bits) -> Tensor");
  m.def("repack_rows4(Tensor w, int fmt, int out_features, int in_features) -> Tensor");
  m.def("matmul_rows4(Tensor x, Tensor w4, int fmt, int out_features, int in_features, int act_bits) -> Tensor");
  m.def("isa() -> str", &gguf_isa);
}

TORCH_LIBRARY_IMPL(kiln_gguf, CPU, m) {
  m.impl("matmul", &gguf_matmul);
  m.impl("repack_rows4", &gguf_repack_rows4);
  m.impl("matmul_rows4", &gguf_matmul_rows4);
}
