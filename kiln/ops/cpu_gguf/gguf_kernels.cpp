// x @ dequant(w).T over GGUF block-quantized weights, read in place (llama.cpp's way on a CPU).
//
// Each call quantizes the activation rows once to int8 (a float scale per 32 values for the
// 32-weight formats, as ggml's Q8_0; per 256 for the K-quants, as Q8_K), or to int16 with the same
// groups for q4_0, q4_1, q8_0 and q4_k (act_bits 16, finer than bfloat16), and takes integer dot
// products against the weight blocks, applying the blocks' float scales once per block. Weights
// are unpacked to unsigned bytes (a 4-bit nibble as 0..15, q8_0 shifted by 128), which is what
// the u8 x s8 dot instructions take; the offset a format subtracts (8 for q4_0, 32 for q6_k, a
// K-quant's min) then comes back as coef * (activation scale * sum of the activation's int8
// values): one float per 16 or 32 weights kept aside and dotted once per output at the end.
//
// A decode step (one activation row) reads every weight byte once and is bound by memory; output
// rows are split over torch's threads. With several activation rows each unpacked weight block
// meets up to kRowTile rows while it is in registers, so the cost grows much slower than M. The
// quantized activations are stored block-major ([block][row][values]) so that the rows of a tile
// sit at fixed offsets from one pointer.
#include "gguf_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace kiln_gguf {

FormatInfo format_info(Format fmt) {
  switch (fmt) {
    case Format::Q4_0: return {32, 18};
    case Format::Q4_1: return {32, 20};
    case Format::Q8_0: return {32, 34};
    case Format::Q4_K: return {256, 144};
    case Format::Q5_K: return {256, 176};
    case Format::Q6_K: return {256, 210};
  }
  return {0, 0};
}

const char* isa_name() { return KILN_GGUF_ISA; }

namespace {

// Enough multiply-adds per task that waking a thread pays for itself.
constexpr int64_t kMinTaskWork = int64_t(1) << 16;

// ---------------------------------------------------------------------------------------------
// Activations

struct QuantizedActs {
  int64_t M = 0;
  int64_t K = 0;
  int64_t group = 0;      // values per float scale: the weight format's block
  int64_t sum_group = 0;  // values per entry of s: the granularity of the format's offsets
  std::unique_ptr<int8_t[]> q;     // [K / group][M][group], int8 activations
  std::unique_ptr<int16_t[]> q16;  // the same layout, int16 activations (matmul's act_bits 16)
  std::unique_ptr<float[]> d;   // [K / group][M]
  std::unique_ptr<float[]> s;   // [M][K / sum_group]: d * (sum of q over the sum group)

  const float* s_row(int64_t m) const { return s.get() + m * (K / sum_group); }
};

// One scale group to T (int8 or int16) with d = max|x| / kTop, in plain C++: rounding to nearest, half to
// even, as cvtps_epi32 does on quantize_group's SIMD path.
template <typename T, int kTop>
void quantize_group_plain(const float* x, int64_t n, int64_t sum_group, T* q, float* d, float* s) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float dd = amax / float(kTop);
  const float inv = amax > 0.0f ? float(kTop) / amax : 0.0f;
  *d = dd;
  for (int64_t g = 0; g < n; g += sum_group) {
    int32_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t i = g; i < g + sum_group; ++i) {
      const int32_t v = std::min(kTop, std::max(-kTop, int32_t(std::nearbyint(x[i] * inv))));
      q[i] = T(v);
      total += v;
    }
    s[g / sum_group] = dd * float(total);
  }
}

// One scale group (a multiple of 32 values) to int8 with d = max|x| / 127, rounding to nearest.
void quantize_group(const float* x, int64_t n, int64_t sum_group, int8_t* q, float* d, float* s) {
#ifdef KILN_GGUF_AVX2
  __m256 vmax = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float amax = _mm_cvtss_f32(m);
  const float dd = amax / 127.0f;
  const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  *d = dd;
  // packs_epi32 then packs_epi16 interleave the four vectors by 32-bit chunks; this undoes it.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = 0; i < n; i += 32) {
    const __m256i v0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
    const __m256i v1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), inv));
    const __m256i v2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), inv));
    const __m256i v3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), inv));
    if (sum_group == 32) {
      s[i / 32] = dd * float(hsum_i32(_mm256_add_epi32(_mm256_add_epi32(v0, v1), _mm256_add_epi32(v2, v3))));
    } else {
      s[i / 16] = dd * float(hsum_i32(_mm256_add_epi32(v0, v1)));
      s[i / 16 + 1] = dd * float(hsum_i32(_mm256_add_epi32(v2, v3)));
    }
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v0, v1), _mm256_packs_epi32(v2, v3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(packed, order));
  }
#else
  quantize_group_plain<int8_t, 127>(x, n, sum_group, q, d, s);
#endif
}

QuantizedActs quantize_acts(const float* x, int64_t M, int64_t K, int64_t group, int64_t sum_group, bool wide) {
  QuantizedActs a;
  a.M = M;
  a.K = K;
  a.group = group;
  a.sum_group = sum_group;
  if (wide)
    a.q16.reset(new int16_t[M * K]);
  else
    a.q.reset(new int8_t[M * K]);
  a.d.reset(new float[M * (K / group)]);
  a.s.reset(new float[M * (K / sum_group)]);
  const int64_t groups = K / group;
  at::parallel_for(0, M, std::max<int64_t>(1, kMinTaskWork / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t g = 0; g < groups; ++g) {
        const float* xg = x + m * K + g * group;
        float* d = a.d.get() + g * M + m;
        float* sg = a.s.get() + m * (K / sum_group) + g * (group / sum_group);
        if (wide)
          quantize_group_plain<int16_t, 32767>(xg, group, sum_group, a.q16.get() + (g * M + m) * group, d, sg);
        else
          quantize_group(xg, group, sum_group, a.q.get() + (g * M + m) * group, d, sg);
      }
    }
  });
  return a;
}

// Q4_K and Q5_K pack eight 6-bit scales and eight 6-bit mins into 12 bytes: bytes 0-3 hold the low
// six bits of scales 0-3, bytes 4-7 those of mins 0-3, and the top two bits of bytes 0-7 with the
// nibbles of bytes 8-11 make up scales and mins 4-7. Returned as two 8-byte words each.
struct KScales {
  uint64_t sc;
  uint64_t mn;
};

inline KScales unpack_k_scales(const uint8_t* p) {
  uint8_t sc[8], mn[8];
  for (int j = 0; j < 4; ++j) {
    sc[j] = p[j] & 63;
    mn[j] = p[j + 4] & 63;
    sc[j + 4] = (p[j + 8] & 0x0f) | ((p[j] >> 6) << 4);
    mn[j + 4] = (p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4);
  }
  KScales out;
  std::memcpy(&out.sc, sc, 8);
  std::memcpy(&out.mn, mn, 8);
  return out;
}

// Every kernel computes out[r * ldo + i] for activation rows m0 + r (r < MT) against weight rows
// w[i] (i < the lanes type's kRows), and uses cw[i] (K / sum_group floats) as scratch for row i's
// offset coefficients; cw[2 + i] is more scratch of that size.
#define KILN_ROWS_ARGS                                                                                      \
  const uint8_t *const *w, int64_t nblocks, const QuantizedActs &a, int64_t m0, float *out, int64_t ldo, \
      float *const *cw

// cw_scale multiplies every offset coefficient, so the block loop can store a scale as it is.
template <class V, int MT>
inline __attribute__((always_inline)) void finish_rows(const float (*tot)[V::kRows], const QuantizedActs& a,
                                                       int64_t m0, float* out, int64_t ldo, float* const* cw,
                                                       float cw_scale = 1.0f) {
  const int64_t ncw = a.K / a.sum_group;
  for (int r = 0; r < MT; ++r)
    for (int i = 0; i < V::kRows; ++i)
      out[r * ldo + i] = tot[r][i] + cw_scale * dot_f32(cw[i], a.s_row(m0 + r), ncw);
}

