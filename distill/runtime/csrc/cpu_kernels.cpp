// CPU kernels for the blocked K-major layouts of distill/runtime/cpu_layout.py.
//
// A weight W [N, K] is cut into blocks of BW consecutive outputs (BW a multiple of 16; the last block
// is padded). Inside a block the weights are stored input by input (K-major), so the weights
// that one input multiplies sit together and a zero input skips them in one contiguous run:
//
//   dense  values [NB, K, BW]: every weight.
//   2:4    masks  [NB, K, BW/16] uint16: bit j of masks[b, k, s] says output b*BW + 16s + j keeps
//          input k; values: the kept weights of block 0, then block 1, ..., each block input by input
//          and each input's kept weights in output order. Every output keeps 2 of each 4 inputs, so a
//          group of 4 inputs holds exactly 2 * (outputs of the block) values: a group's offset needs
//          no table, and one of 4 zero inputs is skipped by counting its mask bits.
//
// y[M, N] = x[M, K] @ W.T (+ bias) for decode-sized M (<= 16): every block accumulates its outputs for
// all M rows in a tile on the stack, reading each kept weight once; an input that is zero in all M
// rows is not read (whole groups of 4 skip their values without touching them). A `threshold` > 0
// zeroes the inputs whose magnitude is below it as they are read (activation sparsity, the same
// x * (|x| >= threshold) as distill.sparsity.activations.InputThreshold), so no separate pass runs.
// Accumulation is fp32; weights are fp32, bf16 or fp16. Vector paths: AVX512F (16 lanes, expand),
// AVX2 (8 lanes, a permutation from a 256-entry table), and a portable loop elsewhere.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t MAX_M = 16;
constexpr int64_t MAX_BLOCK = 1024;
constexpr int64_t LANES = 16;  // outputs per mask word

inline int popcount16(uint16_t mask) { return __builtin_popcount(mask); }

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(at::Half v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
const char* ISA = "avx512";
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// the kept values of v placed on the set bits of mask, zero elsewhere: vexpandps between registers
// (on an AMD EPYC with AVX512 it measured 10 to 25% faster in the input-major kernel than a
// permutation whose indices come from a table of bit ranks)
inline __m512 expand16(uint16_t mask, __m512 v) { return _mm512_maskz_expand_ps(mask, v); }

// acc[m * stride + 0..15] += x[m] * w, m < M
inline void fma_rows(__m512 w, const float* x, int64_t M, float* acc, int64_t stride) {
  for (int64_t m = 0; m < M; ++m) {
    float* a = acc + m * stride;
    _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(x[m]), w, _mm512_loadu_ps(a)));
  }
}

// the 16 outputs of one mask word: the kept values of `src` placed on the set bits, zero elsewhere
template <typename T>
inline void kept16(uint16_t mask, const T* src, const float* x, int64_t M, float* acc, int64_t stride) {
  fma_rows(expand16(mask, load16(src)), x, M, acc, stride);
}

template <typename T>
inline void all16(const T* src, const float* x, int64_t M, float* acc, int64_t stride) {
  fma_rows(load16(src), x, M, acc, stride);
}

template <typename T>
inline void expand16_store(uint16_t mask, const T* src, float* out) { _mm512_storeu_ps(out, expand16(mask, load16(src))); }

// the grouped layout: one group of 4 inputs for 16 outputs. codes: 8 bytes, byte i holding lane i's
// code in its low nibble and lane i + 8's in its high one; a code is p0 | p1 << 2, the positions of
// the lane's two kept inputs. x: row-major [M, K] at the group's first input, row stride K.
template <typename T>
inline void group16(const uint8_t* codes, const T* slot0, const T* slot1, const float* x, int64_t K, int64_t M,
                    float* acc, int64_t stride) {
  uint64_t packed;
  std::memcpy(&packed, codes, 8);
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(packed)));
  const __m512i lane_codes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(bytes, _mm256_set1_epi32(15))),
                                                _mm256_srli_epi32(bytes, 4), 1);
  const __m512i first = _mm512_and_si512(lane_codes, _mm512_set1_epi32(3));
  const __m512i second = _mm512_srli_epi32(lane_codes, 2);
  const __m512 v0 = load16(slot0), v1 = load16(slot1);
  for (int64_t m = 0; m < M; ++m) {
    const __m512 xg = _mm512_broadcast_f32x4(_mm_loadu_ps(x + m * K));
    float* a = acc + m * stride;
    __m512 sum = _mm512_fmadd_ps(v0, _mm512_permutexvar_ps(first, xg), _mm512_loadu_ps(a));
    _mm512_storeu_ps(a, _mm512_fmadd_ps(v1, _mm512_permutexvar_ps(second, xg), sum));
  }
}

