// The bf16 dot-product GEMM (AVX-512 BF16): prefill for bf16 activations. Part of
// lut_linear.cpp's translation unit.
//
// When x arrives in bf16 (a model whose dense rest runs in bf16), nothing is lost by
// multiplying it in bf16: every value of a format with at most 8 bits is exact in bf16
// (make_packed checks it), so with the *unscaled* values in bf16 each product x * value
// is exact in fp32 (8 x 8 significant bits), and vdpbf16ps adds two of them at a time
// into fp32 sums. The scale is applied to each group's sum (per channel: to each block of
// K, dot_depth), one fp32 FMA per group and output, where the fp32 GEMM multiplies
// every weight by its scale first. So the weights are those of the dequantization, the
// products exact, and the outputs differ from a float64 product with the dequantized
// weights by the fp32 summation and the scale's rounding per group sum (a relative
// 2^-24 per term, within the same kind of bound), and by what vdpbf16ps flushes to zero:
// bf16 inputs and fp32 results below 2^-126 (unscaled values are at least 2^-16 in
// magnitude, so only activations that small and their products are affected). Byte
// scales that are a few-bit number times one multiplier (E8M0, NVFP4) go into the panels
// as that number times the value, exactly (Packed::scale_factors), and the multiplier
// into the sum: such layers run as per-channel ones. torch's bf16 GEMM rounds the
// weights themselves to bf16; this one keeps them exact.
//
// On an AMD EPYC with AVX-512 BF16 (Zen 5, 2 threads), vdpbf16ps on registers alone peaks
// at ~1020 GFLOP/s; torch's bf16 GEMM ran 850-920 at M = 512 on 4096x4096 with the weights
// in cache, this one's tile loop ~95% of that peak while it runs (perf), the rest of the
// call being the decode, pairing x and the threads' wait. The fp32 GEMM (blocked, fp32
// FMAs) reaches at most half of torch's bf16 rate.
//
// Layout: a panel is kDotRows weight rows x one block of K, stored as [k / 2][kDotRows]
// 32-bit words, each a bf16 pair (k, k') of one row: one zmm load gives 16 rows' pair,
// and one broadcast of x's pair (x[k], x[k']) multiplies it. Each call decodes its
// panels (dot_panel): the codes of 16 rows at a time transposed (4- and 6-bit: their
// packed bytes), then looked up straight to bf16 bytes, times the folded scale factors
// where there are any. x is paired once per call in the same order, tile by tile
// (pair_x, XTiles). Zero points: v - z is not exact in bf16, so the panels hold v and
// each group's sum S of x v becomes (S - z X) s at the group's end, X the group's sum of
// x (sum_runs_bf16, once per call): with a one-hot row X = 1 and (v - z) s is rounded as
// the dequantization rounds it, bit for bit; otherwise the result is within the fp32
// summation bound counted on |x| (|v| + |z|) s.
//
// Against torch's bf16 GEMM there (the kernels taking turns call by call: `fpbench bench
// --kernels torch_bf16,FORMAT/GRAN@bf16`, cold weights), median time ratios over FP4, FP6,
// INT4, INT8 per channel and g128, FP8, NVFP4 and MXFP4/6/8 in two runs: M = 64 0.97-1.19
// (4096x4096) and 0.95-1.24 (4096x14336); M = 512 1.02-1.11 and 0.91-1.01. The runs'
// spread is about that of the ratios.
#pragma once

#include "lut_avx512.h"

#include <atomic>
#include <numeric>
#include <tuple>
#include <utility>