#ifdef KILN_GGUF_AVX2

// ---------------------------------------------------------------------------------------------
// 32-weight formats

// How far ahead of the block in hand each weight row's stream is prefetched. Decode does little
// work per byte, so a core waits on memory unless loads are in flight well ahead of it: this
// took decode from 5 to 10 GB/s a core (the hardware prefetcher alone ramps up too slowly over
// rows a few hundred bytes long). 4096 measured slower, probably loads aliasing stores 4 KiB apart.
constexpr int64_t kPrefetchAhead = 4352;

template <int kRows>
inline void prefetch_rows(const uint8_t* const* w, int64_t off, int64_t bytes) {
  for (int i = 0; i < kRows; ++i)
    for (int64_t o = 0; o < bytes; o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w[i] + off + o + kPrefetchAhead), _MM_HINT_T0);
}

struct Q4_0Block {
  static constexpr int64_t kBytes = 18;
  // Byte j holds weights j (low nibble) and j + 16 (high nibble).
  template <class V>
  static typename V::I unpack(const uint8_t* const* w, int64_t off) {
    return v_and(V::nibbles16(w, off + 2), V::splat8(0x0f));
  }
  template <class V>
  static typename V::I dot(typename V::I wq, typename V::I x) { return v_dot_u8s8(V::zero(), wq, x); }
  // The offset is -8 * d: the block loop keeps d, the end multiplies.
  static constexpr bool kOffsetIsScale = true;
  static constexpr float kOffsetScale = -8.0f;
};

struct Q4_1Block {
  static constexpr int64_t kBytes = 20;
  template <class V>
  static typename V::I unpack(const uint8_t* const* w, int64_t off) {
    return v_and(V::nibbles16(w, off + 4), V::splat8(0x0f));
  }
  template <class V>
  static typename V::I dot(typename V::I wq, typename V::I x) { return v_dot_u8s8(V::zero(), wq, x); }
  // The offset is the block's m (fp16 after d).
  static constexpr bool kOffsetIsScale = false;
  static constexpr float kOffsetScale = 1.0f;
};

struct Q8_0Block {
  static constexpr int64_t kBytes = 34;
#ifdef KILN_GGUF_VNNI
  // w + 128 as unsigned; the 128 comes back through the offset.
  template <class V>
  static typename V::I unpack(const uint8_t* const* w, int64_t off) {
    return v_xor(V::bytes32(w, off + 2), V::splat8(int8_t(0x80)));
  }
  template <class V>
  static typename V::I dot(typename V::I wq, typename V::I x) { return v_dot_u8s8(V::zero(), wq, x); }
  static constexpr bool kOffsetIsScale = true;
  static constexpr float kOffsetScale = -128.0f;
#else
  // maddubs would saturate on 255 * 127 * 2, so the weights' signs move onto the activations.
  template <class V>
  static typename V::I unpack(const uint8_t* const* w, int64_t off) { return V::bytes32(w, off + 2); }
  template <class V>
  static __m256i dot(__m256i wq, __m256i x) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(x, wq));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  }
  static constexpr bool kOffsetIsScale = true;
  static constexpr float kOffsetScale = 0.0f;
#endif
};

template <class V, class B, int MT>
void rows_q32(KILN_ROWS_ARGS) {
  using I = typename V::I;
  using F = typename V::F;
  F acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = V::fzero();
  const int8_t* xq = a.q.get() + m0 * 32;
  const float* xd = a.d.get() + m0;
  // The blocks' scales: in cw itself where the offset is a multiple of them, else beside it.
  float* const* ds = B::kOffsetIsScale ? cw : cw + 2;
  for (int64_t b = 0; b < nblocks; ++b, xq += a.M * 32, xd += a.M) {
    const int64_t off = b * B::kBytes;
    // Blocks smaller than half a cache line: one prefetch every other block still touches each line.
    if (B::kBytes > 32 || (b & 1) == 0) prefetch_rows<V::kRows>(w, off, B::kBytes);
    const I wq = B::template unpack<V>(w, off);
    for (int i = 0; i < V::kRows; ++i) {
      const __m128 dm = fp16x4_at(w[i] + off);  // d, then q4_1's m
      ds[i][b] = _mm_cvtss_f32(dm);
      if constexpr (!B::kOffsetIsScale) cw[i][b] = _mm_cvtss_f32(_mm_movehdup_ps(dm));
    }
    // Read back from memory: broadcasting from there costs no shuffle.
    const F vd = V::rows_at(ds, b);
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) {
      const I p = B::template dot<V>(wq, V::act(xq + 32 * r));
      acc[r] = v_fma(v_cvt(p), v_mul(vd, V::splat(xd[r])), acc[r]);
    }
  }
  float tot[MT][V::kRows];
#pragma GCC unroll 8
  for (int r = 0; r < MT; ++r) V::hsum_rows(acc[r], tot[r]);
  finish_rows<V, MT>(tot, a, m0, out, ldo, cw, B::kOffsetScale);
}

// ---------------------------------------------------------------------------------------------
// K-quants: 256-weight super-blocks of sub-blocks with 6-bit (Q4_K, Q5_K) or 8-bit (Q6_K) scales.
// A sub-block's products go through int16 (maddubs), are scaled by the sub-block's integer scale
// with a 16-bit multiply-add, and the float scales apply once per super-block.

// Shuffle control that copies int16 lane j of each 128-bit lane to all eight lanes of that lane.
template <class V>
inline typename V::I broadcast_word(int j) { return V::splat16(int16_t(((2 * j + 1) << 8) | (2 * j))); }

// Bit j of every byte moved to bit 4 (other bits are left for the caller to mask).
template <class I>
inline I bit_to_4(I v, int j) {
  return j < 4 ? v_slli16(v, 4 - j) : j > 4 ? v_srli16(v, j - 4) : v;
}

// A Q4_K / Q5_K super-block's eight 6-bit scales (the low 8 bytes of the result), and its offsets'
// coefficients, -dmin * min for each sub-block, stored at cw (8 floats). The same unpacking as
// unpack_k_scales, four bytes at a time (x86 is little-endian).
inline __m128i k_scales_and_offsets(const uint8_t* blk, float* cw) {
  uint32_t u[3];
  std::memcpy(u, blk + 4, 12);
  const uint32_t sc_lo = u[0] & 0x3f3f3f3f;
  const uint32_t mn_lo = u[1] & 0x3f3f3f3f;
  const uint32_t sc_hi = (u[2] & 0x0f0f0f0f) | ((u[0] >> 2) & 0x30303030);
  const uint32_t mn_hi = ((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 2) & 0x30303030);
  const __m256 mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, int(mn_hi), int(mn_lo))));
  _mm256_storeu_ps(cw, _mm256_mul_ps(mins, _mm256_set1_ps(-fp16_to_f32(blk + 2))));
  return _mm_set_epi32(0, 0, int(sc_hi), int(sc_lo));
}