#elif defined(__AVX2__)
const char* ISA = "avx2";
// for every 8-bit mask: where each lane takes its value from (the rank of its bit), and which lanes keep one
struct ExpandTable {
  alignas(32) int32_t index[256][8];
  alignas(32) int32_t keep[256][8];
  ExpandTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int rank = 0;
      for (int lane = 0; lane < 8; ++lane) {
        bool kept = (mask >> lane) & 1;
        index[mask][lane] = kept ? rank : 0;
        keep[mask][lane] = kept ? -1 : 0;
        rank += kept;
      }
    }
  }
};
const ExpandTable EXPAND;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

inline __m256 expand8(uint8_t mask, __m256 v) {
  __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(EXPAND.index[mask]));
  __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(EXPAND.keep[mask])));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(v, index), keep);
}

inline void fma_rows8(__m256 w, const float* x, int64_t M, float* acc, int64_t stride) {
  for (int64_t m = 0; m < M; ++m) {
    float* a = acc + m * stride;
    _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(x[m]), w, _mm256_loadu_ps(a)));
  }
}

template <typename T>
inline void kept16(uint16_t mask, const T* src, const float* x, int64_t M, float* acc, int64_t stride) {
  uint8_t low = mask & 0xff, high = mask >> 8;
  fma_rows8(expand8(low, load8(src)), x, M, acc, stride);
  fma_rows8(expand8(high, load8(src + __builtin_popcount(low))), x, M, acc + 8, stride);
}

template <typename T>
inline void all16(const T* src, const float* x, int64_t M, float* acc, int64_t stride) {
  fma_rows8(load8(src), x, M, acc, stride);
  fma_rows8(load8(src + 8), x, M, acc + 8, stride);
}

template <typename T>
inline void group16(const uint8_t* codes, const T* slot0, const T* slot1, const float* x, int64_t K, int64_t M,
                    float* acc, int64_t stride) {
  uint64_t packed;
  std::memcpy(&packed, codes, 8);
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(packed)));
  const __m256i halves[2] = {_mm256_and_si256(bytes, _mm256_set1_epi32(15)), _mm256_srli_epi32(bytes, 4)};
  for (int half = 0; half < 2; ++half) {
    const __m256i first = _mm256_and_si256(halves[half], _mm256_set1_epi32(3));
    const __m256i second = _mm256_srli_epi32(halves[half], 2);
    const __m256 v0 = load8(slot0 + 8 * half), v1 = load8(slot1 + 8 * half);
    for (int64_t m = 0; m < M; ++m) {
      const __m256 xg = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + m * K));
      float* a = acc + m * stride + 8 * half;
      __m256 sum = _mm256_fmadd_ps(v0, _mm256_permutevar8x32_ps(xg, first), _mm256_loadu_ps(a));
      _mm256_storeu_ps(a, _mm256_fmadd_ps(v1, _mm256_permutevar8x32_ps(xg, second), sum));
    }
  }
}

template <typename T>
inline void expand16_store(uint16_t mask, const T* src, float* out) {
  uint8_t low = mask & 0xff, high = mask >> 8;
  _mm256_storeu_ps(out, expand8(low, load8(src)));
  _mm256_storeu_ps(out + 8, expand8(high, load8(src + __builtin_popcount(low))));
}

#else
const char* ISA = "portable";
template <typename T>
inline void kept16(uint16_t mask, const T* src, const float* x, int64_t M, float* acc, int64_t stride) {
  for (int lane = 0; lane < 16; ++lane) {
    if (!((mask >> lane) & 1)) continue;
    float w = to_float(*src++);
    for (int64_t m = 0; m < M; ++m) acc[m * stride + lane] += x[m] * w;
  }
}

template <typename T>
inline void all16(const T* src, const float* x, int64_t M, float* acc, int64_t stride) {
  for (int lane = 0; lane < 16; ++lane) {
    float w = to_float(src[lane]);
    for (int64_t m = 0; m < M; ++m) acc[m * stride + lane] += x[m] * w;
  }
}