namespace {

#if FPBENCH_X86

constexpr int64_t kDotRows = 48;           // weight rows a panel: three zmm of outputs
constexpr int64_t kDotDepth = 1024;        // columns a block at most (dot_depth)
constexpr int64_t kDotMinDepth = 256;      // ... and at least, where K has them
constexpr int64_t kDotXBytes = 1 << 20;    // a block of x, M rows (dot_depth)
constexpr int64_t kDotSumsBytes = 1 << 20;  // a group of panels' running sums (gemm_bf16_t) ...
constexpr int64_t kDotGroup = 4;           // ... unless fewer than this many panels would fit

// Whether the bf16 GEMM takes w (bf16 x from kBf16GemmMinRows rows, ISA Avx512Bf16):
// zero points only with scales applied group by group (not folded into the panels).
inline bool bf16_dot(const Packed& w) {
  return w.zeros.kind == Store::None || w.scale_factors.kind == Store::None;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16,avx2,fma,f16c")

// A unit's 64 weights as 32 bf16 pairs: pair e = 16h + 4c + t (h = 0, 1; c, t < 4) holds
// the codes at positions 2x and 2x + 1, x = 8c + 4h + t (positions as codes_avx512 emits
// them, position_to_k), that is weights k = pair_k(e, 0) and pair_k(e, 1). A panel holds
// pair e at slot(e), which puts k = 0-15, 16-31, 32-47, 48-63 in slots 0-7, 8-15, 16-23,
// 24-31: a group of 16 or 32 weights is a run of slots. x is paired the same way (pair_x).
constexpr int pair_k(int e, int high) {
  const int i = 2 * (e / 16) + high, l = e % 16;
  return l < 8 ? 8 * i + l : 24 + 8 * i + l;
}
constexpr int slot(int e) { return e / 8 == 1 || e / 8 == 2 ? e ^ 24 : e; }  // its own inverse

// Units u0 .. u1 of x (bf16, 64 values a unit) with each unit's values in `order`:
// out[64u + j] = x[64u + order[j]], two word permutes a unit.
inline void order_units(const uint16_t* x, const uint16_t (&order)[kUnit], int64_t u0, int64_t u1, uint16_t* out) {
  const __m512i first = _mm512_loadu_si512(order), second = _mm512_loadu_si512(order + 32);
  for (int64_t u = u0; u < u1; ++u) {
    const __m512i a = _mm512_loadu_si512(x + u * kUnit), b = _mm512_loadu_si512(x + u * kUnit + 32);
    _mm512_storeu_si512(out + u * kUnit, _mm512_permutex2var_epi16(a, first, b));
    _mm512_storeu_si512(out + u * kUnit + 32, _mm512_permutex2var_epi16(a, second, b));
  }
}

// sums[m * runs + r] = the sum of x[m, k] over run r of `length` columns (the last one
// of a row may be shorter) in fp32, 16 at a time; x bf16 [M, K], rows m0 .. m1.
inline void sum_runs_bf16(const uint16_t* x, int64_t K, int64_t length, int64_t m0, int64_t m1, float* sums) {
  const int64_t runs = (K + length - 1) / length;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t r = 0; r < runs; ++r) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = r * length; k < std::min((r + 1) * length, K); k += 16) {
        const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k));
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16)));
      }
      sums[m * runs + r] = _mm512_reduce_add_ps(sum);
    }
}

// Columns a block of the GEMM: whole groups, a multiple of lcm(G, 64) columns, and at most
// kDotDepth, or fewer where M rows of x would exceed kDotXBytes (a block of x stays in
// cache while a group of panels takes it: gemm_bf16_t).
// Whether the GEMM scales group by group (folded scale factors make a layer per channel).
inline bool dot_grouped(const Packed& w) { return w.groups > 1 && w.scale_factors.kind == Store::None; }

inline int64_t dot_depth(const Packed& w, int64_t M) {
  const int64_t step = dot_grouped(w) ? std::lcm(w.group_size, kUnit) : kUnit;
  const int64_t depth = std::clamp<int64_t>(kDotXBytes / (2 * M), kDotMinDepth, kDotDepth);
  return std::min(w.K, step * std::max<int64_t>(1, depth / step));
}

// Panels a group of the GEMM (gemm_bf16_t) for M rows of x: their running sums within
// kDotSumsBytes, at least kDotGroup panels.
inline int64_t gemm_group(int64_t M) { return std::max(kDotGroup, kDotSumsBytes / (M * kDotRows * 4)); }

// Where x's pairs lie for the GEMM's tiles of kTileRows rows: block by block of `depth`
// columns (each block all M rows, M x pairs words), within a block tile by tile, and within
// a tile pair by pair, the tile's rows side by side ([pair][row]). So a tile's broadcasts
// of one pair read one run of words, and a block of x is one contiguous run for all tiles
// (rows K apart map a block's columns of every row onto a few cache sets). The last rows
// (M mod kTileRows) are a narrower tile.
constexpr int64_t kTileRows = 8;
struct XTiles {
  int64_t M, K, depth;
  int64_t full() const { return M / kTileRows * kTileRows; }  // rows in full tiles
  // pair_x's items: a unit of a full tile's rows, or of one of the last rows.
  int64_t tiled_items() const { return full() / kTileRows * (K / kUnit); }
  int64_t items() const { return tiled_items() + (M - full()) * (K / kUnit); }
  // Words from one pair of row m's tile to the next; at(): row m's first pair of the block
  // that starts at column kb.
  int64_t width(int64_t m) const { return m < full() ? kTileRows : M - full(); }
  template <class Word>
  Word* at(Word* x, int64_t kb, int64_t m) const {
    const int64_t pairs = (std::min(K, kb + depth) - kb) / 2, m0 = std::min(m / kTileRows * kTileRows, full());
    return x + kb / 2 * M + m0 * pairs + (m - m0);
  }
};

