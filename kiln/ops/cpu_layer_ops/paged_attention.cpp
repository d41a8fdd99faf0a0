// Paged attention on the CPU: every query token of a step against its sequence's keys and values where the
// paged cache holds them (no gather), one (token, KV head) pair per task, float32 arithmetic.
//
// Layouts (kiln.ops.reference.paged_attention's): q [T, H, D]; k_cache, v_cache [blocks, block_size, Hk, D]
// in q's dtype, or int8 or float8 e4m3 (a quantized cache, whose scales the build folded into the weights);
// block_tables [S, max_blocks] (int32 or int64); seq_lens [S] and query_start_loc [S + 1] int64. Query token j
// of sequence s (q_len = query_start_loc[s+1] - query_start_loc[s] tokens, L = seq_lens[s] in all) sits at
// position p = L - q_len + j and sees keys 0..p, or only those after p - window with a sliding window.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vector_math.h"

namespace {

using kiln_cpu::exp_nonpositive;

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(c10::Float8_e4m3fn v) { return static_cast<float>(v); }

// A row as float32: float rows in place, others converted into ``buffer``.
inline const float* as_float(const float* src, float* /*buffer*/, int64_t /*n*/) { return src; }
template <typename T>
inline const float* as_float(const T* src, float* buffer, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buffer[i] = to_float(src[i]);
  return buffer;
}

// The target's own vector of floats (16 with AVX-512, 8 with AVX, 4 with SSE or NEON), as a GCC/Clang vector
// type, so that the kernels below need no intrinsics. NOTE: a vector type wider than the target's registers
// is lowered piecewise, and GCC 12 moves its scalar broadcasts and partial results through the stack (16
// stores a broadcast): with 16-float vectors an AVX2 box ran this attention at 3-5 GB/s.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
// Vector registers the held query rows or accumulators may take: half the register file (32 with AVX-512
// or NEON, 16 otherwise), the rest for the streamed rows and the products.
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kHeldRegs = 16;
#else
constexpr int kHeldRegs = 8;
#endif
constexpr int kHeldFloats = kLanes * kHeldRegs;
typedef float fvec __attribute__((vector_size(kLanes * 4)));

inline fvec loadv(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void storev(float* p, fvec v) { std::memcpy(p, &v, sizeof(v)); }
inline fvec splat(float f) { return fvec{} + f; }
inline float sumv(fvec v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// The lane sums of four vectors into out[0..3] (onto them with ``add``). With 8-float AVX vectors, three
// pairwise adds and one add of the halves: about two instructions a key, where a key's own lane-by-lane sum
// took fifteen.
inline void sum4(fvec a0, fvec a1, fvec a2, fvec a3, float* out, bool add) {
#if defined(__AVX__) && !defined(__AVX512F__)
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  if (add) s = _mm_add_ps(s, _mm_loadu_ps(out));
  _mm_storeu_ps(out, s);
#else
  const float s[4] = {sumv(a0), sumv(a1), sumv(a2), sumv(a3)};
  for (int i = 0; i < 4; ++i) out[i] = add ? out[i] + s[i] : s[i];
#endif
}

// A row of scores into its softmax's numerators, exp(s - max), in place; returns their sum. Both loops
// vectorize (vector_math.h's exp needs the extensions' -fno-trapping-math for that).
inline float exp_minus_max(float* row, int64_t count) {
  float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
  for (int64_t i = 0; i < count; ++i) top = row[i] > top ? row[i] : top;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) {
    row[i] = exp_nonpositive(row[i] - top);
    sum += row[i];
  }
  return sum;
}

// The query rows run_rows holds in registers together for a head size it unrolls (64 or 128): slices of at
// most kHeldFloats floats, as many rows as fill them.
constexpr int held_slice(int64_t dim) { return dim < kHeldFloats ? int(dim) : kHeldFloats; }
constexpr int held_rows(int64_t dim) { return kHeldFloats / held_slice(dim); }

// The scores of GB query rows (q, a row every ``q_stride`` floats, scaled) against n keys (k, a row every
// ``stride`` floats), over S floats of the head (a slice; ``add``: onto the scores of the earlier slices):
// the query slices stay in registers while the keys stream past, each key read once for all of them.
template <int S, int GB>
void chunk_scores(const float* q, int64_t q_stride, const float* k, int64_t n, int64_t stride, float* out,
                  int64_t out_stride, bool add) {
  constexpr int C = S / kLanes;
  fvec qv[GB][C];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = loadv(q + g * q_stride + c * kLanes);
  int64_t j = 0;
  if constexpr (GB == 1) {  // one query row held: four keys a pass, their sums reduced together
    for (; j + 4 <= n; j += 4, k += 4 * stride) {
      fvec acc[4];
      for (int i = 0; i < 4; ++i) acc[i] = qv[0][0] * loadv(k + i * stride);
      for (int c = 1; c < C; ++c)
        for (int i = 0; i < 4; ++i) acc[i] += qv[0][c] * loadv(k + i * stride + c * kLanes);
      sum4(acc[0], acc[1], acc[2], acc[3], out + j, add);
    }
  }
  for (; j < n; ++j, k += stride) {
    for (int g = 0; g < GB; ++g) {
      fvec acc = qv[g][0] * loadv(k);
      for (int c = 1; c < C; ++c) acc += qv[g][c] * loadv(k + c * kLanes);
      const float s = sumv(acc);
      out[g * out_stride + j] = add ? out[g * out_stride + j] + s : s;
    }
  }
}

// acc (GB rows, a row every ``acc_stride`` floats, S of them: a slice of the head) += p[g][j] * v[j] over n
// value rows (a row every ``stride`` floats); the accumulators stay in registers for the run.
template <int S, int GB>
void chunk_values(const float* p, int64_t p_stride, const float* v, int64_t n, int64_t stride, float* acc,
                  int64_t acc_stride) {
  constexpr int C = S / kLanes;
  fvec av[GB][C];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < C; ++c) av[g][c] = loadv(acc + g * acc_stride + c * kLanes);
  for (int64_t j = 0; j < n; ++j, v += stride) {
    for (int g = 0; g < GB; ++g) {
      const fvec w = splat(p[g * p_stride + j]);
      for (int c = 0; c < C; ++c) av[g][c] += w * loadv(v + c * kLanes);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < C; ++c) storev(acc + g * acc_stride + c * kLanes, av[g][c]);
}

// Any head size: the same products, vectorized by the compiler over the head.
void rows_scores(const float* q, int64_t group, int64_t dim, const float* k, int64_t n, int64_t stride, float* out,
                 int64_t out_stride) {
  for (int64_t j = 0; j < n; ++j, k += stride)
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * dim;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < dim; ++d) s += qg[d] * k[d];
      out[g * out_stride + j] = s;
    }
}
void rows_values(const float* p, int64_t p_stride, int64_t group, int64_t dim, const float* v, int64_t n,
                 int64_t stride, float* acc) {
  for (int64_t j = 0; j < n; ++j, v += stride)
    for (int64_t g = 0; g < group; ++g) {
      const float w = p[g * p_stride + j];
      float* a = acc + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) a[d] += w * v[d];
    }
}