template <typename T>
inline void group16(const uint8_t* codes, const T* slot0, const T* slot1, const float* x, int64_t K, int64_t M,
                    float* acc, int64_t stride) {
  for (int lane = 0; lane < 16; ++lane) {
    const int code = lane < 8 ? codes[lane] & 15 : codes[lane - 8] >> 4;
    const float w0 = to_float(slot0[lane]), w1 = to_float(slot1[lane]);
    for (int64_t m = 0; m < M; ++m) acc[m * stride + lane] += w0 * x[m * K + (code & 3)] + w1 * x[m * K + (code >> 2)];
  }
}

template <typename T>
inline void expand16_store(uint16_t mask, const T* src, float* out) {
  for (int lane = 0; lane < 16; ++lane) out[lane] = ((mask >> lane) & 1) ? to_float(*src++) : 0.0f;
}
#endif

// calls fn(T{}) with T the C++ type of a float32, bfloat16 or float16 tensor
template <typename Fn>
void dispatch_float(at::ScalarType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    case at::kHalf: fn(at::Half{}); break;
    default: TORCH_CHECK(false, what, ": dtype ", dtype, " is not supported (float32, bfloat16 or float16)");
  }
}

// Blocks per task: at least ~256K weights each, so a small projection runs on one thread instead of
// paying for waking the others (tens of microseconds, as long as its whole product at decode).
constexpr int64_t WEIGHTS_PER_TASK = 1 << 18;

struct Shape {
  int64_t n, k, block, blocks;
  int64_t outputs_in(int64_t b) const { return std::min(block, n - b * block); }
  int64_t grain() const { return std::max<int64_t>(1, WEIGHTS_PER_TASK / (block * k)); }
};

Shape check_layout(const at::Tensor& values, int64_t n, int64_t k, int64_t block, bool two_of_four = true) {
  TORCH_CHECK(block > 0 && block % LANES == 0 && block <= MAX_BLOCK, "block width ", block, " must be a multiple of 16, at most ", MAX_BLOCK);
  TORCH_CHECK(!two_of_four || k % 4 == 0, "input size ", k, " is not a multiple of 4");
  TORCH_CHECK(values.is_contiguous() && values.device().is_cpu(), "values must be a contiguous CPU tensor");
  return Shape{n, k, block, (n + block - 1) / block};  // the last block may be padded
}

// x [M, K] as fp32 with its entries below `threshold` in magnitude zeroed (NaN kept, as x * mask keeps it)
inline float thresholded(float v, float threshold) { return std::fabs(v) < threshold ? 0.0f : v; }

// x [M, K] as fp32, thresholded, input-major (xt[k * M + m]), and whether each input is non-zero in some row
void transpose_inputs(const at::Tensor& x, float threshold, std::vector<float>& xt, std::vector<uint8_t>& active) {
  const int64_t M = x.size(0), K = x.size(1);
  xt.assign(K * M, 0.0f);
  active.assign(K, 0);
  dispatch_float(x.scalar_type(), "x", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* data = x.data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) {
        float v = thresholded(static_cast<float>(data[m * K + k]), threshold);
        xt[k * M + m] = v;
        active[k] |= (v != 0.0f);
      }
    }
  });
}

// how many outputs of a block keep an input: the set bits of its mask words, 4 words per popcount
inline int64_t kept_in(const uint16_t* mask, int64_t words) {
  int64_t count = 0, w = 0;
  for (; w + 4 <= words; w += 4) {
    uint64_t four;
    std::memcpy(&four, mask + w, 8);
    count += __builtin_popcountll(four);
  }
  for (; w < words; ++w) count += popcount16(mask[w]);
  return count;
}

// A run: the weights of one non-zero input inside a block, at `offset` in the block's values.
struct Run {
  int64_t k, offset;
};

// How far ahead the next runs are fetched: skipping inputs breaks the hardware prefetchers' streams,
// so the kernels ask for the lines of the runs they will read next.
constexpr int PREFETCH_RUNS = 6;

template <typename T>
inline void prefetch_run(const T* start, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(start);
  for (int64_t offset = 0; offset < count * int64_t(sizeof(T)); offset += 64) __builtin_prefetch(bytes + offset);
}

// Accumulators per tile: M rows x tile outputs stay within ~16 KiB (L1), so for many rows the block's
// outputs are done a tile at a time, each tile walking the block's runs again.
constexpr int64_t TILE_FLOATS = 4096;