// Dwords: out[2q] / out[2q + 1] hold element 2q / 2q + 1 (q < 8) of the 8 vectors r, as
// [element 2q of r = 0..7, element 2q + 1 of r = 0..7]: an 8 x 16 transpose.
inline void transpose8x16(const __m512i (&r)[8], __m512i (&out)[8]) {
  __m512i t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // s[4h + k], lane L: element 4L + k of vectors 4h .. 4h + 3.
  for (int h = 0; h < 2; ++h) {
    s[4 * h] = _mm512_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
    s[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
    s[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    s[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int k = 0; k < 4; k += 2) {
    const __m512i p0 = _mm512_shuffle_i32x4(s[k], s[4 + k], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i p1 = _mm512_shuffle_i32x4(s[k + 1], s[5 + k], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i q0 = _mm512_shuffle_i32x4(s[k], s[4 + k], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i q1 = _mm512_shuffle_i32x4(s[k + 1], s[5 + k], _MM_SHUFFLE(3, 2, 3, 2));
    // Elements 4L + k, 4L + k + 1 for L = 0 .. 3.
    out[k / 2] = _mm512_shuffle_i32x4(p0, p1, _MM_SHUFFLE(2, 0, 2, 0));
    out[2 + k / 2] = _mm512_shuffle_i32x4(p0, p1, _MM_SHUFFLE(3, 1, 3, 1));
    out[4 + k / 2] = _mm512_shuffle_i32x4(q0, q1, _MM_SHUFFLE(2, 0, 2, 0));
    out[6 + k / 2] = _mm512_shuffle_i32x4(q0, q1, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// Items i0 .. i1 of x [M, K] as pairs (pair_k, in slot order) in the XTiles layout: an
// item is a unit of a full tile's 8 rows (tile by tile), then a unit of one of the last
// rows.
inline void pair_x(const uint16_t* x, const XTiles& t, int64_t i0, int64_t i1, uint32_t* out) {
  uint16_t order[kUnit];
  for (int e = 0; e < 32; ++e) order[2 * slot(e)] = pair_k(e, 0), order[2 * slot(e) + 1] = pair_k(e, 1);
  const int64_t units = t.K / kUnit, tiled = t.tiled_items();
  alignas(64) uint32_t rows[kTileRows][32];
  for (int64_t i = i0; i < i1; ++i) {
    const bool whole = i < tiled;
    const int64_t u = (whole ? i : i - tiled) % units;
    const int64_t m = whole ? i / units * kTileRows : t.full() + (i - tiled) / units;
    const int64_t kb = u * kUnit / t.depth * t.depth, w = t.width(m);
    uint32_t* dst = t.at(out, kb, m) + (u * kUnit - kb) / 2 * w;
    for (int r = 0; r < (whole ? kTileRows : 1); ++r)
      order_units(x + (m + r) * t.K + u * kUnit, order, 0, 1, reinterpret_cast<uint16_t*>(rows[r]));
    if (!whole) {
      for (int j = 0; j < 32; ++j) dst[j * w] = rows[0][j];
      continue;
    }
    for (int h = 0; h < 2; ++h) {  // pairs 16h .. 16h + 15 of the 8 rows
      __m512i r[8], o[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm512_load_si512(rows[k] + 16 * h);
      transpose8x16(r, o);
      for (int q = 0; q < 8; ++q) _mm512_storeu_si512(dst + (16 * h + 2 * q) * kTileRows, o[q]);
    }
  }
}

// The bf16 patterns of code bytes as their low and high bytes, looked up in the value
// table's byte tables: 4-bit codes in 16 entries in every 128-bit lane (vpshufb), 6-bit in
// 64 (vpermb), 8-bit in 256 (two vpermi2b and a blend on bit 7).
template <int BITS>
struct Bf16Bytes {
  static constexpr int kParts = BITS == 8 ? 4 : 1;
  __m512i lo[kParts], hi[kParts];
  explicit Bf16Bytes(const Packed& w) {
    for (int i = 0; i < kParts; ++i) {
      if (BITS == 4) {
        lo[i] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table_lo)));
        hi[i] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table_hi)));
      } else {
        lo[i] = _mm512_loadu_si512(w.table_lo + 64 * i);
        hi[i] = _mm512_loadu_si512(w.table_hi + 64 * i);
      }
    }
  }
  static __m512i look(const __m512i (&t)[kParts], __m512i c) {
    if constexpr (BITS == 4) return _mm512_shuffle_epi8(t[0], c);
    if constexpr (BITS == 6) return _mm512_permutexvar_epi8(c, t[0]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(c), _mm512_permutex2var_epi8(t[0], c, t[1]),
                                  _mm512_permutex2var_epi8(t[2], c, t[3]));
  }
};

// Bf16 pairs of 16 rows (one row a dword) times per-row fp32 factors f, both words: exact
// where set_scale_factors found every value times every factor exact in bf16.
inline __m512i times_factors(__m512i pairs, __m512 f) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i lo = _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)), f));
  const __m512i hi = _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(pairs, high)), f));
  return _mm512_ternarylogic_epi32(high, hi, _mm512_srli_epi32(lo, 16), 0xEA);  // (A & B) | C
}