// A run of keys (or values) against all ``group`` query rows: head sizes 64 and 128 in chunks of query rows
// whose slices fit the held registers (kHeldFloats: 4 rows of 64 or 2 of 128 with AVX-512; one row, in
// slices of 64, with AVX2), any other size by the plain loops.
template <bool Values>
void run_rows(const float* qp, int64_t q_stride, int64_t group, int64_t dim, const float* rows, int64_t n,
              int64_t stride, float* out) {
  const auto chunks = [&](auto d_tag) {
    constexpr int D = decltype(d_tag)::value;
    constexpr int S = held_slice(D);  // a slice of the head
    constexpr int GB = held_rows(D);  // query rows a chunk
    for (int64_t g = 0; g < group;) {
      const int64_t left = group - g;
      const auto one = [&](auto gb_tag) {
        constexpr int B = decltype(gb_tag)::value;
        for (int d = 0; d < D; d += S) {
          if constexpr (Values)
            chunk_values<S, B>(qp + g * q_stride, q_stride, rows + d, n, stride, out + g * D + d, D);
          else
            chunk_scores<S, B>(qp + g * D + d, D, rows + d, n, stride, out + g * q_stride, q_stride, d > 0);
        }
        g += B;
      };
      if (left >= GB)
        one(std::integral_constant<int, GB>());
      else if (GB > 3 && left == 3)
        one(std::integral_constant<int, (GB > 3 ? 3 : 1)>());
      else if (GB > 2 && left == 2)
        one(std::integral_constant<int, (GB > 2 ? 2 : 1)>());
      else
        one(std::integral_constant<int, 1>());
    }
  };
  if (dim == 64)
    chunks(std::integral_constant<int, 64>());
  else if (dim == 128)
    chunks(std::integral_constant<int, 128>());
  else if constexpr (Values)
    rows_values(qp, q_stride, group, dim, rows, n, stride, out);
  else
    rows_scores(qp, group, dim, rows, n, stride, out, q_stride);
}