template <class V, bool kFive, int MT>
void rows_q45_k(KILN_ROWS_ARGS) {
  using I = typename V::I;
  using F = typename V::F;
  constexpr int64_t kBytes = kFive ? 176 : 144;
  const I low4 = V::splat8(0x0f);
  const I bit4 = V::splat8(0x10);
  F acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = V::fzero();
  const int8_t* xq = a.q.get() + m0 * 256;
  const float* xd = a.d.get() + m0;
  for (int64_t sb = 0; sb < nblocks; ++sb, xq += a.M * 256, xd += a.M) {
    const int64_t off = sb * kBytes;
    prefetch_rows<V::kRows>(w, off, kBytes);
    float d[V::kRows];
    __m128i sc16[V::kRows];
    for (int i = 0; i < V::kRows; ++i) {
      const uint8_t* blk = w[i] + off;
      d[i] = fp16_to_f32(blk);
      sc16[i] = _mm_cvtepu8_epi16(k_scales_and_offsets(blk, cw[i] + 8 * sb));
    }
    const I scales = V::rows128(sc16);
    const int64_t qs = off + (kFive ? 48 : 16);
    const I qh = kFive ? V::bytes32(w, off + 16) : V::zero();
    I isum[MT];
    for (int r = 0; r < MT; ++r) isum[r] = V::zero();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      // 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high ones.
      const I bytes = V::bytes32(w, qs + 32 * c);
      I w0 = v_and(bytes, low4);
      I w1 = v_and(v_srli16(bytes, 4), low4);
      if constexpr (kFive) {
        // Bit j of qh's bytes is the fifth bit of sub-block j: shifted to bit 4 and masked there.
        w0 = v_or(w0, v_and(bit_to_4(qh, 2 * c), bit4));
        w1 = v_or(w1, v_and(bit_to_4(qh, 2 * c + 1), bit4));
      }
      const I s0 = v_shuffle8(scales, broadcast_word<V>(2 * c));
      const I s1 = v_shuffle8(scales, broadcast_word<V>(2 * c + 1));
#pragma GCC unroll 8
      for (int r = 0; r < MT; ++r) {
        const int8_t* xp = xq + 256 * r + 64 * c;
        isum[r] = v_madd16(isum[r], v_maddubs(w0, V::act(xp)), s0);
        isum[r] = v_madd16(isum[r], v_maddubs(w1, V::act(xp + 32)), s1);
      }
    }
    const F vd = V::rows(d);
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) acc[r] = v_fma(v_cvt(isum[r]), v_mul(vd, V::splat(xd[r])), acc[r]);
  }
  float tot[MT][V::kRows];
#pragma GCC unroll 8
  for (int r = 0; r < MT; ++r) V::hsum_rows(acc[r], tot[r]);
  finish_rows<V, MT>(tot, a, m0, out, ldo, cw);
}

template <class V, int MT>
void rows_q6_k(KILN_ROWS_ARGS) {
  using I = typename V::I;
  using F = typename V::F;
  const I low4 = V::splat8(0x0f);
  const I top2 = V::splat8(0x30);
  F acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = V::fzero();
  const int8_t* xq = a.q.get() + m0 * 256;
  const float* xd = a.d.get() + m0;
  for (int64_t sb = 0; sb < nblocks; ++sb, xq += a.M * 256, xd += a.M) {
    // Layout: ql[128] (low nibbles), qh[64] (two high bits), int8 scales[16] (one per 16), fp16 d.
    const int64_t off = sb * 210;
    prefetch_rows<V::kRows>(w, off, 210);
    float d[V::kRows];
    __m128i sc8[V::kRows];
    for (int i = 0; i < V::kRows; ++i) {
      d[i] = fp16_to_f32(w[i] + off + 208);
      sc8[i] = load128(w[i] + off + 192);
      const __m256 m32d = _mm256_set1_ps(-32.0f * d[i]);
      _mm256_storeu_ps(cw[i] + 16 * sb, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8[i])), m32d));
      _mm256_storeu_ps(cw[i] + 16 * sb + 8,
                       _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8[i], 8))), m32d));
    }
    const I sc16 = V::rows_i8_to_i16(sc8);
    I isum[MT];
    for (int r = 0; r < MT; ++r) isum[r] = V::zero();
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      // Each half of 128 weights: ql[64h + l] holds weight l (low nibble) and l + 64 (high), for
      // l < 64; bits 2g, 2g + 1 of qh[32h + l] are the top bits of weight 32g + l. Shifts take
      // the busiest port with 512-bit registers, so the top bits are masked where they land.
      const I l0 = V::bytes32(w, off + 64 * h);
      const I l1 = V::bytes32(w, off + 64 * h + 32);
      const I hi = V::bytes32(w, off + 128 + 32 * h);
      I g[4];
      g[0] = v_or(v_and(l0, low4), v_and(v_slli16(hi, 4), top2));
      g[1] = v_or(v_and(l1, low4), v_and(v_slli16(hi, 2), top2));
      g[2] = v_or(v_and(v_srli16(l0, 4), low4), v_and(hi, top2));
      g[3] = v_or(v_and(v_srli16(l1, 4), low4), v_and(v_srli16(hi, 2), top2));
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        // Scales 2j, 2j + 1 (j = 4h + k) for the two 16-weight halves of this sub-block.
        const int j = 4 * h + k;
        const I sv = V::pick_pair(sc16, sc8, j);
#pragma GCC unroll 8
        for (int r = 0; r < MT; ++r) isum[r] = v_madd16(isum[r], v_maddubs(g[k], V::act(xq + 256 * r + 32 * j)), sv);
      }
    }
    const F vd = V::rows(d);
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) acc[r] = v_fma(v_cvt(isum[r]), v_mul(vd, V::splat(xd[r])), acc[r]);
  }
  float tot[MT][V::kRows];
#pragma GCC unroll 8
  for (int r = 0; r < MT; ++r) V::hsum_rows(acc[r], tot[r]);
  finish_rows<V, MT>(tot, a, m0, out, ldo, cw);
}

template <class V, int MT>
void rows_for(Format fmt, KILN_ROWS_ARGS) {
  switch (fmt) {
    case Format::Q4_0: return rows_q32<V, Q4_0Block, MT>(w, nblocks, a, m0, out, ldo, cw);
    case Format::Q4_1: return rows_q32<V, Q4_1Block, MT>(w, nblocks, a, m0, out, ldo, cw);
    case Format::Q8_0: return rows_q32<V, Q8_0Block, MT>(w, nblocks, a, m0, out, ldo, cw);
    case Format::Q4_K: return rows_q45_k<V, false, MT>(w, nblocks, a, m0, out, ldo, cw);
    case Format::Q5_K: return rows_q45_k<V, true, MT>(w, nblocks, a, m0, out, ldo, cw);
    case Format::Q6_K: return rows_q6_k<V, MT>(w, nblocks, a, m0, out, ldo, cw);
  }
}

// ---------------------------------------------------------------------------------------------
// int16 activations (act_bits 16: q4_0, q4_1, q8_0, q4_k). A scale per block of activations as with int8,
// but 15 bits each, finer than bfloat16's 8: a default candidate (packed_linear's ggml_int16). Weights are
// widened to int16 and multiplied pairwise into int32 (vpmaddwd), one weight row a register on any
// ISA: for the 32-weight formats about the int8 path's instructions a weight without VNNI (unpack, two
// multiply-adds and an add per 32 weights); q4_k's sub-block scales cost an int32 multiply more.

// The int32 pair sums of 32 weights (two vectors of 16 int16) against 32 int16 activations.
inline __m256i dot16x32(__m256i lo, __m256i hi, const int16_t* x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(_mm256_madd_epi16(lo, load256(x)), hi, load256(x + 16));
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(_mm256_madd_epi16(lo, load256(x)), hi, load256(x + 16));
#else
  return _mm256_add_epi32(_mm256_madd_epi16(lo, load256(x)), _mm256_madd_epi16(hi, load256(x + 16)));
#endif
}