template <typename T, bool PACKED>
void block_product(const Shape& s, int64_t b, const float* xt, const uint8_t* active, int64_t M,
                   const uint16_t* masks, const T* values, float* acc, std::vector<Run>& runs, float* out) {
  const int64_t words = s.block / LANES;
  const int64_t tile_words = std::max<int64_t>(1, std::min(words, TILE_FLOATS / (M * LANES)));
  const uint16_t* block_masks = PACKED ? masks + b * s.k * words : nullptr;
  const T* block_values = values + (PACKED ? b * (s.k / 2) * s.block : b * s.k * s.block);  // blocks before b are full
  runs.clear();
  if (PACKED) {
    const int64_t outputs = s.outputs_in(b);
    for (int64_t g = 0; g < s.k / 4; ++g) {
      const uint8_t* act = active + 4 * g;
      if (!(act[0] | act[1] | act[2] | act[3])) continue;  // the group's 2 * outputs values are skipped
      int64_t offset = g * 2 * outputs;
      for (int64_t j = 0; j < 4; ++j) {
        const uint16_t* mask = block_masks + (4 * g + j) * words;
        if (act[j]) runs.push_back({4 * g + j, offset});
        offset += kept_in(mask, words);
      }
    }
  } else {
    for (int64_t k = 0; k < s.k; ++k)
      if (active[k]) runs.push_back({k, k * s.block});
  }
  const int64_t count = int64_t(runs.size());
  for (int64_t first_word = 0; first_word < words; first_word += tile_words) {
    const int64_t last_word = std::min(words, first_word + tile_words);
    const int64_t tile = (last_word - first_word) * LANES;
    std::memset(acc, 0, sizeof(float) * M * tile);
    // values per run inside this tile (on average, for 2:4), for the prefetches
    const int64_t run_length = PACKED ? tile / 2 : tile;
    for (int64_t i = 0; i < count; ++i) {
      const float* xk = xt + runs[i].k * M;
      if (PACKED) {
        const uint16_t* mask = block_masks + runs[i].k * words;
        const T* src = block_values + runs[i].offset + kept_in(mask, first_word);
        if (i + PREFETCH_RUNS < count) {
          const Run& next = runs[i + PREFETCH_RUNS];
          prefetch_run(block_values + next.offset + (first_word ? kept_in(block_masks + next.k * words, first_word) : 0),
                       run_length);
        }
        for (int64_t w = first_word; w < last_word; ++w) {
          kept16(mask[w], src, xk, M, acc + (w - first_word) * LANES, tile);
          src += popcount16(mask[w]);
        }
      } else {
        if (i + PREFETCH_RUNS < count) prefetch_run(block_values + runs[i + PREFETCH_RUNS].offset + first_word * LANES, run_length);
        const T* src = block_values + runs[i].offset;
        for (int64_t w = first_word; w < last_word; ++w) all16(src + w * LANES, xk, M, acc + (w - first_word) * LANES, tile);
      }
    }
    // the tile's real outputs into y [M, N]
    const int64_t first = b * s.block + first_word * LANES;
    const int64_t real = std::min(tile, s.n - first);
    for (int64_t m = 0; real > 0 && m < M; ++m) std::memcpy(out + m * s.n + first, acc + m * tile, sizeof(float) * real);
  }
}

template <bool PACKED>
at::Tensor blocked_matmul(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& values,
                          const c10::optional<at::Tensor>& bias, int64_t n, int64_t block, double threshold) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= MAX_M, "the CPU kernel serves M from 1 to ", MAX_M, " rows, got ", M);
  const Shape s = check_layout(values, n, K, block, PACKED);
  if (PACKED) {
    TORCH_CHECK(masks.scalar_type() == at::kShort && masks.is_contiguous(), "masks must be contiguous int16");
    TORCH_CHECK(masks.numel() == s.blocks * K * (block / LANES), "masks hold ", masks.numel(), " words, expected ",
                s.blocks * K * (block / LANES));
    TORCH_CHECK(values.numel() >= (K / 2) * n + LANES, "values hold ", values.numel(), ", expected at least ", (K / 2) * n + LANES);
  } else {
    TORCH_CHECK(values.numel() == s.blocks * K * block, "values hold ", values.numel(), ", expected ", s.blocks * K * block);
  }
  std::vector<float> xt;
  std::vector<uint8_t> active;
  transpose_inputs(x, float(threshold), xt, active);
  at::Tensor y = at::empty({M, n}, x.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  const uint16_t* mask_data = PACKED ? reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>()) : nullptr;
  dispatch_float(values.scalar_type(), "values", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* value_data = values.data_ptr<scalar_t>();
    at::parallel_for(0, s.blocks, s.grain(), [&](int64_t begin, int64_t end) {
      alignas(64) float acc[TILE_FLOATS];
      std::vector<Run> runs;
      runs.reserve(K);
      for (int64_t b = begin; b < end; ++b)
        block_product<scalar_t, PACKED>(s, b, xt.data(), active.data(), M, mask_data, value_data, acc, runs, out);
    });
  });
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