// Columns x and x + 1 of a unit of 16 rows into the panel: codes holds, in lane q, the
// codes of rows 4q .. 4q + 3 at positions 2x, 2x + 1 (8 bytes, row by row), then at 2x + 2,
// 2x + 3; the lookup's low and high bytes unpacked give each column's 16 rows as 16 pairs,
// in row order. factors (or null): per row, the scale factors of the unit's quarters of 16
// weights (pair e lies in quarter 2 (c / 2) + h: k = 0-15, 16-31, 32-47, 48-63).
template <int BITS>
inline void panel_columns(const Bf16Bytes<BITS>& t, __m512i codes, int x, const __m512* factors, uint32_t* out) {
  const __m512i l = Bf16Bytes<BITS>::look(t.lo, codes), g = Bf16Bytes<BITS>::look(t.hi, codes);
  __m512i pairs[2] = {_mm512_unpacklo_epi8(l, g), _mm512_unpackhi_epi8(l, g)};
  const int c = x / 8, h = x / 4 % 2, e = 16 * h + 4 * c + x % 4;  // x = 8c + 4h + (e % 4)
  if (factors)
    for (auto& p : pairs) p = times_factors(p, factors[2 * (c / 2) + h]);
  _mm512_storeu_si512(out + slot(e) * kDotRows, pairs[0]);
  _mm512_storeu_si512(out + slot(e + 1) * kDotRows, pairs[1]);
}

