// The SIMD vocabulary the GGUF kernels are written in, one definition per instruction set.
//
// The build compiles with -march=native, so the macros below describe the machine that runs the
// code: AVX-512 VNNI (Ice Lake and later Xeons, Zen 4) fuses the int8 dot product into one
// instruction and has 512-bit registers, AVX-VNNI (Alder Lake) fuses it at 256 bits, plain AVX2
// (Haswell, Zen 2/3) needs three instructions; without AVX2 the kernels take their scalar path.
//
// A kernel is written once over a "lanes" type: Ymm holds one weight row's 32 weights in a
// register, Zmm two rows' (each row in one 256-bit half, the activations broadcast to both), so
// that with AVX-512 every instruction does the work of two output rows.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KILN_GGUF_AVX2 1
#include <immintrin.h>
#endif

#if defined(KILN_GGUF_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define KILN_GGUF_AVX512 1
#define KILN_GGUF_VNNI 1
#define KILN_GGUF_ISA "avx512-vnni"
#elif defined(KILN_GGUF_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KILN_GGUF_VNNI 1
#define KILN_GGUF_ISA "avx512vl-vnni"
#elif defined(KILN_GGUF_AVX2) && defined(__AVXVNNI__)
#define KILN_GGUF_VNNI 1
#define KILN_GGUF_ISA "avx-vnni"
#elif defined(KILN_GGUF_AVX2)
#define KILN_GGUF_ISA "avx2"
#else
#define KILN_GGUF_ISA "scalar"
#endif

namespace kiln_gguf {

#ifdef KILN_GGUF_AVX2
// The fp16 at p, converted from memory (p must have 8 readable bytes): the register form of the
// conversion takes a shuffle-port slot, the memory form does not.
inline __m128 fp16x4_at(const uint8_t* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
#endif

inline float fp16_to_f32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef KILN_GGUF_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    // Subnormal (or zero): man * 2^-24 is exact in float32.
    float f = float(man) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
#endif
}

#ifdef KILN_GGUF_AVX2

// With 32 vector registers (AVX-512VL encodes ymm16-31) eight activation rows' accumulators stay in
// registers beside a weight block's unpacked bytes; with 16, four do.
#ifdef __AVX512VL__
constexpr int kRowTile = 8;
#else
constexpr int kRowTile = 4;
#endif

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Element-wise operations, overloaded on the register width.
inline __m256i v_and(__m256i a, __m256i b) { return _mm256_and_si256(a, b); }
inline __m256i v_or(__m256i a, __m256i b) { return _mm256_or_si256(a, b); }
inline __m256i v_xor(__m256i a, __m256i b) { return _mm256_xor_si256(a, b); }
inline __m256i v_srli16(__m256i a, int n) { return _mm256_srli_epi16(a, n); }
inline __m256i v_slli16(__m256i a, int n) { return _mm256_slli_epi16(a, n); }
inline __m256i v_shuffle8(__m256i a, __m256i idx) { return _mm256_shuffle_epi8(a, idx); }
inline __m256i v_maddubs(__m256i u, __m256i s) { return _mm256_maddubs_epi16(u, s); }
inline __m256 v_cvt(__m256i a) { return _mm256_cvtepi32_ps(a); }
inline __m256 v_mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 v_fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }

// acc + sum over groups of four of u[i] * s[i] (u unsigned, s signed bytes) into int32 lanes.
// NOTE: without VNNI the pairs go through int16 with saturation, so callers keep 2 * u * |s| below
// 32768: weights of at most 6 bits against activations in [-127, 127].
inline __m256i v_dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// acc + pairwise sums of a[i] * b[i] over int16 lanes into int32 lanes.
inline __m256i v_madd16(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// One weight row per register.
struct Ymm {
  using I = __m256i;
  using F = __m256;
  static constexpr int kRows = 1;
  static I zero() { return _mm256_setzero_si256(); }
  static F fzero() { return _mm256_setzero_ps(); }
  static I splat8(int8_t c) { return _mm256_set1_epi8(c); }
  static I splat16(int16_t c) { return _mm256_set1_epi16(c); }
  static F splat(float f) { return _mm256_set1_ps(f); }
  // 32 bytes at w[row] + off.
  static I bytes32(const uint8_t* const* w, int64_t off) { return load256(w[0] + off); }
  // 16 bytes at w[row] + off as [bytes, bytes >> 4] (32 nibbles in order once masked).
  static I nibbles16(const uint8_t* const* w, int64_t off) {
    const __m128i raw = load128(w[0] + off);
    return _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  }
  // v[row] in every lane of its row.
  static F rows(const float* v) { return _mm256_set1_ps(v[0]); }
  // v[row][i] in every lane of its row.
  static F rows_at(const float* const* v, int64_t i) { return _mm256_broadcast_ss(v[0] + i); }
  // v[row] (128 bits) in both 128-bit lanes of its row.
  static I rows128(const __m128i* v) { return _mm256_broadcastsi128_si256(v[0]); }
  // v[row]'s 16 bytes sign-extended to its row's 16 int16 lanes.
  static I rows_i8_to_i16(const __m128i* v) { return _mm256_cvtepi8_epi16(v[0]); }
  // From a row's 16 int16 words (words) or its 16 bytes (raw): word 2j in the low eight lanes
  // of the row, word 2j + 1 in the high eight.
  static I pick_pair(I words, const __m128i* raw, int j) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    (void)raw;
    const __m256i base = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm256_permutexvar_epi16(_mm256_add_epi16(base, _mm256_set1_epi16(int16_t(2 * j))), words);
#else
    (void)words;
    const __m128i pick = _mm_set_epi64x(0x0101010101010101LL * (2 * j + 1), 0x0101010101010101LL * (2 * j));
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(raw[0], pick));
#endif
  }
  // 32 activation bytes, for every row.
  static I act(const int8_t* p) { return load256(p); }
  static void hsum_rows(F v, float* out) { out[0] = hsum(v); }
};

