// The few-row float32 product's inner tile (kiln/ops/cpu_layer_ops/few_rows_linear.cpp) alone, in four forms:
// R weight rows x MT activation rows of accumulators, with the loaded vectors left to the compiler or held in
// registers (the kernel's in_register). Single thread, AVX2 (8-float vectors), SmolLM2's gate/up shape (3,072 x 576)
// and its logits (49,152 x 576) at 16 activation rows, five rounds; GFLOP/s per variant.
//   g++ -O3 -march=native -o /tmp/few_rows_tiles benchmarks/cpu_few_rows_tiles.cpp && /tmp/few_rows_tiles
// (-march=haswell instead shows how the same source fares under GCC's Intel tuning.)
#include <initializer_list>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <chrono>
constexpr int kWidth = 8;
constexpr int64_t kPrefetchAhead = 256;
typedef float vec __attribute__((vector_size(kWidth * sizeof(float))));
inline vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof(v)); return v; }
template <int R, int MT, bool HOLD>
__attribute__((noinline)) void tile(const float* w, const float* x, int64_t K, int64_t N, float* y) {
  vec acc[R][MT] = {};
  for (int64_t k = 0; k < K; k += kWidth) {
    vec wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(w + r * K + k + kPrefetchAhead, 0, 3);
      wv[r] = load(w + r * K + k);
      if (HOLD) asm("" : "+x"(wv[r]));
    }
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      vec xv = load(x + m * K + k);
      if (HOLD) asm("" : "+x"(xv));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][m] += wv[r] * xv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      float s = 0;
      for (int i = 0; i < kWidth; ++i) s += acc[r][m][i];
      y[m * N + r] = s;
    }
}
template <int R, int MT, bool HOLD>
double run(int64_t M, int64_t N, int64_t K, const float* x, const float* w, float* y, int reps) {
  auto t0 = std::chrono::steady_clock::now();
  for (int it = 0; it < reps; ++it)
    for (int64_t n = 0; n + R <= N; n += R)
      for (int64_t m = 0; m < M; m += MT) tile<R, MT, HOLD>(w + n * K, x + m * K, K, N, y + m * N + n);
  auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(t1 - t0).count() / reps;
}
int main() {
  const int64_t K = 576, M = 16;
  for (int round = 0; round < 5; ++round)
  for (int64_t N : {3072, 49152}) {
    float* x = static_cast<float*>(aligned_alloc(64, M * K * 4));
    float* w = static_cast<float*>(aligned_alloc(64, N * K * 4));
    float* y = static_cast<float*>(aligned_alloc(64, M * N * 4));
    for (int64_t i = 0; i < M * K; ++i) x[i] = 0.5f;
    for (int64_t i = 0; i < N * K; ++i) w[i] = 0.25f;
    int reps = N > 10000 ? 5 : 50;
    auto gf = [&](double s) { return 2.0 * M * N * K / s / 1e9; };
    double a = gf(run<2,4,false>(M,N,K,x,w,y,reps)), b = gf(run<2,4,true>(M,N,K,x,w,y,reps)),
           c = gf(run<3,4,false>(M,N,K,x,w,y,reps)), d = gf(run<3,4,true>(M,N,K,x,w,y,reps));
    printf("N%ld M%ld: 2x4 %.0f 2x4hold %.0f 3x4 %.0f 3x4hold %.0f\n", N, M, a, b, c, d);
    free(x); free(w); free(y);
  }
}
