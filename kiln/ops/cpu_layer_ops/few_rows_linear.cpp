// y = x @ w.T in float32 for the few rows of a decode step (x [M, K], M <= 16; w [N, K], both contiguous).
//
// At a few rows the product is bound by reading the weight, and the default path (MKL over [out, in]) reads it at
// 26 GB/s for one row but 13, 10 and 8 for four, eight and sixteen on a 2-core Xeon (SmolLM2's 540 MB of weights
// in 21, 42, 56 and 65 ms; benchmarks/cpu_matvec_threads.py). Here each weight row is read from memory once: a tile of
// kRows weight rows (kRowsOne for a single activation row) is loaded kWidth floats at a time and multiplied into
// every activation row of a tile of up to four (accumulators kRows x 4 in registers); further activation tiles
// read the same weight rows again from the L1/L2 cache. Output rows are split over torch's threads.
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

#if defined(__AVX512F__)
constexpr int kWidth = 16;  // floats per vector register
constexpr int kRows = 4;    // weight rows per tile: 4 x 4 accumulators, 4 weight vectors, 1 activation
constexpr int kRowsOne = 4;  // the same for one activation row
#else
constexpr int kWidth = 8;
constexpr int kRows = 3;    // 16 registers (AVX2): 3 x 4 accumulators, 3 weight vectors, 1 activation
// One activation row reads the weights from memory, at the same speed with any tile; 2 weight streams a thread
// read them 5-10% faster than 3 on a 2-vCPU Zen 3 (SmolLM2's products of a batch-1 step: 24.5-27.7 against
// 27.8-29.3 ms).
constexpr int kRowsOne = 2;
#endif
constexpr int kActRows = 4;
constexpr int64_t kPrefetchAhead = 256;  // floats
constexpr int64_t kMaxRows = 16;

typedef float vec __attribute__((vector_size(kWidth * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Keeps a loaded vector in one of AVX2's 16 registers. Without it GCC, tuning for Zen (-march=native there), folds
// each activation load into every multiply-add that reads it (3 loads where 1 does) and spills accumulators to the
// stack to make room for the weights: the 3 x 4 tile then ran at 29-33 GFLOP/s a thread, and at 44-56 with the
// vectors held (Zen 3, SmolLM2's gate/up shape at 16 rows). AVX-512's 32 registers leave no such pressure, and its
// builds, timed on other boxes, are left as they were.
inline void in_register(vec& v) {
#if defined(__GNUC__) && defined(__AVX__) && !defined(__AVX512F__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

inline float sum(vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  const __m256 a = reinterpret_cast<__m256>(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  float total = 0.f;
  for (int i = 0; i < kWidth; ++i) total += v[i];
  return total;
#endif
}

// Weight rows w[0 .. R) (each K floats, row stride K) against activation rows x[0 .. MT); y[m * N + r].
template <int R, int MT>
void tile(const float* w, const float* x, int64_t K, int64_t N, float* y) {
  vec acc[R][MT] = {};
  const int64_t body = K - K % kWidth;
  for (int64_t k = 0; k < body; k += kWidth) {
    vec wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      // Each row's stream a few cache lines ahead: the hardware prefetcher alone ramps up too slowly over
      // rows a few KB long.
      __builtin_prefetch(w + r * K + k + kPrefetchAhead, 0, 3);
      wv[r] = load(w + r * K + k);
      in_register(wv[r]);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      vec xv = load(x + m * K + k);
      in_register(xv);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][m] += wv[r] * xv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      float total = sum(acc[r][m]);
      for (int64_t k = body; k < K; ++k) total += w[r * K + k] * x[m * K + k];
      y[m * N + r] = total;
    }
}

template <int R>
void rows_tile(int mt, const float* w, const float* x, int64_t K, int64_t N, float* y) {
  switch (mt) {
    case 1: return tile<R, 1>(w, x, K, N, y);
    case 2: return tile<R, 2>(w, x, K, N, y);
    case 3: return tile<R, 3>(w, x, K, N, y);
    default: return tile<R, 4>(w, x, K, N, y);
  }
}

// y [M, N] = x [M, K] @ w [N, K]^T in tiles of R weight rows, split over torch's threads.
template <int R>
void product(const float* xp, const float* wp, float* yp, int64_t M, int64_t K, int64_t N) {
  // Enough tiles per task that waking a thread pays.
  const int64_t tiles = (N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(K * R * M, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * R;
      for (int64_t m = 0; m < M; m += kActRows) {
        const int mt = int(std::min<int64_t>(kActRows, M - m));
        if (n + R <= N) {
          rows_tile<R>(mt, wp + n * K, xp + m * K, K, N, yp + m * N + n);
        } else {
          for (int64_t r = n; r < N; ++r) rows_tile<1>(mt, wp + r * K, xp + m * K, K, N, yp + m * N + r);
        }
      }
    }
  });
}

at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.scalar_type() == at::kFloat &&
                  w.scalar_type() == at::kFloat && x.is_contiguous() && w.is_contiguous() && x.dim() == 2 &&
                  w.dim() == 2 && x.size(1) == w.size(1),
              "kiln_cpu::few_rows_linear: x [M, K] and w [N, K] must be contiguous float32 CPU tensors");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M <= kMaxRows, "kiln_cpu::few_rows_linear: at most ", kMaxRows, " rows, got ", M);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M == 1)
    product<kRowsOne>(xp, wp, yp, M, K, N);
  else
    product<kRows>(xp, wp, yp, M, K, N);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) { m.def("few_rows_linear(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) { m.impl("few_rows_linear", &few_rows_linear); }