// Each task is one (query token, KV head), or where those are fewer than four a thread, one chunk of that
// head's query rows as run_rows holds them together (one row with AVX2): its query heads against the keys
// it sees, walked block by block through the table (no division per key), scores, softmax, then the values.
// (A decode step of one sequence has only a few KV heads: SmolLM2's 3 left one of two threads idle a third
// of the time; its 9 single rows split 5 + 4, each row reading the keys and values it would have read anyway.)
template <typename T, typename C, typename I>
void attend(const T* q, const C* k_cache, const C* v_cache, const I* block_tables, const int64_t* seq_lens,
            const int64_t* query_start_loc, int64_t num_seqs, int64_t num_tokens, int64_t heads, int64_t heads_kv,
            int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale, int64_t window, T* out) {
  const int64_t group = heads / heads_kv;
  const int64_t held = head_dim == 64 || head_dim == 128 ? held_rows(head_dim) : group;
  const int64_t task_rows = num_tokens * heads_kv < 4 * at::get_num_threads() ? std::min(held, group) : group;
  const int64_t chunks = (group + task_rows - 1) / task_rows;  // tasks a (token, KV head)
  // Each token's sequence, from the offsets.
  std::vector<int64_t> seq_of(num_tokens);
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int64_t t = query_start_loc[s]; t < query_start_loc[s + 1]; ++t) seq_of[t] = s;
  const int64_t kv_row = heads_kv * head_dim;          // one cached token's stride
  const int64_t kv_block = block_size * kv_row;        // one block's stride
  at::parallel_for(0, num_tokens * heads_kv * chunks, 1, [&](int64_t begin, int64_t end) {
    constexpr bool kFloatCache = std::is_same_v<C, float>;
    // A run of converted keys or values (caches in another type than float32); a float32 cache is read in place.
    std::vector<float> qf(task_rows * head_dim), acc(task_rows * head_dim),
        run(kFloatCache ? 0 : block_size * head_dim), scores, sums(task_rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / (heads_kv * chunks), hk = task / chunks % heads_kv;
      const int64_t head0 = hk * group + task % chunks * task_rows;  // the task's first query head
      const int64_t rows = std::min(task_rows, (hk + 1) * group - head0);
      const int64_t s = seq_of[t];
      const int64_t q_len = query_start_loc[s + 1] - query_start_loc[s];
      const int64_t pos = seq_lens[s] - q_len + (t - query_start_loc[s]);
      const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t count = pos + 1 - first;
      for (int64_t g = 0; g < rows; ++g) {  // the query rows, scaled once here instead of every score
        const T* row = q + (t * heads + head0 + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) qf[g * head_dim + d] = to_float(row[d]) * scale;
      }
      scores.resize(rows * count);
      const I* table = block_tables + s * max_blocks;
      // Keys first..pos, a block's run at a time, as float32 rows: (rows, their stride, keys in the run,
      // index of the first).
      const auto for_each_run = [&](const C* cache, auto&& body) {
        for (int64_t i = 0; i < count;) {
          const int64_t key = first + i;
          const int64_t slot = key % block_size;
          const int64_t n = std::min(block_size - slot, count - i);
          const C* src = cache + static_cast<int64_t>(table[key / block_size]) * kv_block + slot * kv_row +
                         hk * head_dim;
          if constexpr (kFloatCache) {
            body(src, kv_row, n, i);
          } else {
            for (int64_t j = 0; j < n; ++j) as_float(src + j * kv_row, run.data() + j * head_dim, head_dim);
            body(run.data(), head_dim, n, i);
          }
          i += n;
        }
      };
      for_each_run(k_cache, [&](const float* keys, int64_t stride, int64_t n, int64_t i) {
        run_rows<false>(qf.data(), count, rows, head_dim, keys, n, stride, scores.data() + i);
      });
      for (int64_t g = 0; g < rows; ++g) sums[g] = exp_minus_max(scores.data() + g * count, count);
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_run(v_cache, [&](const float* values, int64_t stride, int64_t n, int64_t i) {
        run_rows<true>(scores.data() + i, count, rows, head_dim, values, n, stride, acc.data());
      });
      for (int64_t g = 0; g < rows; ++g) {
        T* o = out + (t * heads + head0 + g) * head_dim;
        const float inv = 1.f / sums[g];
        for (int64_t d = 0; d < head_dim; ++d) o[d] = static_cast<T>(acc[g * head_dim + d] * inv);
      }
    }
  });
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale, int64_t window) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "kiln_cpu::paged_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [tokens, heads, head_dim] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous [blocks, block_size, kv_heads, head_dim] tensors");
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == cache_type &&
                  (cache_type == q.scalar_type() || cache_type == at::kChar || cache_type == at::kFloat8_e4m3fn),
              "the caches must be in q's dtype, int8 or float8_e4m3fn");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "head counts or sizes disagree");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.is_contiguous() &&
                  (block_tables.scalar_type() == at::kInt || block_tables.scalar_type() == at::kLong),
              "block_tables must be a contiguous int32 or int64 [seqs, max_blocks] tensor");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && query_start_loc.scalar_type() == at::kLong &&
                  seq_lens.is_contiguous() && query_start_loc.is_contiguous() &&
                  query_start_loc.numel() == seq_lens.numel() + 1 && block_tables.size(0) >= seq_lens.numel(),
              "seq_lens [S] and query_start_loc [S + 1] must be contiguous int64 tensors");
  const int64_t num_seqs = seq_lens.numel(), num_tokens = q.size(0);
  TORCH_CHECK(query_start_loc.data_ptr<int64_t>()[num_seqs] == num_tokens, "query_start_loc must end at the token count");
  at::Tensor out = at::empty_like(q);
  const auto run = [&](auto* qp, auto* kp, auto* vp, auto* op) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(qp)>>;
    using C = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    if (block_tables.scalar_type() == at::kInt)
      attend<T, C, int32_t>(qp, kp, vp, block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int64_t>(),
                            query_start_loc.data_ptr<int64_t>(), num_seqs, num_tokens, q.size(1), k_cache.size(2),
                            q.size(2), k_cache.size(1), block_tables.size(1), static_cast<float>(scale), window, op);
    else
      attend<T, C, int64_t>(qp, kp, vp, block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                            query_start_loc.data_ptr<int64_t>(), num_seqs, num_tokens, q.size(1), k_cache.size(2),
                            q.size(2), k_cache.size(1), block_tables.size(1), static_cast<float>(scale), window, op);
  };
  // The cache as its element type, then q's.
  const auto with_cache = [&](auto* qp, auto* op) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(qp)>>;
    if (cache_type == at::kChar)
      run(qp, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), op);
    else if (cache_type == at::kFloat8_e4m3fn)
      run(qp, k_cache.data_ptr<c10::Float8_e4m3fn>(), v_cache.data_ptr<c10::Float8_e4m3fn>(), op);
    else
      run(qp, k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), op);
  };
  switch (q.scalar_type()) {
    case at::kFloat:
      with_cache(q.data_ptr<float>(), out.data_ptr<float>());
      break;
    case at::kBFloat16:
      with_cache(q.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
      break;
    case at::kHalf:
      with_cache(q.data_ptr<c10::Half>(), out.data_ptr<c10::Half>());
      break;
    default:
      TORCH_CHECK(false, "kiln_cpu::paged_attention: float32, bfloat16 or float16 only");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
