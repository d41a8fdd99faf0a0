// A structured output's token bitmask applied to the sampler's logits on the CPU, in place: one pass over
// each constrained row, reading its packed mask (one bit per token, llguidance's layout) and writing -inf
// where a token is not allowed. PyTorch needs an unpacked boolean copy of the mask and a masked_fill that
// run about 40 times slower (SmolLM2's 49,152 tokens: 150 us a row). Semantics:
// kiln/runtime/structured_output.py's apply_bitmasks.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>

namespace {

void apply_token_bitmask(at::Tensor logits, const at::Tensor& rows, const at::Tensor& masks) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
                  logits.dim() == 2, "kiln_cpu: logits must be a contiguous float32 [batch, vocab] CPU tensor");
  TORCH_CHECK(masks.device().is_cpu() && masks.scalar_type() == at::kInt && masks.is_contiguous() && masks.dim() == 2,
              "kiln_cpu: masks must be a contiguous int32 [rows, words] CPU tensor");
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.is_contiguous() &&
                  rows.numel() == masks.size(0), "kiln_cpu: rows must be int64 with one entry per mask");
  const int64_t batch = logits.size(0), vocab = logits.size(1), words = masks.size(1), n = rows.numel();
  TORCH_CHECK(words * 32 >= vocab, "kiln_cpu: a mask of ", words, " words cannot cover ", vocab, " tokens");
  const int64_t* row = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(0 <= row[i] && row[i] < batch, "kiln_cpu: row ", row[i], " out of range");
  float* lp = logits.data_ptr<float>();
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(masks.data_ptr<int32_t>());
  // Each mask byte covers 8 tokens: add its 8 floats (0 for an allowed token, -inf for another) from a
  // 256-entry table, one vector add per byte and no branch on the bits.
  static const auto table = [] {
    std::array<std::array<float, 8>, 256> t{};
    for (int byte = 0; byte < 256; ++byte)
      for (int j = 0; j < 8; ++j) t[byte][j] = ((byte >> j) & 1) ? 0.f : -std::numeric_limits<float>::infinity();
    return t;
  }();
  const int64_t row_bytes = words * 4, full = vocab / 8;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* out = lp + row[i] * vocab;
      const uint8_t* m = mp + i * row_bytes;
      for (int64_t k = 0; k < full; ++k) {
        const uint8_t bits = m[k];
        if (bits == 0xff) continue;
        const float* add = table[bits].data();
        float* o = out + k * 8;
#pragma omp simd
        for (int j = 0; j < 8; ++j) o[j] += add[j];
      }
      for (int64_t t = full * 8; t < vocab; ++t)
        if (!((m[t / 8] >> (t % 8)) & 1)) out[t] = -std::numeric_limits<float>::infinity();
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) { m.def("apply_token_bitmask(Tensor(a!) logits, Tensor rows, Tensor masks) -> ()"); }

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) { m.impl("apply_token_bitmask", &apply_token_bitmask); }