// The 32-weight formats: q4_0 and q4_1 (byte j holds weights j and j + 16 in its nibbles) and q8_0 (signed
// bytes in order), each block's 32 weights as two vectors of 16 int16.
template <Format F>
struct Block16 {
  static constexpr int64_t kBytes = F == Format::Q4_1 ? 20 : F == Format::Q4_0 ? 18 : 34;
  static void unpack(const uint8_t* blk, __m256i& lo, __m256i& hi) {
    if constexpr (F == Format::Q8_0) {
      lo = _mm256_cvtepi8_epi16(load128(blk + 2));
      hi = _mm256_cvtepi8_epi16(load128(blk + 18));
    } else {
      const __m256i words = _mm256_cvtepu8_epi16(load128(blk + (F == Format::Q4_1 ? 4 : 2)));
      lo = _mm256_and_si256(words, _mm256_set1_epi16(0x0f));
      hi = _mm256_srli_epi16(words, 4);
    }
  }
  // As rows_q32: q4_0's offset is -8 d (cw holds d), q4_1's its m (cw holds m, the scales go beside);
  // q8_0 has none (cw holds d, times 0).
  static constexpr float kOffsetScale = F == Format::Q4_0 ? -8.0f : F == Format::Q4_1 ? 1.0f : 0.0f;
};

template <Format F, int MT>
void rows16_q32(KILN_ROWS_ARGS) {
  using B = Block16<F>;
  __m256 acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = _mm256_setzero_ps();
  const int16_t* xq = a.q16.get() + m0 * 32;
  const float* xd = a.d.get() + m0;
  float* ds = F == Format::Q4_1 ? cw[2] : cw[0];
  for (int64_t b = 0; b < nblocks; ++b, xq += a.M * 32, xd += a.M) {
    const int64_t off = b * B::kBytes;
    if (B::kBytes > 32 || (b & 1) == 0) prefetch_rows<1>(w, off, B::kBytes);
    const __m128 dm = fp16x4_at(w[0] + off);
    ds[b] = _mm_cvtss_f32(dm);
    if constexpr (F == Format::Q4_1) cw[0][b] = _mm_cvtss_f32(_mm_movehdup_ps(dm));
    __m256i lo, hi;
    B::unpack(w[0] + off, lo, hi);
    const __m256 vd = _mm256_broadcast_ss(ds + b);
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) {
      const __m256i p = dot16x32(lo, hi, xq + 32 * r);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(vd, _mm256_set1_ps(xd[r])), acc[r]);
    }
  }
  float tot[MT][1];
  for (int r = 0; r < MT; ++r) tot[r][0] = hsum(acc[r]);
  finish_rows<Ymm, MT>(tot, a, m0, out, ldo, cw, B::kOffsetScale);
}

template <int MT>
void rows16_q4_k(KILN_ROWS_ARGS) {
  const __m256i low4 = _mm256_set1_epi16(0x0f);
  __m256 acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = _mm256_setzero_ps();
  const int16_t* xq = a.q16.get() + m0 * 256;
  const float* xd = a.d.get() + m0;
  alignas(32) int32_t sc[8];
  for (int64_t sb = 0; sb < nblocks; ++sb, xq += a.M * 256, xd += a.M) {
    const int64_t off = sb * 144;
    prefetch_rows<1>(w, off, 144);
    const uint8_t* blk = w[0] + off;
    _mm256_store_si256(reinterpret_cast<__m256i*>(sc), _mm256_cvtepu8_epi32(k_scales_and_offsets(blk, cw[0] + 8 * sb)));
    // A sub-block's lane sums (4 products of 15 x 32767 at most) times its scale (63 at most), over the
    // 8 sub-blocks: below 2^30, so the super-block sums in int32 and converts once.
    __m256i isum[MT];
    for (int r = 0; r < MT; ++r) isum[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      // 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high ones, weight l in byte l.
      const __m256i wa = _mm256_cvtepu8_epi16(load128(blk + 16 + 32 * c));
      const __m256i wb = _mm256_cvtepu8_epi16(load128(blk + 16 + 32 * c + 16));
      const __m256i lo_a = _mm256_and_si256(wa, low4), lo_b = _mm256_and_si256(wb, low4);
      const __m256i hi_a = _mm256_srli_epi16(wa, 4), hi_b = _mm256_srli_epi16(wb, 4);
      const __m256i s0 = _mm256_set1_epi32(sc[2 * c]), s1 = _mm256_set1_epi32(sc[2 * c + 1]);
#pragma GCC unroll 8
      for (int r = 0; r < MT; ++r) {
        const int16_t* xp = xq + 256 * r + 64 * c;
        isum[r] = _mm256_add_epi32(isum[r], _mm256_mullo_epi32(dot16x32(lo_a, lo_b, xp), s0));
        isum[r] = _mm256_add_epi32(isum[r], _mm256_mullo_epi32(dot16x32(hi_a, hi_b, xp + 32), s1));
      }
    }
    const __m256 vd = _mm256_set1_ps(fp16_to_f32(blk));
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(vd, _mm256_set1_ps(xd[r])), acc[r]);
  }
  float tot[MT][1];
  for (int r = 0; r < MT; ++r) tot[r][0] = hsum(acc[r]);
  finish_rows<Ymm, MT>(tot, a, m0, out, ldo, cw);
}

template <int MT>
void rows16_for(Format fmt, KILN_ROWS_ARGS) {
  switch (fmt) {
    case Format::Q4_0: return rows16_q32<Format::Q4_0, MT>(w, nblocks, a, m0, out, ldo, cw);
    case Format::Q4_1: return rows16_q32<Format::Q4_1, MT>(w, nblocks, a, m0, out, ldo, cw);
    case Format::Q8_0: return rows16_q32<Format::Q8_0, MT>(w, nblocks, a, m0, out, ldo, cw);
    case Format::Q4_K: return rows16_q4_k<MT>(w, nblocks, a, m0, out, ldo, cw);
    default: return;  // matmul refuses the other formats with int16 activations
  }
}

using Lanes16 = Ymm;

#ifdef KILN_GGUF_AVX512
using Lanes = Zmm;
#else
using Lanes = Ymm;
#endif

#else  // no AVX2: one scalar kernel over a decoded block

struct Scalar {
  static constexpr int kRows = 1;
};
using Lanes = Scalar;

// A block decoded for the scalar path: unsigned weights, an integer scale per 16 weights, the
// block's float scale, and the offset coefficients (one per sum group).
struct DecodedBlock {
  uint8_t u[256];
  int32_t isc[16];
  float d;
  float cw[16];
};

void decode_block(Format fmt, const uint8_t* b, DecodedBlock& o) {
  switch (fmt) {
    case Format::Q4_0:
    case Format::Q4_1: {
      const uint8_t* qs = b + (fmt == Format::Q4_0 ? 2 : 4);
      for (int j = 0; j < 16; ++j) {
        o.u[j] = qs[j] & 0x0f;
        o.u[j + 16] = qs[j] >> 4;
      }
      o.d = fp16_to_f32(b);
      o.isc[0] = o.isc[1] = 1;
      o.cw[0] = fmt == Format::Q4_0 ? -8.0f * o.d : fp16_to_f32(b + 2);
      return;
    }
    case Format::Q8_0:
      for (int j = 0; j < 32; ++j) o.u[j] = uint8_t(int(int8_t(b[2 + j])) + 128);
      o.d = fp16_to_f32(b);
      o.isc[0] = o.isc[1] = 1;
      o.cw[0] = -128.0f * o.d;
      return;
    case Format::Q4_K:
    case Format::Q5_K: {
      const bool five = fmt == Format::Q5_K;
      const uint8_t* qh = b + 16;
      const uint8_t* qs = b + (five ? 48 : 16);
      const KScales ks = unpack_k_scales(b + 4);
      uint8_t sc[8], mn[8];
      std::memcpy(sc, &ks.sc, 8);
      std::memcpy(mn, &ks.mn, 8);
      o.d = fp16_to_f32(b);
      const float dmin = fp16_to_f32(b + 2);
      for (int j = 0; j < 8; ++j) {
        o.isc[2 * j] = o.isc[2 * j + 1] = sc[j];
        o.cw[j] = -dmin * float(mn[j]);
        for (int l = 0; l < 32; ++l) {
          uint8_t v = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0f;
          if (five) v |= ((qh[l] >> j) & 1) << 4;
          o.u[32 * j + l] = v;
        }
      }
      return;
    }
    case Format::Q6_K: {
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      o.d = fp16_to_f32(b + 208);
      for (int i = 0; i < 16; ++i) {
        o.isc[i] = sc[i];
        o.cw[i] = -32.0f * o.d * float(sc[i]);
      }
      for (int h = 0; h < 2; ++h)
        for (int g = 0; g < 4; ++g)
          for (int l = 0; l < 32; ++l) {
            const uint8_t low = (ql[64 * h + 32 * (g % 2) + l] >> (4 * (g / 2))) & 0x0f;
            const uint8_t high = (qh[32 * h + l] >> (2 * g)) & 3;
            o.u[128 * h + 32 * g + l] = uint8_t(low | (high << 4));
          }
      return;
    }
  }
}