// The panel words of unit u of 16 weight rows of 8-bit codes (row pointers a[r]; stored
// in k order, permuted into position order): the codes are transposed, then looked up as
// bf16. A row's 64 codes are 32 words, the pairs of code positions (2x, 2x + 1). Two
// unpacks give, per 128-bit lane, rows 4q .. 4q + 3 of two columns x; a 4 x 4 transpose of
// 128-bit blocks puts rows 4c .. 4c + 3 in lane c. Against looking up row by row and
// transposing the bf16 words, 16 x 16: half the decode's time (FP6 and INT4 g128,
// 4096x4096, when 4- and 6-bit codes went this way), a quarter of the shuffles and no
// staging buffer.
inline void panel_unit16(const Bf16Bytes<8>& t, const uint8_t* const (&a)[16], int64_t u, const __m512i& order,
                         const __m512* factors, uint32_t* out) {
  __m512i r[16], d[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(a[i] + u * kUnit));
  // d[4q + 2s + h], lane c dword t: rows 4q + 2s, 4q + 2s + 1 of column 8c + 4h + t.
  for (int i = 0; i < 8; ++i) {
    d[2 * i] = _mm512_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    d[2 * i + 1] = _mm512_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  // r[4q + 2h + g], lane c: rows 4q .. 4q + 3 of columns 8c + 4h + 2g and 8c + 4h + 2g + 1.
  for (int q = 0; q < 4; ++q)
    for (int h = 0; h < 2; ++h) {
      r[4 * q + 2 * h] = _mm512_unpacklo_epi32(d[4 * q + h], d[4 * q + 2 + h]);
      r[4 * q + 2 * h + 1] = _mm512_unpackhi_epi32(d[4 * q + h], d[4 * q + 2 + h]);
    }
  for (int hg = 0; hg < 4; ++hg) {
    // 128-bit blocks: lane c of r[4q + hg] to lane q of column block c.
    const __m512i t0 = _mm512_shuffle_i32x4(r[hg], r[4 + hg], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i t1 = _mm512_shuffle_i32x4(r[hg], r[4 + hg], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i t2 = _mm512_shuffle_i32x4(r[8 + hg], r[12 + hg], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i t3 = _mm512_shuffle_i32x4(r[8 + hg], r[12 + hg], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i block[4] = {_mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(3, 1, 3, 1)),
                              _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(3, 1, 3, 1))};
    for (int c = 0; c < 4; ++c) panel_columns<8>(t, block[c], 8 * c + 2 * hg, factors, out);
  }
}

// As panel_unit16, for 4- and 6-bit codes: the packed bytes are transposed instead of the
// codes (half as many bytes), then split into the codes of 16 rows at once. Packed byte j
// (j < 32) of a row holds positions j (low nibble) and j + 32 (high nibble); a 6-bit code
// at position p takes its low two bits from bits 2 (p / 16) and 2 (p / 16) + 1 of byte
// p % 16 of the 2-bit plane. t[k] (dword r: row r's packed bytes 4k .. 4k + 3) gives
// positions 4k .. 4k + 3 (low nibbles), that is columns 2k and 2k + 1, and 32 + 4k .. 35 + 4k
// (high nibbles), columns 16 + 2k and 17 + 2k. Its bytes are ordered in each lane (rows
// 4q .. 4q + 3) as panel_columns takes them. Against transposing the codes (panel_unit16's
// way), in turn in one process at M = 64 on 4096x4096 (prefetched alike): 1.05-1.12x the
// GEMM's speed for FP6 E3M2 and FP4 per channel, INT4 g128, NVFP4 and MXFP6.
template <int BITS>
inline void panel_unit16_nibbles(const Bf16Bytes<BITS>& tb, const uint8_t* const (&a)[16],
                                const uint8_t* const (&b)[16], int64_t u, const __m512* factors, uint32_t* out) {
  const __m512i reorder = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
  // Z[i] = rows i, 4 + i (i < 4) and 8 + i, 12 + i (i >= 4), 32 bytes each.
  __m512i z[8], t[8];
  for (int i = 0; i < 8; ++i) {
    const int r = i < 4 ? i : 4 + i;
    z[i] = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r] + u * 32))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r + 4] + u * 32)), 1);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512i lo = _mm512_unpacklo_epi32(z[2 * i], z[2 * i + 1]), hi = _mm512_unpackhi_epi32(z[2 * i], z[2 * i + 1]);
    z[2 * i] = lo, z[2 * i + 1] = hi;
  }
  // bk[s][k], lane L: dword k (L even) or 4 + k (L odd) of rows 8s .. 8s + 3 (L < 2) or 8s + 4 .. (L >= 2).
  __m512i bk[2][4];
  for (int s = 0; s < 2; ++s) {
    bk[s][0] = _mm512_unpacklo_epi64(z[4 * s], z[4 * s + 2]);
    bk[s][1] = _mm512_unpackhi_epi64(z[4 * s], z[4 * s + 2]);
    bk[s][2] = _mm512_unpacklo_epi64(z[4 * s + 1], z[4 * s + 3]);
    bk[s][3] = _mm512_unpackhi_epi64(z[4 * s + 1], z[4 * s + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_epi8(_mm512_shuffle_i32x4(bk[0][k], bk[1][k], _MM_SHUFFLE(2, 0, 2, 0)), reorder);
    t[4 + k] = _mm512_shuffle_epi8(_mm512_shuffle_i32x4(bk[0][k], bk[1][k], _MM_SHUFFLE(3, 1, 3, 1)), reorder);
  }
  // 6-bit: f[d], dword r: row r's 2-bit plane bytes 4d .. 4d + 3, ordered as t.
  __m512i f[4];
  if constexpr (BITS == 6) {
    __m512i y[4];
    for (int i = 0; i < 4; ++i) {
      y[i] = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[i] + u * 16)));
      for (int l = 1; l < 4; ++l)
        y[i] = _mm512_inserti32x4(y[i], _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[4 * l + i] + u * 16)), l);
    }
    const __m512i v0 = _mm512_unpacklo_epi32(y[0], y[1]), v1 = _mm512_unpackhi_epi32(y[0], y[1]);
    const __m512i v2 = _mm512_unpacklo_epi32(y[2], y[3]), v3 = _mm512_unpackhi_epi32(y[2], y[3]);
    f[0] = _mm512_shuffle_epi8(_mm512_unpacklo_epi64(v0, v2), reorder);
    f[1] = _mm512_shuffle_epi8(_mm512_unpackhi_epi64(v0, v2), reorder);
    f[2] = _mm512_shuffle_epi8(_mm512_unpacklo_epi64(v1, v3), reorder);
    f[3] = _mm512_shuffle_epi8(_mm512_unpackhi_epi64(v1, v3), reorder);
  }
  const auto emit = [&](__m512i codes, int x) { panel_columns<BITS>(tb, codes, x, factors, out); };
  const __m512i low4 = _mm512_set1_epi8(15);
  for (int k = 0; k < 8; ++k) {
    if constexpr (BITS == 4) {
      emit(_mm512_and_si512(t[k], low4), 2 * k);
      emit(_mm512_and_si512(_mm512_srli_epi16(t[k], 4), low4), 16 + 2 * k);
    } else {
      // Nibble bits to code bits 2-5 (mask 0x3C), the 2-bit field (bits 2 (p / 16)) to 0-1.
      const __m512i nib = _mm512_set1_epi8(0x3C), two = _mm512_set1_epi8(3);
      const int shift = 2 * (k / 4);
      const __m512i flo = _mm512_and_si512(_mm512_srli_epi16(f[k % 4], shift), two);
      const __m512i fhi = _mm512_and_si512(_mm512_srli_epi16(f[k % 4], shift + 4), two);
      emit(_mm512_ternarylogic_epi32(_mm512_slli_epi16(t[k], 2), nib, flo, 0xEA), 2 * k);
      emit(_mm512_ternarylogic_epi32(_mm512_srli_epi16(t[k], 2), nib, fhi, 0xEA), 16 + 2 * k);
    }
  }
}

