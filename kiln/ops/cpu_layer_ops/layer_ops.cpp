// A transformer layer's small ops on the CPU, each one pass over its rows (float32): RMSNorm (with the
// residual sum), SwiGLU's silu(gate) * up, and RoPE on the query and key heads with the keys and values
// written to their cache slots (float32, or int8 / float8 e4m3 as reference.to_cache_dtype stores them). In
// PyTorch each is 4 to 10 calls, and at batch 1 a call costs more in dispatch than in arithmetic. Semantics:
// kiln/ops/reference.py's ops of the same names.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <tuple>
#include <vector>

#include "vector_math.h"

namespace {

void check_float_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "kiln_cpu: ", what,
              " must be a contiguous float32 CPU tensor");
}

// Rows per task: enough work that waking another thread pays.
int64_t grain(int64_t row_width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_width, 1)); }

inline void norm_row(const float* x, const float* w, float* out, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float_rows(x, "x");
  check_float_rows(weight, "weight");
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  TORCH_CHECK(weight.numel() == n, "kiln_cpu::rms_norm: weight must have the row's width");
  at::Tensor out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) norm_row(xp + r * n, wp, op + r * n, n, static_cast<float>(eps));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_float_rows(x, "x");
  check_float_rows(residual, "residual");
  check_float_rows(weight, "weight");
  TORCH_CHECK(x.sizes() == residual.sizes(), "kiln_cpu::add_rms_norm: x and residual differ in shape");
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  TORCH_CHECK(weight.numel() == n, "kiln_cpu::add_rms_norm: weight must have the row's width");
  at::Tensor summed = at::empty_like(x), out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *rp = residual.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *sp = summed.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) sp[r * n + i] = xp[r * n + i] + rp[r * n + i];
      norm_row(sp + r * n, wp, op + r * n, n, static_cast<float>(eps));
    }
  });
  return {out, summed};
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_float_rows(x, "x");
  const int64_t two_n = x.size(-1), n = two_n / 2, rows = two_n ? x.numel() / two_n : 0;
  TORCH_CHECK(two_n % 2 == 0, "kiln_cpu::silu_and_mul: the last dimension must be even (gate | up)");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(two_n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float *g = xp + r * two_n, *u = g + n;
      float* o = op + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = kiln_cpu::silu(g[i]) * u[i];
    }
  });
  return out;
}

// x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] over the halves of a head.
inline void rotate(const float* x, const float* cos, const float* sin, float* out, int64_t d) {
  const int64_t h = d / 2;
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) out[i] = x[i] * cos[i] - x[i + h] * sin[i];
#pragma omp simd
  for (int64_t i = h; i < d; ++i) out[i] = x[i] * cos[i] + x[i - h] * sin[i];
}

// A row of keys or values into the cache: float32 as is; int8 rounded half up and saturated at +-127;
// float8 e4m3 saturated at +-448, then rounded to nearest even (c10's conversion).
inline void store(const float* x, float* out, int64_t n) { std::copy(x, x + n, out); }
inline void store(const float* x, int8_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::floor(x[i] + 0.5f))));
}
inline void store(const float* x, c10::Float8_e4m3fn* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = c10::Float8_e4m3fn(std::min(448.f, std::max(-448.f, x[i])));
}

template <typename C>
void rotate_and_store(const float* xp, const float* cs, float* qp, C* kc, C* vc, const int64_t* sm, int64_t tokens,
                      int64_t num_heads, int64_t kv_heads, int64_t d) {
  const int64_t width = (num_heads + 2 * kv_heads) * d, kv_row = kv_heads * d;
  at::parallel_for(0, tokens, grain(width), [&](int64_t b, int64_t e) {
    std::vector<float> k_row(kv_row);
    for (int64_t t = b; t < e; ++t) {
      const float *x = xp + t * width, *cos = cs + t * 2 * d, *sin = cos + d;
      for (int64_t h = 0; h < num_heads; ++h) rotate(x + h * d, cos, sin, qp + (t * num_heads + h) * d, d);
      for (int64_t h = 0; h < kv_heads; ++h) rotate(x + (num_heads + h) * d, cos, sin, k_row.data() + h * d, d);
      store(k_row.data(), kc + sm[t] * kv_row, kv_row);
      store(x + (num_heads + kv_heads) * d, vc + sm[t] * kv_row, kv_row);
    }
  });
}

at::Tensor rotary_and_write_kv_cache(const at::Tensor& qkv, const at::Tensor& cos_sin, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t num_heads) {
  check_float_rows(qkv, "qkv");
  check_float_rows(cos_sin, "cos_sin");
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(k_cache.device().is_cpu() && k_cache.is_contiguous() && v_cache.device().is_cpu() &&
                  v_cache.is_contiguous() && v_cache.scalar_type() == cache_type &&
                  (cache_type == at::kFloat || cache_type == at::kChar || cache_type == at::kFloat8_e4m3fn),
              "kiln_cpu::rotary_and_write_kv_cache: caches must be contiguous float32, int8 or float8_e4m3fn "
              "CPU tensors");
  TORCH_CHECK(qkv.dim() == 3 && cos_sin.dim() == 3 && cos_sin.size(0) == qkv.size(0) && cos_sin.size(1) == 2 &&
                  cos_sin.size(2) == qkv.size(2),
              "kiln_cpu::rotary_and_write_kv_cache: qkv [T, H + 2 Hk, D] and cos_sin [T, 2, D]");
  const int64_t tokens = qkv.size(0), d = qkv.size(2), kv_heads = (qkv.size(1) - num_heads) / 2;
  TORCH_CHECK(d % 2 == 0 && kv_heads > 0 && num_heads + 2 * kv_heads == qkv.size(1),
              "kiln_cpu::rotary_and_write_kv_cache: head counts do not add up");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == kv_heads && k_cache.size(3) == d &&
                  v_cache.sizes() == k_cache.sizes(),
              "kiln_cpu::rotary_and_write_kv_cache: caches must be [blocks, block_size, Hk, D]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == tokens,
              "kiln_cpu::rotary_and_write_kv_cache: slot_mapping must be [T] int64");
  const int64_t slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* sm = slot_mapping.data_ptr<int64_t>();
  // A slot outside the cache: nothing is written and the result is empty, which the caller turns into an
  // error. (Not a TORCH_CHECK: torch 2.11 crashes when an op that mutates its arguments throws.)
  for (int64_t t = 0; t < tokens; ++t)
    if (sm[t] < 0 || sm[t] >= slots) return at::empty({0}, qkv.options());
  at::Tensor q = at::empty({tokens, num_heads, d}, qkv.options());
  const float *xp = qkv.data_ptr<float>(), *cs = cos_sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  if (cache_type == at::kChar)
    rotate_and_store(xp, cs, qp, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), sm, tokens, num_heads,
                     kv_heads, d);
  else if (cache_type == at::kFloat8_e4m3fn)
    rotate_and_store(xp, cs, qp, k_cache.data_ptr<c10::Float8_e4m3fn>(), v_cache.data_ptr<c10::Float8_e4m3fn>(), sm,
                     tokens, num_heads, kv_heads, d);
  else
    rotate_and_store(xp, cs, qp, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), sm, tokens, num_heads,
                     kv_heads, d);
  return q;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary_and_write_kv_cache(Tensor qkv, Tensor cos_sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, int num_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_and_write_kv_cache", &rotary_and_write_kv_cache);
}