// Over int8 (Wide false) or int16 activations.
template <class V, int MT, bool Wide = false>
void rows_for(Format fmt, KILN_ROWS_ARGS) {
  const FormatInfo fi = format_info(fmt);
  const int64_t offsets = fi.block / a.sum_group;
  float acc[MT] = {};
  DecodedBlock blk;
  for (int64_t b = 0; b < nblocks; ++b) {
    decode_block(fmt, w[0] + b * fi.bytes, blk);
    for (int64_t c = 0; c < offsets; ++c) cw[0][b * offsets + c] = blk.cw[c];
    for (int r = 0; r < MT; ++r) {
      const int64_t at = (b * a.M + m0 + r) * fi.block;
      const auto* xq = [&] {
        if constexpr (Wide) return a.q16.get() + at; else return a.q.get() + at;
      }();
      int64_t total = 0;  // int16 activations can take a K-quant's sum past int32
      for (int64_t g = 0; g < fi.block / 16; ++g) {
        int32_t part = 0;
        for (int i = 0; i < 16; ++i) part += int32_t(blk.u[16 * g + i]) * int32_t(xq[16 * g + i]);
        total += int64_t(blk.isc[g]) * part;
      }
      acc[r] += blk.d * a.d[b * a.M + m0 + r] * float(total);
    }
  }
  float tot[MT][1];
  for (int r = 0; r < MT; ++r) tot[r][0] = acc[r];
  finish_rows<V, MT>(tot, a, m0, out, ldo, cw);
}

template <int MT>
void rows16_for(Format fmt, KILN_ROWS_ARGS) {
  rows_for<Scalar, MT, true>(fmt, w, nblocks, a, m0, out, ldo, cw);
}

using Lanes16 = Scalar;

#endif

// The kernel instantiated for exactly mt activation rows (1 <= mt <= kRowTile).
template <class V, bool Wide, int MT = 1>
void rows_tile(int mt, Format fmt, KILN_ROWS_ARGS) {
  if constexpr (MT < kRowTile) {
    if (mt != MT) return rows_tile<V, Wide, MT + 1>(mt, fmt, w, nblocks, a, m0, out, ldo, cw);
  }
  if constexpr (Wide)
    rows16_for<MT>(fmt, w, nblocks, a, m0, out, ldo, cw);
  else
    rows_for<V, MT>(fmt, w, nblocks, a, m0, out, ldo, cw);
}