// Rows n0 .. n0 + rows (at most kDotRows; rows past the matrix repeat its last row, their
// outputs masked) of units u0 .. u1 into panel [(u1 - u0) * 32][kDotRows]: the values,
// times their scale factors where fac is given (fac[g][r]: group g0 + g of row n0 + r).
template <int BITS>
void dot_panel(const Packed& w, const float* fac, int64_t g0, int64_t n0, int64_t rows, int64_t u0, int64_t u1,
               uint32_t* panel) {
  const Bf16Bytes<BITS> bytes(w);
  alignas(64) uint8_t positions[kUnit];
  for (int p = 0; p < kUnit; ++p) positions[p] = static_cast<uint8_t>(position_to_k(p));
  const __m512i order = _mm512_load_si512(positions);
  // Row pointers of the 48 rows. The codes of 16 rows are 16 streams (32 with a 2-bit
  // plane) that the hardware prefetchers did not keep up with (the decode's loads took most
  // of its samples): each is fetched kAheadUnits units ahead, in the order the units are
  // decoded (row group by row group); 1.03-1.10x the GEMM's speed at M = 64 (4096x4096, in
  // turn in one process, FP4 to FP8).
  const uint8_t* a_all[kDotRows];
  const uint8_t* b_all[kDotRows];
  for (int64_t r = 0; r < kDotRows; ++r) {
    const int64_t n = n0 + std::min(r, rows - 1);
    a_all[r] = w.plane_a + n * w.lda;
    b_all[r] = w.plane_b ? w.plane_b + n * w.ldb : nullptr;
  }
  constexpr int64_t kAheadUnits = 8, kBytesA = BITS == 8 ? kUnit : kUnit / 2, kBytesB = kUnit / 4;
  const int64_t units = u1 - u0;
  for (int64_t j = 0; j < kDotRows / 16; ++j) {
    const uint8_t* a[16];
    const uint8_t* b[16];
    for (int i = 0; i < 16; ++i) a[i] = a_all[16 * j + i], b[i] = b_all[16 * j + i];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t ahead = j * units + (u - u0) + kAheadUnits, jt = ahead / units, ut = u0 + ahead % units;
      if (jt < kDotRows / 16) {
        if (ut * kBytesA % 64 == 0)
          for (int i = 0; i < 16; ++i) _mm_prefetch(reinterpret_cast<const char*>(a_all[16 * jt + i] + ut * kBytesA), _MM_HINT_T0);
        if (BITS == 6 && ut * kBytesB % 64 == 0)
          for (int i = 0; i < 16; ++i) _mm_prefetch(reinterpret_cast<const char*>(b_all[16 * jt + i] + ut * kBytesB), _MM_HINT_T0);
      }
      __m512 factors[4];
      if (fac)
        for (int q = 0; q < 4; ++q)
          factors[q] = _mm512_loadu_ps(fac + (w.group_of[u * kUnit / 8 + 2 * q] - g0) * kDotRows + 16 * j);
      uint32_t* dst = panel + (u - u0) * 32 * kDotRows + 16 * j;
      if constexpr (BITS == 8)
        panel_unit16(bytes, a, u, order, fac ? factors : nullptr, dst);
      else
        panel_unit16_nibbles<BITS>(bytes, a, b, u, fac ? factors : nullptr, dst);
    }
  }
}

// Outputs to y: fp32, or bf16 words rounded to nearest even as torch rounds fp32 (NaN to
// 0x7FC0; subnormals kept, where vcvtneps2bf16 would flush them).
inline void store_y(float* y, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(y, mask, v); }
inline void store_y(uint16_t* y, __mmask16 mask, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), one), _mm512_set1_epi32(0x7FFF));
  __m512i words = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  words = _mm512_mask_mov_epi32(words, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(y, mask, _mm512_cvtepi32_epi16(words));
}