at::Tensor sparse24_matmul(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& values,
                           const c10::optional<at::Tensor>& bias, int64_t n, int64_t block, double threshold) {
  return blocked_matmul<true>(x, masks, values, bias, n, block, threshold);
}

at::Tensor dense_matmul(const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                        int64_t n, int64_t block, double threshold) {
  return blocked_matmul<false>(x, at::Tensor(), values, bias, n, block, threshold);
}

// the 2:4 weight K-major and dense, wt [K, N] (in `out`, fp32 or the values' dtype): prefill multiplies by it
void sparse24_unpack(const at::Tensor& masks, const at::Tensor& values, int64_t n, int64_t block, at::Tensor out) {
  const int64_t K = out.size(0);
  const Shape s = check_layout(values, n, K, block);
  TORCH_CHECK(out.dim() == 2 && out.size(1) == n && out.is_contiguous(), "out must be a contiguous [K, N] tensor");
  TORCH_CHECK(out.scalar_type() == values.scalar_type(), "out must have the values' dtype");
  const int64_t words = block / LANES;
  const uint16_t* mask_data = reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>());
  dispatch_float(values.scalar_type(), "values", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* value_data = values.data_ptr<scalar_t>();
    scalar_t* wt = out.data_ptr<scalar_t>();
    at::parallel_for(0, s.blocks, s.grain(), [&](int64_t begin, int64_t end) {
      alignas(64) float lanes[LANES];
      for (int64_t b = begin; b < end; ++b) {
        const int64_t first = b * block, outputs = s.outputs_in(b);
        const scalar_t* src = value_data + b * (K / 2) * block;
        for (int64_t k = 0; k < K; ++k) {
          const uint16_t* mask = mask_data + (b * K + k) * words;
          for (int64_t w = 0; w < words; ++w) {
            expand16_store(mask[w], src, lanes);
            src += popcount16(mask[w]);
            const int64_t count = std::min<int64_t>(LANES, outputs - w * LANES);
            scalar_t* row = wt + k * n + first + w * LANES;
            for (int64_t lane = 0; lane < count; ++lane) row[lane] = static_cast<scalar_t>(lanes[lane]);
          }
        }
      }
    });
  });
}

#ifndef GROUPED_PREFETCH_BYTES
#define GROUPED_PREFETCH_BYTES 4096
#endif