// Output rows n .. n + count - 1 (count <= V::kRows) for all activation rows. A short group (the
// odd row out of two-row kernels) repeats its last row into a scratch output instead of needing
// kernels of its own.
template <class V, bool Wide>
void output_rows(Format fmt, const uint8_t* w, int64_t row_bytes, int64_t n, int64_t count, int64_t N,
                 int64_t nblocks, const QuantizedActs& a, float* y, float* const* cw) {
  const uint8_t* rows[V::kRows];
  for (int i = 0; i < V::kRows; ++i) rows[i] = w + (n + std::min<int64_t>(i, count - 1)) * row_bytes;
  for (int64_t m0 = 0; m0 < a.M; m0 += kRowTile) {
    const int mt = int(std::min<int64_t>(kRowTile, a.M - m0));
    if (count == V::kRows) {
      rows_tile<V, Wide>(mt, fmt, rows, nblocks, a, m0, y + m0 * N + n, N, cw);
    } else {
      float part[kRowTile * V::kRows];
      rows_tile<V, Wide>(mt, fmt, rows, nblocks, a, m0, part, V::kRows, cw);
      for (int r = 0; r < mt; ++r)
        for (int64_t i = 0; i < count; ++i) y[(m0 + r) * N + n + i] = part[r * V::kRows + i];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Weights in rows of four (matmul_rows4, over the layout repack_rows4 makes at load): q4_0, q4_1, q4_k
//
// In GGUF's layout a row's blocks follow one another, so the one-row kernels above apply each block's float
// scales (or, for q4_k, shuffle each sub-block's scale out of a register) one row at a time and sum a
// register's lanes at the end of every row. Repacked, four rows share each block:
// - q4_k (592 bytes a super-block against GGUF's 4 x 144):
//     0   fp16 d of rows 0-3          8   fp16 dmin of rows 0-3
//     16  the eight 6-bit scales as bytes, rows 0, 1, 2, 3
//     48  the eight 6-bit mins as bytes, rows 0, 2, 1, 3 (so a horizontal add lines them up with the sums)
//     80  16 pieces of 32 bytes: piece 4c + k holds quant bytes 32c + 8k .. 32c + 8k + 7 of rows 0, 1, 2, 3
// - q4_0 / q4_1 (72 / 80 bytes a block, GGUF's 4 x 18 / 4 x 20): fp16 d of rows 0-3, q4_1's fp16 m of rows 0-3,
//   then 2 pieces of 32 bytes: piece p holds quant bytes 8p .. 8p + 7 of rows 0, 1, 2, 3.
// One 32-byte load is then 16 weights of each of the four rows (8 in the low nibbles, 8 in the high ones)
// against 8 activation bytes broadcast to all four; the pieces that share a scale add their int16 pair sums
// before one multiply-add by it; the float scales of four rows apply in one instruction, and the four outputs
// come out of one register. With int16 activations each value is split into its high byte (signed) and low
// byte (read unsigned, the weights then the signed operand): two u8 x s8 multiply-adds per weight where int8
// takes one, the same rounding as the int16 kernels, and at one activation row 1.1-1.9x their speed for q4_k
// and 1.1-1.7x for q4_1 on an AVX2-only box (BENCHMARKS). With several activation rows q4_k keeps
// a multiply-add per piece (the int16 sums of every row would not fit the registers).

constexpr int64_t kRows4Ahead = 4736;  // how far ahead of the block in hand the group's stream is prefetched

// The repacked block of a format: its bytes and where its quants start.
struct Rows4Layout {
  int64_t bytes;
  int64_t quants;
};

constexpr Rows4Layout rows4_layout(Format fmt) {
  return fmt == Format::Q4_K ? Rows4Layout{592, 80} : fmt == Format::Q4_1 ? Rows4Layout{80, 16} : Rows4Layout{72, 8};
}

// Activations for matmul_rows4: per group of the format's block (32 or 256 values), int8 values (or the low and
// high bytes of int16 ones), the group's float scale, and each 32 values' sums: for q4_k each part's integer
// sum, for the 32-weight formats d times the value's sum.
struct Rows4Acts {
  int64_t M = 0;
  std::unique_ptr<int8_t[]> lo;  // [group][M][block]: int8 values, or int16 values' low bytes (read unsigned)
  std::unique_ptr<int8_t[]> hi;  // [group][M][block]: int16 values' high bytes (wide only)
  std::unique_ptr<int16_t[]> lo_sums, hi_sums;  // [group][M][8] (q4_k): sums over each 32, at most 32 x 255
  std::unique_ptr<float[]> s;  // [group][M] (q4_0, q4_1): d * the sum of the group's values
  std::unique_ptr<float[]> d;  // [group][M]
};

// q4_k's repacked super-block, and where its fields sit (the layout above): the second fp16 per row (q4_k's dmin,
// also q4_1's m), the scales, the mins, and each row's slot among the mins.
constexpr int64_t kRows4Bytes = rows4_layout(Format::Q4_K).bytes;
constexpr int64_t kRows4Quants = rows4_layout(Format::Q4_K).quants;
constexpr int64_t kRows4Offsets = 8;
constexpr int64_t kRows4Scales = 16;
constexpr int64_t kRows4Mins = 48;
constexpr int kRows4MinSlot[4] = {0, 2, 1, 3};

Rows4Acts quantize_rows4(const float* x, int64_t M, int64_t K, int64_t block, bool wide) {
  Rows4Acts a;
  a.M = M;
  const int64_t groups = K / block;
  const bool k_quant = block == 256;
  a.lo.reset(new int8_t[M * K]);
  if (wide) a.hi.reset(new int8_t[M * K]);
  if (k_quant) {
    a.lo_sums.reset(new int16_t[M * groups * 8]);
    if (wide) a.hi_sums.reset(new int16_t[M * groups * 8]);
  } else {
    a.s.reset(new float[M * groups]);
  }
  a.d.reset(new float[M * groups]);
  at::parallel_for(0, M, std::max<int64_t>(1, kMinTaskWork / K), [&](int64_t m0, int64_t m1) {
    int16_t q16[256];
    float s[8];
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t at = (g * M + m) * block;
        const float* xg = x + m * K + g * block;
        float* d = a.d.get() + g * M + m;
        int8_t* lo = a.lo.get() + at;
        if (wide) {
          quantize_group_plain<int16_t, 32767>(xg, block, block, q16, d, s);
          int8_t* hi = a.hi.get() + at;
          for (int64_t i = 0; i < block; ++i) {
            hi[i] = int8_t(q16[i] >> 8);
            lo[i] = int8_t(uint8_t(q16[i] & 0xff));
          }
        } else {
          quantize_group(xg, block, 32, lo, d, s);
        }
        if (!k_quant) {
          a.s[g * M + m] = s[0];  // the quantizer's d * sum of the group's (one sum group's) values
          continue;
        }
        for (int j = 0; j < 8; ++j) {
          int lo_sum = 0, hi_sum = 0;
          for (int i = 32 * j; i < 32 * j + 32; ++i) {
            lo_sum += wide ? int(uint8_t(lo[i])) : int(lo[i]);
            if (wide) hi_sum += a.hi[at + i];
          }
          a.lo_sums[(g * M + m) * 8 + j] = int16_t(lo_sum);
          if (wide) a.hi_sums[(g * M + m) * 8 + j] = int16_t(hi_sum);
        }
      }
  });
  return a;
}

#ifdef KILN_GGUF_AVX2

// Shuffle control: int16 lanes 0-3 of each 128-bit lane take scale byte j of the lane's first row, lanes 4-7
// byte j of its second (bytes 8 + j); the high bytes zero.
inline __m256i rows4_pick(int j) {
  const __m256i first = _mm256_set_epi64x(int64_t(0x8008800880088008ULL), int64_t(0x8000800080008000ULL),
                                          int64_t(0x8008800880088008ULL), int64_t(0x8000800080008000ULL));
  return _mm256_add_epi8(first, _mm256_set1_epi16(int16_t(j)));
}

inline __m256i bcast8(const int8_t* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return _mm256_set1_epi64x(v);
}

// The four rows' outputs from sums laid out [r0 r0 r1 r1 | r2 r2 r3 r3], for each activation row.
template <int MT>
inline void rows4_store(const __m256* acc, float* out, int64_t ldo) {
  for (int r = 0; r < MT; ++r) {
    const __m256 pairs = _mm256_hadd_ps(acc[r], acc[r]);  // [r0 r1 r0 r1 | r2 r3 r2 r3]
    const __m128 lo = _mm256_castps256_ps128(pairs), hi = _mm256_extractf128_ps(pairs, 1);
    out[r * ldo + 0] = _mm_cvtss_f32(lo);
    out[r * ldo + 1] = _mm_cvtss_f32(_mm_movehdup_ps(lo));
    out[r * ldo + 2] = _mm_cvtss_f32(hi);
    out[r * ldo + 3] = _mm_cvtss_f32(_mm_movehdup_ps(hi));
  }
}

// Output rows of one four-row group for activation rows m0 .. m0 + MT - 1: out[r * ldo + i].
template <bool kWide, int MT>
void rows4_q4_k(const uint8_t* w, int64_t nsb, const Rows4Acts& a, int64_t m0, float* out, int64_t ldo) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256 acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk = w + sb * kRows4Bytes;
    for (int64_t o = 0; o < kRows4Bytes; o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(blk + kRows4Ahead + o), _MM_HINT_T0);
    const __m256i sc = load256(blk + kRows4Scales);
    const int8_t* xl = a.lo.get() + (sb * a.M + m0) * 256;
    const int8_t* xh = kWide ? a.hi.get() + (sb * a.M + m0) * 256 : nullptr;
    __m256i ilo[MT], ihi[MT];
    for (int r = 0; r < MT; ++r) ilo[r] = ihi[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m256i s0 = _mm256_shuffle_epi8(sc, rows4_pick(2 * c));
      const __m256i s1 = _mm256_shuffle_epi8(sc, rows4_pick(2 * c + 1));
      if constexpr (MT == 1) {
        // One activation row: a sub-block's four pieces share its scales, so their int16 pair sums (at most
        // 4 x 2 x 255 x 15 = 30600) add up before the one multiply-add by the scale.
        __m256i p0 = _mm256_setzero_si256(), p1 = p0, h0 = p0, h1 = p0;
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          const __m256i bytes = load256(blk + kRows4Quants + 128 * c + 32 * k);
          const __m256i w0 = _mm256_and_si256(bytes, low4);
          const __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
          const int8_t* xp = xl + 64 * c + 8 * k;
          if constexpr (kWide) {
            // The low bytes are the unsigned operand, the weights (0..15) the signed one.
            p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(bcast8(xp), w0));
            p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(bcast8(xp + 32), w1));
            const int8_t* hp = xh + 64 * c + 8 * k;
            h0 = _mm256_add_epi16(h0, _mm256_maddubs_epi16(w0, bcast8(hp)));
            h1 = _mm256_add_epi16(h1, _mm256_maddubs_epi16(w1, bcast8(hp + 32)));
          } else {
            p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(w0, bcast8(xp)));
            p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(w1, bcast8(xp + 32)));
          }
        }
        ilo[0] = _mm256_add_epi32(ilo[0], _mm256_add_epi32(_mm256_madd_epi16(p0, s0), _mm256_madd_epi16(p1, s1)));
        if constexpr (kWide)
          ihi[0] = _mm256_add_epi32(ihi[0], _mm256_add_epi32(_mm256_madd_epi16(h0, s0), _mm256_madd_epi16(h1, s1)));
      } else {
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          const __m256i bytes = load256(blk + kRows4Quants + 128 * c + 32 * k);
          const __m256i w0 = _mm256_and_si256(bytes, low4);
          const __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
#pragma GCC unroll 8
          for (int r = 0; r < MT; ++r) {
            const int8_t* xp = xl + 256 * r + 64 * c + 8 * k;
            if constexpr (kWide) {
              const int8_t* hp = xh + 256 * r + 64 * c + 8 * k;
              ilo[r] = v_madd16(ilo[r], _mm256_maddubs_epi16(bcast8(xp), w0), s0);
              ilo[r] = v_madd16(ilo[r], _mm256_maddubs_epi16(bcast8(xp + 32), w1), s1);
              ihi[r] = v_madd16(ihi[r], _mm256_maddubs_epi16(w0, bcast8(hp)), s0);
              ihi[r] = v_madd16(ihi[r], _mm256_maddubs_epi16(w1, bcast8(hp + 32)), s1);
            } else {
              ilo[r] = v_madd16(ilo[r], _mm256_maddubs_epi16(w0, bcast8(xp)), s0);
              ilo[r] = v_madd16(ilo[r], _mm256_maddubs_epi16(w1, bcast8(xp + 32)), s1);
            }
          }
        }
      }
    }
    // d and dmin of the four rows as [r0 r0 r1 r1 | r2 r2 r3 r3], the sums' lanes.
    const __m128 d4 = fp16x4_at(blk);
    const __m128 m4 = fp16x4_at(blk + kRows4Offsets);
    const __m256 dd = _mm256_set_m128(_mm_unpackhi_ps(d4, d4), _mm_unpacklo_ps(d4, d4));
    const __m256 dm = _mm256_set_m128(_mm_unpackhi_ps(m4, m4), _mm_unpacklo_ps(m4, m4));
    const __m256i mn02 = _mm256_cvtepu8_epi16(load128(blk + kRows4Mins));
    const __m256i mn13 = _mm256_cvtepu8_epi16(load128(blk + kRows4Mins + 16));
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) {
      // Each row's mins against the activations' sums per 32: int32, below 2^29 for int16 activations.
      const int64_t at = (sb * a.M + m0 + r) * 8;
      const __m256i ls = _mm256_broadcastsi128_si256(load128(a.lo_sums.get() + at));
      __m256i msum = _mm256_hadd_epi32(_mm256_madd_epi16(mn02, ls), _mm256_madd_epi16(mn13, ls));
      __m256 total = _mm256_cvtepi32_ps(ilo[r]);
      if constexpr (kWide) {
        const __m256i hs = _mm256_broadcastsi128_si256(load128(a.hi_sums.get() + at));
        const __m256i mh = _mm256_hadd_epi32(_mm256_madd_epi16(mn02, hs), _mm256_madd_epi16(mn13, hs));
        msum = _mm256_add_epi32(msum, _mm256_slli_epi32(mh, 8));
        total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ihi[r]), _mm256_set1_ps(256.0f), total);
      }
      const __m256 xd = _mm256_set1_ps(a.d[sb * a.M + m0 + r]);
      acc[r] = _mm256_fmadd_ps(total, _mm256_mul_ps(dd, xd), acc[r]);
      acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_mul_ps(dm, xd), acc[r]);
    }
  }
  rows4_store<MT>(acc, out, ldo);
}