// sums[m][0..48) += sum over the block of x[m, k] * panel[k] for MB rows of x (x as bf16
// pairs, the tile's rows side by side, ldx words a pair: XTiles), each group's sum
// (group_pairs words; per channel one group a block) times its scales sc[g][0..48) added
// at once (first: the block is K's first, so its first group's products are stored, sums
// not read): 8 rows' sums in 24 registers. In K's last block (out_y given) the last
// group's totals go to y (rows ldy apart, mask[j]: the panel's live rows) instead: a
// separate pass from sums to y afterwards ran 0.92-1.00x as fast (M = 512) and 0.90-0.96x
// (M = 64), in turn in one process. (Running totals in another 12 registers, 4 rows a
// tile, ran 0.73-0.93x as fast with groups of 16 and 32 and 0.63-0.69x with 128:
// 4096x4096, M = 512, separate runs.) ZP: each group's sums S become S - z X first, z its
// zero points zt[g][0..48), X the group's sum of row m of x, xs[m * ldxs + g].
template <int MB, bool ZP, class Out>
void dot_tile(const uint32_t* panel, int64_t pairs, int64_t group_pairs, const float* sc, const float* zt,
              const float* xs, int64_t ldxs, const uint32_t* x, int64_t ldx, float* sums, bool first,
              const __m512 (&bias)[3], Out* out_y, int64_t ldy, const __mmask16 (&mask)[3]) {
  __m512 acc[MB][3];
  for (int64_t p0 = 0, g = 0; p0 < pairs; p0 += group_pairs, ++g) {
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < 3; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t p = p0, p1 = std::min(pairs, p0 + group_pairs); p < p1; ++p) {
      __m512bh wv[3];
      for (int j = 0; j < 3; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(panel + p * kDotRows + 16 * j);
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[p * ldx + m]));
        for (int j = 0; j < 3; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv[j], xv);
      }
    }
    // The group's sums times its scales, added to the running sums. The branches hoisted and
    // the loops unrolled keep the 24 sums in registers (with the branches inside they went
    // through the stack at every group's end): INT4 and FP8 g128 on 4096x4096, separate
    // processes in turn, 1.05-1.09x at M = 512 and 1.02-1.08x at M = 64.
    const __m512 s[3] = {_mm512_loadu_ps(sc + g * kDotRows), _mm512_loadu_ps(sc + g * kDotRows + 16),
                         _mm512_loadu_ps(sc + g * kDotRows + 32)};
    __m512 z[3];
    if constexpr (ZP)
      for (int j = 0; j < 3; ++j) z[j] = _mm512_loadu_ps(zt + g * kDotRows + 16 * j);
    const bool init = first && g == 0, to_y = out_y && p0 + group_pairs >= pairs;
    const auto flush = [&](auto store) {
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        __m512 xg;
        if constexpr (ZP) xg = _mm512_set1_ps(xs[m * ldxs + g]);
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j) {
          float* out = sums + m * kDotRows + 16 * j;
          const __m512 a = ZP ? _mm512_fnmadd_ps(xg, z[j], acc[m][j]) : acc[m][j];  // S - X z
          store(m, j, init ? _mm512_mul_ps(a, s[j]) : _mm512_fmadd_ps(a, s[j], _mm512_loadu_ps(out)));
        }
      }
    };
    if (to_y)
      flush([&](int m, int j, __m512 sum) { store_y(out_y + m * ldy + 16 * j, mask[j], _mm512_add_ps(sum, bias[j])); });
    else
      flush([&](int m, int j, __m512 sum) { _mm512_storeu_ps(sums + m * kDotRows + 16 * j, sum); });
  }
}

// The GEMM's panels handed out to its threads a group at a time from a shared counter, the
// groups shrinking towards the end (a thread slowed by other load on the machine takes
// fewer instead of holding the others up). Against each thread taking an equal share of
// the panels (4096x4096, median times in turn call by call with torch's in one process):
// 1.02-1.05x at M = 64 and 1.00-1.02x at M = 512.
struct PanelQueue {
  int64_t panels, threads;
  std::atomic<int64_t> next{0};
  // The next panels [p0, p1), at most `group` of them; p0 == p1 when none are left.
  std::pair<int64_t, int64_t> take(int64_t group) {
    int64_t p0 = next.load(std::memory_order_relaxed), size;
    do size = std::clamp<int64_t>((panels - p0) / (2 * threads), 1, group);
    while (p0 < panels && !next.compare_exchange_weak(p0, p0 + size, std::memory_order_relaxed));
    return {std::min(p0, panels), std::min(p0 + size, panels)};
  }
};

// The runs of K over which the GEMM sums x v before the scales apply: its groups, or per
// channel its blocks of K (dot_depth).
inline int64_t dot_run(const Packed& w, int64_t M) { return dot_grouped(w) ? w.group_size : dot_depth(w, M); }

