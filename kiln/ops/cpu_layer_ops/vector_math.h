// Float arithmetic the CPU kernels share, written so that a loop over a row vectorizes (glibc's expf does not;
// GCC needs -fno-trapping-math, which kiln.ops.cpp_extension passes, to if-convert the clamps).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace kiln_cpu {

// exp(x) for x in [lo, 88], clamped below to lo (lo >= -87 keeps the result a normal float): x = n ln2 + r
// with |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 7 (relative error under 1e-7, below float32's
// rounding), 2^n written into the exponent bits.
inline float exp_clamped(float x, float lo) {
  x = std::min(std::max(x, lo), 88.f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// exp(x) for the softmax's x <= 0; below -87 it is e^-87 (about 1.6e-38), as good as 0 beside the top's 1.
inline float exp_nonpositive(float x) { return exp_clamped(std::min(x, 0.f), -87.f); }

// x * sigmoid(x) = x / (1 + e^-x); e^-x clamped to [e^-87, e^88], where the quotient is x or 0 to float32's
// precision.
inline float silu(float x) { return x / (1.f + exp_clamped(-x, -87.f)); }

}  // namespace kiln_cpu