// q4_0 (kOne false) and q4_1 over their repacked blocks: the four pieces of a block share its scales, so their
// int16 pair sums add up before one multiply-add (by ones: the scale is a float). The offsets (q4_0's -8 d,
// q4_1's m) times the activations' d * sum go in the lane of each row's first half.
template <bool kOne, bool kWide, int MT>
void rows4_q32(const uint8_t* w, int64_t nblocks, const Rows4Acts& a, int64_t m0, float* out, int64_t ldo) {
  constexpr Rows4Layout kL = rows4_layout(kOne ? Format::Q4_1 : Format::Q4_0);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nblocks; ++b) {
    const uint8_t* blk = w + b * kL.bytes;
    _mm_prefetch(reinterpret_cast<const char*>(blk + kRows4Ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(blk + kRows4Ahead + 64), _MM_HINT_T0);
    // Piece p: bytes 8p .. 8p + 7 of each row, weights 8p .. 8p + 7 (low nibbles) and 16 + 8p .. (high).
    const __m256i q0 = load256(blk + kL.quants), q1 = load256(blk + kL.quants + 32);
    const __m256i w0 = _mm256_and_si256(q0, low4), w2 = _mm256_and_si256(_mm256_srli_epi16(q0, 4), low4);
    const __m256i w1 = _mm256_and_si256(q1, low4), w3 = _mm256_and_si256(_mm256_srli_epi16(q1, 4), low4);
    const __m128 d4 = fp16x4_at(blk);
    const __m256 dd = _mm256_set_m128(_mm_unpackhi_ps(d4, d4), _mm_unpacklo_ps(d4, d4));
    const __m128 o4 = kOne ? fp16x4_at(blk + kRows4Offsets) : _mm_mul_ps(d4, _mm_set1_ps(-8.0f));
    const __m256 off = _mm256_set_m128(_mm_unpackhi_ps(o4, _mm_setzero_ps()), _mm_unpacklo_ps(o4, _mm_setzero_ps()));
#pragma GCC unroll 8
    for (int r = 0; r < MT; ++r) {
      const int64_t row = b * a.M + m0 + r;
      const int8_t* xp = a.lo.get() + row * 32;
      __m256i isum;
      if constexpr (kWide) {
        const int8_t* hp = a.hi.get() + row * 32;
        __m256i p = _mm256_maddubs_epi16(bcast8(xp), w0);
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(bcast8(xp + 8), w1));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(bcast8(xp + 16), w2));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(bcast8(xp + 24), w3));
        __m256i h = _mm256_maddubs_epi16(w0, bcast8(hp));
        h = _mm256_add_epi16(h, _mm256_maddubs_epi16(w1, bcast8(hp + 8)));
        h = _mm256_add_epi16(h, _mm256_maddubs_epi16(w2, bcast8(hp + 16)));
        h = _mm256_add_epi16(h, _mm256_maddubs_epi16(w3, bcast8(hp + 24)));
        isum = _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(h, ones), 8), _mm256_madd_epi16(p, ones));
      } else {
        __m256i p = _mm256_maddubs_epi16(w0, bcast8(xp));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w1, bcast8(xp + 8)));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w2, bcast8(xp + 16)));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w3, bcast8(xp + 24)));
        isum = _mm256_madd_epi16(p, ones);
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dd, _mm256_set1_ps(a.d[row])), acc[r]);
      acc[r] = _mm256_fmadd_ps(off, _mm256_set1_ps(a.s[row]), acc[r]);
    }
  }
  rows4_store<MT>(acc, out, ldo);
}

#else  // no AVX2: the same sums in plain C++

template <bool kWide, int MT>
void rows4_q4_k(const uint8_t* w, int64_t nsb, const Rows4Acts& a, int64_t m0, float* out, int64_t ldo) {
  for (int r = 0; r < MT; ++r)
    for (int i = 0; i < 4; ++i) {
      float total = 0.0f;
      for (int64_t sb = 0; sb < nsb; ++sb) {
        const uint8_t* blk = w + sb * kRows4Bytes;
        const int64_t at = (sb * a.M + m0 + r) * 256;
        int64_t isum = 0, msum = 0;
        for (int j = 0; j < 8; ++j) {
          int64_t part = 0, xsum = 0;
          for (int l = 0; l < 32; ++l) {
            const int64_t e = 64 * (j / 2) + 32 * (j % 2) + l;  // the weight's index in the super-block
            const int k = l / 8;
            const uint8_t byte = blk[kRows4Quants + 128 * (j / 2) + 32 * k + 8 * i + l % 8];
            const int q = (j % 2 ? byte >> 4 : byte) & 0x0f;
            const int64_t v = kWide ? 256 * int64_t(a.hi[at + e]) + int64_t(uint8_t(a.lo[at + e])) : a.lo[at + e];
            part += q * v;
            xsum += v;
          }
          isum += int64_t(blk[kRows4Scales + 8 * i + j]) * part;
          msum += int64_t(blk[kRows4Mins + 8 * kRows4MinSlot[i] + j]) * xsum;
        }
        const float xd = a.d[sb * a.M + m0 + r];
        total += xd * (fp16_to_f32(blk + 2 * i) * float(isum) - fp16_to_f32(blk + kRows4Offsets + 2 * i) * float(msum));
      }
      out[r * ldo + i] = total;
    }
}