// Panels of kDotRows weight rows of y [M, N] = x w^T (+ bias, fp32 [N], or null), x bf16
// [M, K] as pairs, as the queue hands them out; y fp32 or bf16 (store_y). With zero points
// xsum holds the sums of x over each run of K (dot_run), [M][runs].
template <int BITS, class Out>
void gemm_bf16_t(const Packed& w, const uint32_t* x, const float* xsum, int64_t M, PanelQueue& queue,
                 const float* bias, Out* y) {
  const int64_t K = w.K, G = w.group_size, N = w.N;
  const bool folded = w.scale_factors.kind != Store::None, grouped = dot_grouped(w);
  const bool zp = w.zeros.kind != Store::None;
  Packed wb = w;  // a block's scales, or its factors
  if (folded) wb.scales = w.scale_factors;
  const int64_t depth = dot_depth(w, M), group_pairs = grouped ? G / 2 : depth / 2;
  const XTiles xt{M, K, depth};
  std::vector<uint32_t> panel(kDotRows * depth / 2);
  std::vector<float> sc(kDotRows * (depth / G + 2)), fac(folded ? sc.size() : 0), zt(zp ? sc.size() : 0);
  const int64_t run = dot_run(w, M), runs = (K + run - 1) / run;
  // Panels go in groups, block of K by block: each block of x (M x depth) serves the whole
  // group while in cache, where panel by panel all of x was read again for each panel (x of
  // 16 MB, M = 2048 on 4096x4096: 0.77-0.90x as fast as with x row by row, separate runs).
  // The group's running sums stay in tot, [panel][M][kDotRows], not in y: rows of y are N
  // apart, and 8 rows' stores and reloads at that stride (a multiple of 4 KiB) contend for
  // the same cache sets (INT4 g128 at M = 512: 1.03-1.06x with tot).
  const int64_t group = gemm_group(M);
  const std::unique_ptr<float[]> tot(new float[group * M * kDotRows]);  // written before it is read: not zeroed
  for (auto [pg, pe] = queue.take(group); pg < pe; std::tie(pg, pe) = queue.take(group)) {
    for (int64_t kb = 0; kb < K; kb += depth) {
      const int64_t kb_end = std::min(K, kb + depth), pairs = (kb_end - kb) / 2;
      wb.u_begin = kb / kUnit, wb.u_end = kb_end / kUnit;
      RowScales rs(wb, Isa::Avx512);
      for (int64_t p = pg; p < pe; ++p) {
        const int64_t n0 = p * kDotRows, rows = std::min(kDotRows, N - n0);
        __mmask16 mask[3];
        __m512 row_bias[3];
        for (int j = 0; j < 3; ++j) {
          mask[j] = static_cast<__mmask16>((1u << std::clamp<int64_t>(rows - 16 * j, 0, 16)) - 1);
          // -0: adding it leaves every sum as it is, -0 included.
          row_bias[j] = bias ? _mm512_maskz_loadu_ps(mask[j], bias + n0 + 16 * j) : _mm512_set1_ps(-0.0f);
        }
        // Scales (or factors) as [group][row], the rows past the matrix repeating its last.
        float* table = folded ? fac.data() : sc.data();
        for (int64_t r = 0; r < kDotRows; ++r) {
          const float* srow = rs.scales(n0 + std::min(r, rows - 1));
          for (int64_t g = rs.g0; g < rs.g1; ++g) table[(g - rs.g0) * kDotRows + r] = srow[g];
          if (!zp) continue;
          const float* zrow = rs.zeros(n0 + std::min(r, rows - 1));
          for (int64_t g = rs.g0; g < rs.g1; ++g) zt[(g - rs.g0) * kDotRows + r] = zrow[g];
        }
        if (folded) std::fill_n(sc.begin(), kDotRows, w.scale_multiplier);
        dot_panel<BITS>(w, folded ? fac.data() : nullptr, rs.g0, n0, rows, wb.u_begin, wb.u_end, panel.data());
        float* sums = tot.get() + (p - pg) * M * kDotRows;
        int64_t m = 0;
        const auto tile = [&](auto mb, auto zero_points) {
          dot_tile<decltype(mb)::value, decltype(zero_points)::value>(
              panel.data(), pairs, group_pairs, sc.data(), zt.data(), zp ? xsum + m * runs + kb / run : nullptr, runs,
              xt.at(x, kb, m), xt.width(m), sums + m * kDotRows, kb == 0, row_bias,
              kb_end == K ? y + m * N + n0 : nullptr, N, mask);
          m += decltype(mb)::value;
        };
        const auto tiles = [&](auto zero_points) {
          while (m + 8 <= M) tile(std::integral_constant<int, 8>{}, zero_points);
          if (m + 4 <= M) tile(std::integral_constant<int, 4>{}, zero_points);
          while (m < M) tile(std::integral_constant<int, 1>{}, zero_points);
        };
        zp ? tiles(std::true_type{}) : tiles(std::false_type{});
      }
    }
  }
}

#pragma GCC pop_options
#endif  // FPBENCH_X86

}  // namespace
