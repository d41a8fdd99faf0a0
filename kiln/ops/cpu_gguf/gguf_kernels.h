// Matrix products over GGUF block-quantized weights on the CPU: the interface between the kernels
// (gguf_kernels.cpp, no torch headers beyond ATen/Parallel.h, so it compiles in seconds) and the
// torch binding (gguf_binding.cpp).
#pragma once

#include <cstdint>

namespace kiln_gguf {

// NOTE: the numbering is the order of FORMATS in __init__.py, which passes the index.
enum class Format : int { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2, Q4_K = 3, Q5_K = 4, Q6_K = 5 };
constexpr int kFormatCount = 6;

struct FormatInfo {
  int64_t block;  // weights per block (32, or 256 for a K-quant super-block)
  int64_t bytes;  // bytes per block, as ggml stores it
};

FormatInfo format_info(Format fmt);

// y[M][N] = x[M][K] @ dequant(w).T, where w is N rows of K / block blocks each, row-major, with the
// activations rounded to act_bits (8, or 16 where takes_act_bits says) integers, a scale per block.
// x and y are dense row-major float32; the caller checks shapes and takes_act_bits.
void matmul(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, Format fmt, int act_bits, float* y);

// Whether matmul takes act_bits for fmt: 8 for every format, 16 for q4_0, q4_1, q8_0 and q4_k.
bool takes_act_bits(Format fmt, int act_bits);

// Weights repacked in groups of four rows (the layout gguf_kernels.cpp describes at matmul_rows4), for the
// formats takes_rows4 names (q4_0, q4_1, q4_k): rows4_bytes is its size for N rows of K weights (rows padded to
// a multiple of 4), repack_rows4 writes it from GGUF's rows, and matmul_rows4 is matmul over it, with int8 or
// int16 activations (act_bits 8 or 16).
bool takes_rows4(Format fmt);
int64_t rows4_bytes(Format fmt, int64_t N, int64_t K);
void repack_rows4(Format fmt, const uint8_t* w, int64_t N, int64_t K, uint8_t* out);
void matmul_rows4(Format fmt, const float* x, int64_t M, int64_t K, const uint8_t* w4, int64_t N, int act_bits,
                  float* y);

// Which SIMD path this build took ("avx512-vnni", "avx-vnni", "avx2" or "scalar").
const char* isa_name();

}  // namespace kiln_gguf