template <bool kOne, bool kWide, int MT>
void rows4_q32(const uint8_t* w, int64_t nblocks, const Rows4Acts& a, int64_t m0, float* out, int64_t ldo) {
  constexpr Rows4Layout kL = rows4_layout(kOne ? Format::Q4_1 : Format::Q4_0);
  for (int r = 0; r < MT; ++r)
    for (int i = 0; i < 4; ++i) {
      float total = 0.0f;
      for (int64_t b = 0; b < nblocks; ++b) {
        const uint8_t* blk = w + b * kL.bytes;
        const int64_t row = b * a.M + m0 + r;
        int64_t isum = 0;
        for (int j = 0; j < 16; ++j) {  // quant byte j: weights j and j + 16
          const uint8_t byte = blk[kL.quants + 32 * (j / 8) + 8 * i + j % 8];
          for (int e = j, h = 0; h < 2; e += 16, ++h) {
            const int64_t v = kWide ? 256 * int64_t(a.hi[row * 32 + e]) + int64_t(uint8_t(a.lo[row * 32 + e]))
                                    : a.lo[row * 32 + e];
            isum += int64_t((h ? byte >> 4 : byte) & 0x0f) * v;
          }
        }
        const float d = fp16_to_f32(blk + 2 * i);
        const float offset = kOne ? fp16_to_f32(blk + kRows4Offsets + 2 * i) : -8.0f * d;
        total += d * a.d[row] * float(isum) + offset * a.s[row];
      }
      out[r * ldo + i] = total;
    }
}

#endif

template <bool kWide, int MT = 1>
void rows4_tile(Format fmt, int mt, const uint8_t* w, int64_t nblocks, const Rows4Acts& a, int64_t m0, float* out,
                int64_t ldo) {
  if constexpr (MT < kRowTile) {
    if (mt != MT) return rows4_tile<kWide, MT + 1>(fmt, mt, w, nblocks, a, m0, out, ldo);
  }
  if (fmt == Format::Q4_K) return rows4_q4_k<kWide, MT>(w, nblocks, a, m0, out, ldo);
  if (fmt == Format::Q4_1) return rows4_q32<true, kWide, MT>(w, nblocks, a, m0, out, ldo);
  rows4_q32<false, kWide, MT>(w, nblocks, a, m0, out, ldo);
}

}  // namespace

bool takes_act_bits(Format fmt, int act_bits) {
  return act_bits == 8 || (act_bits == 16 && (fmt == Format::Q4_0 || fmt == Format::Q4_1 || fmt == Format::Q8_0 ||
                                               fmt == Format::Q4_K));
}

void matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, Format fmt, int act_bits, float* y) {
  if (M == 0 || N == 0) return;
  const FormatInfo fi = format_info(fmt);
  const int64_t nblocks = K / fi.block;
  const int64_t row_bytes = nblocks * fi.bytes;
  // Q6_K's scales cover 16 weights, so its offsets need activation sums per 16.
  const int64_t sum_group = fmt == Format::Q6_K ? 16 : 32;
  const bool wide = act_bits == 16;
  const QuantizedActs a = quantize_acts(x, M, K, fi.block, sum_group, wide);
  const auto run = [&](auto lanes, auto wide_tag) {
    using V = decltype(lanes);
    constexpr bool Wide = decltype(wide_tag)::value;
    // An even grain keeps the two-row kernels' pairs whole.
    const int64_t grain = std::max<int64_t>(2, kMinTaskWork / (K * M) + 1) & ~int64_t(1);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      const int64_t ncw = K / sum_group;
      std::vector<float> scratch(4 * ncw);
      float* cw[4] = {scratch.data(), scratch.data() + ncw, scratch.data() + 2 * ncw, scratch.data() + 3 * ncw};
      for (int64_t n = n0; n < n1; n += V::kRows)
        output_rows<V, Wide>(fmt, w, row_bytes, n, std::min<int64_t>(V::kRows, n1 - n), N, nblocks, a, y, cw);
    });
  };
  if (wide)
    run(Lanes16(), std::true_type());
  else
    run(Lanes(), std::false_type());
}

bool takes_rows4(Format fmt) { return fmt == Format::Q4_0 || fmt == Format::Q4_1 || fmt == Format::Q4_K; }

int64_t rows4_bytes(Format fmt, int64_t N, int64_t K) {
  return (N + 3) / 4 * (K / format_info(fmt).block) * rows4_layout(fmt).bytes;
}

void repack_rows4(Format fmt, const uint8_t* w, int64_t N, int64_t K, uint8_t* out) {
  const FormatInfo fi = format_info(fmt);
  const Rows4Layout layout = rows4_layout(fmt);
  const int64_t nblocks = K / fi.block;
  const int64_t row_bytes = nblocks * fi.bytes;
  at::parallel_for(0, (N + 3) / 4, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      uint8_t* o = out + g * nblocks * layout.bytes;
      std::memset(o, 0, nblocks * layout.bytes);  // rows past N stay zero: d = 0, so their outputs are 0
      for (int i = 0; i < 4 && 4 * g + i < N; ++i) {
        const uint8_t* row = w + (4 * g + i) * row_bytes;
        for (int64_t b = 0; b < nblocks; ++b) {
          const uint8_t* src = row + b * fi.bytes;
          uint8_t* ob = o + b * layout.bytes;
          std::memcpy(ob + 2 * i, src, 2);  // d
          if (fmt == Format::Q4_K) {
            std::memcpy(ob + kRows4Offsets + 2 * i, src + 2, 2);  // dmin
            const KScales ks = unpack_k_scales(src + 4);
            std::memcpy(ob + kRows4Scales + 8 * i, &ks.sc, 8);
            std::memcpy(ob + kRows4Mins + 8 * kRows4MinSlot[i], &ks.mn, 8);
            for (int c = 0; c < 4; ++c)
              for (int k = 0; k < 4; ++k)
                std::memcpy(ob + layout.quants + 128 * c + 32 * k + 8 * i, src + 16 + 32 * c + 8 * k, 8);
          } else {
            const int64_t qs = fmt == Format::Q4_1 ? 4 : 2;
            if (fmt == Format::Q4_1) std::memcpy(ob + kRows4Offsets + 2 * i, src + 2, 2);  // m
            for (int p = 0; p < 2; ++p) std::memcpy(ob + layout.quants + 32 * p + 8 * i, src + qs + 8 * p, 8);
          }
        }
      }
    }
  });
}

void matmul_rows4(Format fmt, const float* x, int64_t M, int64_t K, const uint8_t* w4, int64_t N, int act_bits,
                  float* y) {
  if (M == 0 || N == 0) return;
  const int64_t block = format_info(fmt).block;
  const int64_t nblocks = K / block;
  const int64_t group_bytes = nblocks * rows4_layout(fmt).bytes;
  const bool wide = act_bits == 16;
  const Rows4Acts a = quantize_rows4(x, M, K, block, wide);
  const int64_t groups = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / (4 * K * M) + 1);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* w = w4 + g * group_bytes;
      const int64_t n = 4 * g;
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int mt = int(std::min<int64_t>(kRowTile, M - m0));
        const auto tile = wide ? rows4_tile<true> : rows4_tile<false>;
        if (n + 4 <= N) {
          tile(fmt, mt, w, nblocks, a, m0, y + m0 * N + n, N);
        } else {  // the last group's rows past N: into scratch, the real ones copied out
          float part[kRowTile * 4];
          tile(fmt, mt, w, nblocks, a, m0, part, 4);
          for (int r = 0; r < mt; ++r)
            for (int64_t i = 0; n + i < N; ++i) y[(m0 + r) * N + n + i] = part[r * 4 + i];
        }
      }
    }
  });
}
}  // namespace kiln_gguf