// The grouped 2:4 layout, for inputs that are rarely zero: per block of outputs and group of 4 inputs,
// the first and the second kept weight of every output (values [NB, K/4, 2, block]) and a 4-bit code
// per output saying which 2 of the 4 inputs they multiply (codes [NB, K/4, block/2] uint8, 8 bytes per
// 16 outputs as group16 reads them). Every load is a full vector of kept weights: no expansion.
at::Tensor grouped24_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& values,
                            const c10::optional<at::Tensor>& bias, int64_t n, int64_t block, double threshold) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), groups = K / 4;
  TORCH_CHECK(M >= 1 && M <= MAX_M, "the CPU kernel serves M from 1 to ", MAX_M, " rows, got ", M);
  const Shape s = check_layout(values, n, K, block);
  TORCH_CHECK(values.numel() == s.blocks * groups * 2 * block, "values hold ", values.numel(), ", expected ",
              s.blocks * groups * 2 * block);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == s.blocks * groups * block / 2,
              "codes must be contiguous uint8 with ", s.blocks * groups * block / 2, " entries");
  std::vector<float> rows(M * K);
  std::vector<uint8_t> group_active(groups, 0);
  dispatch_float(x.scalar_type(), "x", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* data = x.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * K; ++i) {
      rows[i] = thresholded(static_cast<float>(data[i]), float(threshold));
      group_active[(i % K) / 4] |= (rows[i] != 0.0f);
    }
  });
  at::Tensor y = at::empty({M, n}, x.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  const uint8_t* code_data = codes.data_ptr<uint8_t>();
  dispatch_float(values.scalar_type(), "values", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* value_data = values.data_ptr<scalar_t>();
    at::parallel_for(0, s.blocks, s.grain(), [&](int64_t begin, int64_t end) {
      alignas(64) float acc[MAX_M * MAX_BLOCK];
      for (int64_t b = begin; b < end; ++b) {
        std::memset(acc, 0, sizeof(float) * M * block);
        for (int64_t g = 0; g < groups; ++g) {
          if (!group_active[g]) continue;  // all 4 inputs zero in every row: the group's weights are not read
          const scalar_t* slot0 = value_data + (b * groups + g) * 2 * block;
          const uint8_t* group_codes = code_data + (b * groups + g) * (block / 2);
          const char* ahead = reinterpret_cast<const char*>(slot0) + GROUPED_PREFETCH_BYTES;
          for (int64_t line = 0; line < 2 * block * int64_t(sizeof(scalar_t)); line += 64) __builtin_prefetch(ahead + line);
          for (int64_t w = 0; w < block / LANES; ++w)
            group16(group_codes + 8 * w, slot0 + w * LANES, slot0 + block + w * LANES, rows.data() + 4 * g, K, M,
                    acc + w * LANES, block);
        }
        const int64_t first = b * block, outputs = s.outputs_in(b);
        for (int64_t m = 0; m < M; ++m) std::memcpy(out + m * n + first, acc + m * block, sizeof(float) * outputs);
      }
    });
  });
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// the grouped 2:4 weight dense and K-major, wt [K, N] in `out` (the values' dtype), for prefill
void grouped24_unpack(const at::Tensor& codes, const at::Tensor& values, int64_t n, int64_t block, at::Tensor out) {
  const int64_t K = out.size(0), groups = K / 4;
  const Shape s = check_layout(values, n, K, block);
  TORCH_CHECK(out.dim() == 2 && out.size(1) == n && out.is_contiguous(), "out must be a contiguous [K, N] tensor");
  TORCH_CHECK(out.scalar_type() == values.scalar_type(), "out must have the values' dtype");
  const uint8_t* code_data = codes.data_ptr<uint8_t>();
  dispatch_float(values.scalar_type(), "values", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* value_data = values.data_ptr<scalar_t>();
    scalar_t* wt = out.data_ptr<scalar_t>();
    at::parallel_for(0, s.blocks, s.grain(), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t first = b * block, outputs = s.outputs_in(b);
        for (int64_t g = 0; g < groups; ++g) {
          const scalar_t* slot0 = value_data + (b * groups + g) * 2 * block;
          const uint8_t* group_codes = code_data + (b * groups + g) * (block / 2);
          for (int64_t j = 0; j < 4; ++j) std::fill_n(wt + (4 * g + j) * n + first, outputs, scalar_t(0.0f));
          for (int64_t i = 0; i < outputs; ++i) {
            const uint8_t byte = group_codes[8 * (i / LANES) + (i % 8)];
            const int code = (i % LANES) < 8 ? byte & 15 : byte >> 4;
            wt[(4 * g + (code & 3)) * n + first + i] = slot0[i];
            wt[(4 * g + (code >> 2)) * n + first + i] = slot0[block + i];
          }
        }
      }
    });
  });
}

std::string isa() { return ISA; }

}  // namespace

// one namespace per build (distill_cpu_avx512, ...): builds for several ISAs can live in one process
TORCH_LIBRARY(DISTILL_NAMESPACE, m) {
  m.def("sparse24_matmul(Tensor x, Tensor masks, Tensor values, Tensor? bias, int n, int block, float threshold) -> Tensor");
  m.def("dense_matmul(Tensor x, Tensor values, Tensor? bias, int n, int block, float threshold) -> Tensor");
  m.def("sparse24_unpack(Tensor masks, Tensor values, int n, int block, Tensor(a!) out) -> ()");
  m.def("grouped24_matmul(Tensor x, Tensor codes, Tensor values, Tensor? bias, int n, int block, float threshold) -> Tensor");
  m.def("grouped24_unpack(Tensor codes, Tensor values, int n, int block, Tensor(a!) out) -> ()");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(DISTILL_NAMESPACE, CPU, m) {
  m.impl("sparse24_matmul", &sparse24_matmul);
  m.impl("dense_matmul", &dense_matmul);
  m.impl("sparse24_unpack", &sparse24_unpack);
  m.impl("grouped24_matmul", &grouped24_matmul);
  m.impl("grouped24_unpack", &grouped24_unpack);
}