#ifdef KILN_GGUF_AVX512

inline __m512i v_and(__m512i a, __m512i b) { return _mm512_and_si512(a, b); }
inline __m512i v_or(__m512i a, __m512i b) { return _mm512_or_si512(a, b); }
inline __m512i v_xor(__m512i a, __m512i b) { return _mm512_xor_si512(a, b); }
inline __m512i v_srli16(__m512i a, int n) { return _mm512_srli_epi16(a, n); }
inline __m512i v_slli16(__m512i a, int n) { return _mm512_slli_epi16(a, n); }
inline __m512i v_shuffle8(__m512i a, __m512i idx) { return _mm512_shuffle_epi8(a, idx); }
inline __m512i v_maddubs(__m512i u, __m512i s) { return _mm512_maddubs_epi16(u, s); }
inline __m512 v_cvt(__m512i a) { return _mm512_cvtepi32_ps(a); }
inline __m512 v_mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
inline __m512 v_fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline __m512i v_dot_u8s8(__m512i acc, __m512i u, __m512i s) { return _mm512_dpbusd_epi32(acc, u, s); }
inline __m512i v_madd16(__m512i acc, __m512i a, __m512i b) { return _mm512_dpwssd_epi32(acc, a, b); }

inline __m512i join(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }

// Two weight rows per register, one in each 256-bit half.
struct Zmm {
  using I = __m512i;
  using F = __m512;
  static constexpr int kRows = 2;
  static I zero() { return _mm512_setzero_si512(); }
  static F fzero() { return _mm512_setzero_ps(); }
  static I splat8(int8_t c) { return _mm512_set1_epi8(c); }
  static I splat16(int16_t c) { return _mm512_set1_epi16(c); }
  static F splat(float f) { return _mm512_set1_ps(f); }
  // Loads that fill the two halves straight from memory (a broadcast, then a masked broadcast)
  // keep the port that does shuffles free: with one activation row it is what limits the speed.
  static I bytes32(const uint8_t* const* w, int64_t off) {
    return _mm512_mask_broadcast_i64x4(_mm512_broadcast_i64x4(load256(w[0] + off)), 0xf0, load256(w[1] + off));
  }
  static I nibbles16(const uint8_t* const* w, int64_t off) {
    // 128-bit lanes (row 0, row 0, row 1, row 1), the odd ones shifted to their high nibbles.
    const __m512i rows = _mm512_mask_broadcast_i32x4(_mm512_broadcast_i32x4(load128(w[0] + off)), 0xff00,
                                                     load128(w[1] + off));
    const __m512i shifts = _mm512_setr_epi64(0, 0, 0x0004000400040004LL, 0x0004000400040004LL, 0, 0,
                                             0x0004000400040004LL, 0x0004000400040004LL);
    return _mm512_srlv_epi16(rows, shifts);
  }
  static F rows(const float* v) { return _mm512_mask_broadcastss_ps(_mm512_set1_ps(v[0]), 0xff00, _mm_load_ss(v + 1)); }
  // v[row][i] in every lane of its row.
  static F rows_at(const float* const* v, int64_t i) {
    return _mm512_mask_broadcastss_ps(_mm512_set1_ps(v[0][i]), 0xff00, _mm_load_ss(v[1] + i));
  }
  static I rows128(const __m128i* v) {
    return join(_mm256_broadcastsi128_si256(v[0]), _mm256_broadcastsi128_si256(v[1]));
  }
  static I rows_i8_to_i16(const __m128i* v) { return _mm512_cvtepi8_epi16(_mm256_set_m128i(v[1], v[0])); }
  static I pick_pair(I words, const __m128i*, int j) {
    const __m512i base = _mm512_set_epi16(17, 17, 17, 17, 17, 17, 17, 17, 16, 16, 16, 16, 16, 16, 16, 16,  //
                                          1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_epi16(_mm512_add_epi16(base, _mm512_set1_epi16(int16_t(2 * j))), words);
  }
  static I act(const int8_t* p) { return _mm512_broadcast_i64x4(load256(p)); }
  static void hsum_rows(F v, float* out) {
    out[0] = hsum(_mm512_castps512_ps256(v));
    out[1] = hsum(_mm512_extractf32x8_ps(v, 1));
  }
};

#endif  // KILN_GGUF_AVX512

#else

constexpr int kRowTile = 4;

#endif  // KILN_GGUF_AVX2

inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float total = 0.0f;
#ifdef KILN_GGUF_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  total = hsum(acc);
#endif
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

}  // namespace kiln_gguf
