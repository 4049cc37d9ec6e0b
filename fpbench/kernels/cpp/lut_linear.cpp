// Weight-only linear kernels for every format whose codes have 4, 6 or 8 bits.
//
// y[m, n] = sum_k x[m, k] * w[n, k],   w[n, k] = (value(code[n, k]) - zero[n, g]) * scale[n, g]
//
// with g = k / G (G = K for per-channel scales) and no zero point for symmetric formats.
// The kernel holds no per-format code: ``table`` holds the exact fp32 value of every code
// (computed in Python from the format's own decoder), ``decode`` the format's parameters
// for the arithmetic decoders that replace the table where they are faster (both from
// fpbench/kernels/packing.py), and the weight above is computed in
// fp32 with exactly the operations of QuantizedWeight.dequantize(), so the dequantized
// weights are bit-identical to the simulator's and the outputs differ from a float64
// product only by the fp32 summation.
//
// Packed layout (written by fpbench/kernels/packing.py, which documents it in full): each
// row of K weights (K a multiple of 64) is a sequence of 64-weight units; inside a unit,
// code *positions* 0..63 hold weights in the order the SIMD decode produces them
// (position_to_k in packing.py). 8-bit codes take one byte per weight in natural order;
// 4-bit codes
// take 32 bytes per unit, position t in the low nibble of byte t and position 32 + t in
// the high nibble; 6-bit codes are the "4+2" split (ZeroQuant(4+2), Sec. 5): the high 4
// bits in a 4-bit plane laid out as above and the low 2 bits in a 2-bit plane of 16
// bytes per unit, position p in bits 2*(p/16)..2*(p/16)+1 of byte p % 16.
//
// Decode (see Dec in lut_common.h for the details): 4- and 6-bit codes through the table. Every
// value of a format with at most 8 bits is exact in bf16 (at most 8 significant bits,
// exponents within bf16's range; build checks it), so the table is held as two 16-byte
// tables per 16 codes (low and high byte of the bf16 pattern). vpshufb looks up 32
// (AVX2) or 64 (AVX-512) codes at once in a 16-entry table; 6-bit codes select among 4
// such tables with a blend tree on their upper bits. Interleaving the two byte planes
// gives bf16 words, and a shift (even words) or a mask (odd words) turns them into fp32
// without any further shuffle. 8-bit codes, stored in natural order, decode by
// arithmetic from the format parameters Python passes (integers by conversion,
// minifloats by placing their bits in an fp16 pattern), or, for a format those do not
// cover, are gathered from the fp32 table.
//
// bf16 x on a CPU with AVX-512 BF16 (and VBMI: ISA Avx512Bf16) takes the bf16 dot-product
// kernels instead: the GEMV of lut_bf16_gemv.h below kBf16GemmMinRows rows, the GEMM of
// lut_bf16.h from there: the same weights, exact products, the scale applied per group
// sum (lut_bf16.h's header states the bound).
//
// ISA: AVX-512 with VBMI (and BF16), AVX-512 (F+BW+VL), AVX2 (+FMA, F16C) and portable scalar code
// live in one binary; the best one the CPU supports is picked at run time, or a narrower
// one forced by the caller. On a non-x86 build only the scalar code exists. Workers clear
// flush-to-zero and denormals-are-zero while they run, and the build uses no fast-math,
// so subnormal values stay exact.
//
// Files (one translation unit, everything but KernelLinear internal): lut_common.h (the
// shared types), lut_scalar.h, lut_avx2.h, lut_avx512.h, lut_bf16.h, lut_bf16_gemv.h (the
// kernels of each ISA), lut_pack.h (a layer's tensors to a Packed); this file dispatches: x's order, threads,
// GEMV or GEMM, and the Python bindings.

#include "kernel_linear.h"
#include "lut_bf16_gemv.h"
#include "lut_pack.h"
#include "lut_scalar.h"

#include <ATen/Parallel.h>

#include <unistd.h>

#include <atomic>
#include <chrono>

namespace {

// ---------------------------------------------------------------- dispatch

// Rows of x (M x K) in the order a GEMV reads them, into out, column c of each 64-column
// unit holding k:
// - Avx512: as the AVX-512 table decode emits weights (its fp32 vector i holds
//   k = 8i.. and 32 + 8i..): c = 16i + 8h + j holds k = 32h + 8i + j;
// - Nibbles: as row_avx512_lookup reads codes: c = 16i + 8h + l holds the weight of
//   position 32h + 4l + i;
// - Positions (Dec::Fp16Nibble): c holds the weight of position c, times `factor` (exact:
//   a power of two);
// - Bytes, BytePositions: as row_avx512_vbmi emits weights: c = 16i + d holds k (8-bit
//   codes) or the weight of position (6-bit) 16 (d / 4) + 4i + d % 4.
// Plain loops: torch's index_select and multiply took 10-15 us a call, a sixth of a small
// layer's GEMV.
enum class XOrder { Avx512, Nibbles, Positions, Bytes, BytePositions };

void order_x(const float* x, int64_t M, int64_t K, XOrder how, float factor, float* out) {
  int order[kUnit];
  for (int c = 0; c < kUnit; ++c) {
    const int i = c / 16, h = c % 16 / 8, j = c % 8;
    const int transposed = c % 16 / 4 * 16 + 4 * i + c % 4;  // row_avx512_vbmi's lane c
    order[c] = how == XOrder::Avx512          ? 32 * h + 8 * i + j
               : how == XOrder::Nibbles       ? position_to_k(32 * h + 4 * j + i)
               : how == XOrder::Bytes         ? transposed
               : how == XOrder::BytePositions ? position_to_k(transposed)
                                              : position_to_k(c);
  }
  for (int64_t r = 0; r < M * K; r += kUnit)
    for (int c = 0; c < kUnit; ++c)
      out[r + c] = how == XOrder::Positions ? x[r + order[c]] * factor : x[r + order[c]];
}

// Calls f(bits, decoder, has_zero_points) with compile-time values, for the combinations
// make_packed can produce.
template <class F>
void with_format(const Packed& w, F&& f) {
  using std::integral_constant;
  using T = std::true_type;
  using N = std::false_type;
  constexpr auto B4 = integral_constant<int, 4>{};
  constexpr auto B6 = integral_constant<int, 6>{};
  constexpr auto B8 = integral_constant<int, 8>{};
  constexpr auto table = integral_constant<Dec, Dec::Table>{};
  constexpr auto sint = integral_constant<Dec, Dec::SignedInt>{};
  constexpr auto unsig = integral_constant<Dec, Dec::UnsignedInt>{};
  constexpr auto flt = integral_constant<Dec, Dec::Float>{};
  constexpr auto special = integral_constant<Dec, Dec::FloatSpecial>{};
  constexpr auto signmag = integral_constant<Dec, Dec::SignMagnitude>{};
  const bool zp = w.zeros.kind != Store::None;
  switch (w.bits * 100 + static_cast<int>(w.dec) * 10 + zp) {
    case 400: f(B4, table, N{}); break;
    case 401: f(B4, table, T{}); break;
    case 600: f(B6, table, N{}); break;
    case 601: f(B6, table, T{}); break;
    case 660: f(B6, signmag, N{}); break;
    case 800: f(B8, table, N{}); break;
    case 801: f(B8, table, T{}); break;
    case 810: f(B8, sint, N{}); break;
    case 811: f(B8, sint, T{}); break;
    case 820: f(B8, unsig, N{}); break;
    case 821: f(B8, unsig, T{}); break;
    case 830: f(B8, flt, N{}); break;
    case 840: f(B8, special, N{}); break;
    default: TORCH_CHECK(false, "no kernel for ", w.bits, "-bit codes with decoder ", static_cast<int>(w.dec),
                         zp ? " and zero points" : "", "; pass zero points only for integer formats");
  }
}

// Subnormal fp32 patterns are part of the float decode (and of exact fp32 sums): the
// caller's thread may have set flush-to-zero / denormals-are-zero (torch.set_flush_denormal),
// so each worker clears both for the duration of the kernel.
struct KeepDenormals {
#if FPBENCH_X86
  unsigned saved = _mm_getcsr();
  KeepDenormals() { _mm_setcsr(saved & ~(_MM_FLUSH_ZERO_ON | 0x0040u)); }  // 0x0040: DAZ
  ~KeepDenormals() { _mm_setcsr(saved); }
#endif
};

int64_t row_grain(int64_t N) {  // rows per task: a few tasks per thread balance the load
  return std::max<int64_t>(1, N / (4 * at::get_num_threads()));
}

// Calls f(n0, n1) for the rows 0..N of a weight of N x K. A large one (from kDynamicWeights
// weights) is handed out in chunks from a shared counter: a thread slowed by other load
// on the machine takes fewer chunks instead of holding the others up at the end
// (at::parallel_for gives each thread one equal range). At M = 1 on this AMD EPYC, timed
// in turn in one process: 1.02-1.19x on 4096x4096 and 4096x14336; on the 576-1536-row
// layers of the default model the chunks' setup cost more than it saved (0.74-0.98x).
constexpr int64_t kDynamicWeights = int64_t{1} << 22;

template <class F>
void parallel_rows(int64_t N, int64_t K, F&& f) {
  const int64_t threads = at::get_num_threads();
  if (N * K < kDynamicWeights || threads == 1) return at::parallel_for(0, N, row_grain(N), f);
  const int64_t chunk = std::max<int64_t>(8, N / (16 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t n0; (n0 = next.fetch_add(chunk)) < N;) f(n0, std::min(n0 + chunk, N));
  });
}

// Units of K per block of a SIMD GEMV (see gemv): x's block, M x 4 bytes per column,
// stays in a 32 KiB L1 beside the streaming codes. A block may start inside a group: the
// GEMVs that take blocks find each unit's group in group_of.
//
// The AVX-512 4-bit GEMVs take blocks, and the 8-bit ones from 2 rows of x on: the 4-bit
// ones need 64 bytes of x per 8 bytes of codes, and from L2 that paced them. At M = 1 on 4096x14336 (AMD EPYC with AVX-512, 2 threads,
// with and without blocks in turn in one process): INT4 per channel 1.16-1.24x, FP4 per
// channel 1.15-1.52x, INT4 g128 1.56x (once the scales of the rows ahead were
// prefetched; 0.90x before), NVFP4 and MXFP4 0.98-1.02x; at M = 4 INT4 1.32-1.41x. The
// 6- and 8-bit GEMVs, half as hungry for x per byte, gained nothing clear at M = 1 (FP6
// 0.84-0.99x, INT8 0.86-0.99x, FP8 g128 0.83x; FP8 per channel 0.98-1.50x over five runs),
// nor did the AVX2 4-bit GEMV (0.96-0.98x). With more rows of x, whose block is M times
// larger, the 8-bit ones did: FP8 per channel at M = 4 1.51x (4096x4096) and 1.03x
// (4096x14336); at M = 8 FP8 1.21x / 1.01x and INT8 1.19x / 1.04x, where FP6 ran
// 0.79-1.00x (its tables are rebuilt for every block).
int64_t block_units(const Packed& w, Isa isa, int64_t M) {
  constexpr int64_t kBlockXBytes = 16 * 1024;
  const int64_t units = w.K / kUnit;
  if (isa < Isa::Avx512 || !(w.bits == 4 || (w.bits == 8 && M > 1))) return units;
  return std::min(units, std::max<int64_t>(4, kBlockXBytes / (4 * kUnit * M)));
}

// y [M, N] = x [M, K] w^T in fp32 for fewer than kBlockedMinRows rows (the SIMD ISAs) or
// any number (scalar): each thread takes whole weight rows against all rows of x. The SIMD
// GEMVs take a thread's rows one block of K at a time (block_units: a whole row but for
// some AVX-512 GEMVs), each block's sums added to y: a row of K = 14336 holds 56 KiB of
// fp32 x, more than an L1; read from L2 for every weight row, it held INT4 per channel at
// 54 against 74 G weights/s with K = 4096 (AMD EPYC with AVX-512, M = 1, one process).
void gemv(Packed w, Isa isa, const float* x, int64_t M, float* y) {
  const int64_t K = w.K;
  const bool nibble = isa == Isa::Avx2 && w.dec == Dec::Fp16Nibble;
  if (w.dec == Dec::Fp16Nibble && !nibble) w.dec = Dec::Table;
  std::vector<float> ordered;
#if FPBENCH_X86
  const bool vbmi = isa >= Isa::Avx512Vbmi && avx512_vbmi(w);
  const bool lookup = isa >= Isa::Avx512 && !vbmi && avx512_lookup(w);
  if (isa >= Isa::Avx512 || nibble) {
    ordered.resize(M * K);
    const XOrder how = nibble  ? XOrder::Positions
                       : vbmi  ? (w.bits == 8 ? XOrder::Bytes : XOrder::BytePositions)
                       : lookup ? XOrder::Nibbles
                                : XOrder::Avx512;
    order_x(x, M, K, how, w.pow2_16, ordered.data());
    x = ordered.data();
  }
#endif
  const int64_t block = block_units(w, isa, M), units = K / kUnit;
  parallel_rows(w.N, K, [&](int64_t n0, int64_t n1) {
    const KeepDenormals keep;
#if FPBENCH_X86
    for (int64_t u = 0; isa != Isa::Scalar && u < units; u += block) {
      const Packed wb = w.block(u, block, kPrefetchBytes / unit_bytes(w.bits));
      if (vbmi) {
        rows_avx512_vbmi(wb, x, K, M, n0, n1, y, w.N);
      } else if (lookup) {
        rows_avx512_lookup(wb, x, K, M, n0, n1, y, w.N);
      } else if (isa >= Isa::Avx512) {
        with_format(w, [&](auto b, auto d, auto z) { rows_avx512_t<decltype(b)::value, decltype(d)::value, decltype(z)::value>(wb, x, K, M, n0, n1, y, w.N); });
      } else if (nibble) {
        rows_avx2_t<6, Dec::Fp16Nibble, false>(wb, x, K, M, n0, n1, y, w.N);
      } else {
        with_format(w, [&](auto b, auto d, auto z) { rows_avx2_t<decltype(b)::value, decltype(d)::value, decltype(z)::value>(wb, x, K, M, n0, n1, y, w.N); });
      }
    }
    if (isa != Isa::Scalar) return;
#endif
    rows_scalar(w, x, K, M, n0, n1, y, w.N);
  });
}

#if FPBENCH_X86
// The bf16 GEMV's prefetch distance, twice the fp32 GEMVs' (it streams faster): at M = 1 on
// 4096x14336 (AMD EPYC with AVX-512 BF16, distances in turn call by call in one process)
// INT4 per channel 1.12-1.13x and INT4 g128 1.17x against 4 KiB; FP6, INT8 and NVFP4
// 0.97-1.07x, and 0.97-1.04x on 4096x4096.
constexpr int64_t kBf16PrefetchBytes = 8192;

// Columns of x a block of the bf16 GEMV from 2 rows of x, and at M = 1 for 4-bit codes: the
// block (M x 2 bytes a column) stays in L1 beside the streaming codes. On 4096x4096 (AMD
// EPYC with AVX-512 BF16, Zen 5, in turn call by call in one process) blocks ran 1.08-1.21x
// as fast as whole rows at M = 8 (FP6, INT4 g128, INT8 per channel) and INT8 1.28x at M = 4;
// at M = 12 and 15, with blocks of 8-10 units, 0.80-0.96x: there the bf16 GEMM takes over
// (kBf16GemmMinRows). At M = 1 on 4096x14336 (28 KiB of x a row; Zen 4, 32 KiB of L1, the
// same way) the 4-bit GEMVs, which read 4 bytes of x a byte of codes, ran 1.63-1.70x as
// fast per channel and 1.10x with g128 in blocks; the 8-bit ones 0.96-1.00x, FP6 0.84x.
// Measured again on the current loops: which layers take blocks at M = 1, bf16_whole_rows.
constexpr int64_t kBf16BlockXBytes = 16 * 1024;

// This CPU's L1 data cache (32 KiB where the system does not say).
int64_t l1d_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL1_DCACHE_SIZE
    const long size = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    if (size > 0) return static_cast<int64_t>(size);
#endif
    return int64_t{32 * 1024};
  }();
  return bytes;
}

// Whether the bf16 GEMV at M = 1 takes whole rows. The decoders that stream codes fastest
// (per channel; 4-bit codes in groups of 128 or more, one FMA a pair of units) read x
// fastest too, and take blocks of K where a row of x (2 K bytes) fills more than 3/4 of
// L1; the others (6-bit codes; 8-bit and 4-bit ones in groups, 4-bit below 128) keep whole
// rows. At M = 1, blocks and whole rows in turn call by call in one process (Zen 4, 32 KiB
// of L1, 2 threads): on 4096x14336 (28 KiB of x) FP8 E4M3 and E5M2 per channel ran
// 1.31-1.35x as fast in blocks with the weights in cache and 1.11x cold, INT8 per channel
// 1.02-1.04x, INT4, INT4 asymmetric and FP4 per channel 1.04-1.43x cold; grouped 8-bit
// codes 0.94-1.08x and FP6 0.91-1.02x. Whole rows against blocks for 4-bit codes, cold on
// 4096x14336 and 2048x28672: FP4 g16 1.21-1.25x, NVFP4 1.05-1.18x, MXFP4 1.06-1.14x, FP4
// g32 1.04-1.10x, INT4 g64 0.99-1.07x, INT4 asymmetric g32 0.99-1.02x; INT4 and FP4 per
// channel 0.48-0.73x and INT4 g128 0.63x (2048x28672), but 1.05x and 1.10x on 4096x11008
// (22 KiB of x).
bool bf16_whole_rows(const Packed& w, int64_t M) {
  if (M != 1) return false;
  const bool fast = w.groups == 1 || (w.bits == 4 && w.group_size >= 2 * kUnit);
  return w.bits == 6 || !fast || 4 * (2 * w.K) <= 3 * l1d_bytes();
}

// y [M, N] = x [M, K] w^T in fp32 for bf16 x and fewer than kBf16GemmMinRows rows (ISA
// Avx512Bf16, bf16_gemv(w)): a thread's rows one block of K at a time, as gemv.
void gemv_bf16(Packed w, const uint16_t* x, int64_t M, float* y) {
  const int64_t units = w.K / kUnit, ahead = kBf16PrefetchBytes / unit_bytes(w.bits);
  // Zero points or int_decode's offset: rows_bf16_t's terms need each group's sum of x.
  const bool group_sums = w.zeros.kind != Store::None || int_decode(w);
  const int64_t block = bf16_whole_rows(w, M) ? units
                                              : std::min(units, std::max<int64_t>(4, kBf16BlockXBytes / (2 * kUnit * M)));
  std::vector<uint16_t> ordered(M * w.K);
  order_x_bf16(w, x, 0, M * units, ordered.data());
  std::vector<float> xsum(group_sums ? M * w.groups : 0);  // [M, groups]: the sum of x over each group
  if (group_sums) sum_runs_bf16(x, w.K, w.group_size, 0, M, xsum.data());
  parallel_rows(w.N, w.K, [&](int64_t n0, int64_t n1) {
    const KeepDenormals keep;
    for (int64_t u = 0; u < units; u += block)
      rows_bf16(w.block(u, block, ahead), ordered.data(), group_sums ? xsum.data() : nullptr, M, n0, n1, y);
  });
}

// Whether gemv_bf16 takes x [M, K] of this dtype.
bool takes_bf16_gemv(const Packed& w, Isa isa, int64_t M, at::ScalarType dtype) {
  return isa == Isa::Avx512Bf16 && M < kBf16GemmMinRows && dtype == torch::kBFloat16 && bf16_gemv(w);
}

// Whether gemm_bf16 takes x [M, K] of this dtype.
bool takes_bf16_gemm(const Packed& w, Isa isa, int64_t M, at::ScalarType dtype) {
  return isa == Isa::Avx512Bf16 && M >= kBf16GemmMinRows && dtype == torch::kBFloat16 && bf16_dot(w);
}

// y = x w^T for bf16 x [M, K] (takes_bf16_gemm): fp32, or with bf16_out the bias (or null)
// added and the sum rounded to bf16 as the GEMM stores it, the same bits as rounding the
// fp32 y plus the bias (the separate pass took 1.2% of an M = 512 call on 4096x4096).
at::Tensor gemm_bf16(Packed w, const at::Tensor& x_in, bool bf16_out, const float* bias) {
  const int64_t M = x_in.size(0), K = w.K;
  if (w.dec == Dec::Fp16Nibble) w.dec = Dec::Table;
  const at::Tensor x = x_in.contiguous();
  const std::unique_ptr<uint32_t[]> pairs(new uint32_t[M * K / 2]);  // pair_x writes every word: not zeroed
  const XTiles tiles{M, K, dot_depth(w, M)};
  at::parallel_for(0, tiles.items(), 64, [&](int64_t i0, int64_t i1) {
    pair_x(reinterpret_cast<const uint16_t*>(x.data_ptr()), tiles, i0, i1, pairs.get());
  });
  const uint32_t* xp = pairs.get();
  // Zero points: the sums of x over the runs of K the GEMM scales (dot_run), [M][runs].
  const int64_t length = dot_run(w, M);
  std::vector<float> xsum(w.zeros.kind != Store::None ? M * ((K + length - 1) / length) : 0);
  if (!xsum.empty())
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      sum_runs_bf16(reinterpret_cast<const uint16_t*>(x.data_ptr()), K, length, m0, m1, xsum.data());
    });
  at::Tensor y = torch::empty({M, w.N}, bf16_out ? torch::kBFloat16 : torch::kFloat32);
  const int64_t panels = (w.N + kDotRows - 1) / kDotRows;
  PanelQueue queue{panels, std::min<int64_t>(at::get_num_threads(), panels)};
  const auto run = [&](auto* yp) {
    at::parallel_for(0, queue.threads, 1, [&](int64_t, int64_t) {
      const KeepDenormals keep;
      with_format(w, [&](auto b, auto, auto) { gemm_bf16_t<decltype(b)::value>(w, xp, xsum.data(), M, queue, bias, yp); });
    });
  };
  if (bf16_out)
    run(reinterpret_cast<uint16_t*>(y.data_ptr()));
  else
    run(y.data_ptr<float>());
  return y;
}
#endif

// y = x w^T in fp32 for x [M, K] of any float dtype.
at::Tensor product(Packed w, Isa isa, const at::Tensor& x_in) {
  const int64_t K = w.K;
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "x must be [M, K] with K = ", K);
  const int64_t M = x_in.size(0);
#if FPBENCH_X86
  if (takes_bf16_gemv(w, isa, M, x_in.scalar_type())) {
    const at::Tensor x = x_in.contiguous();
    at::Tensor y = torch::empty({M, w.N}, torch::kFloat32);
    gemv_bf16(w, reinterpret_cast<const uint16_t*>(x.data_ptr()), M, y.data_ptr<float>());
    return y;
  }
  if (takes_bf16_gemm(w, isa, M, x_in.scalar_type())) return gemm_bf16(w, x_in, false, nullptr);
#endif
  at::Tensor x = x_in.to(torch::kFloat32).contiguous();
#if FPBENCH_X86
  if (isa != Isa::Scalar && M >= kBlockedMinRows) {
    // Both SIMD ISAs take the blocked GEMM (natural-order panels need no reordered x).
    if (w.dec == Dec::Fp16Nibble) w.dec = Dec::Table;
    const int64_t Mp = (M + kXtCols - 1) / kXtCols * kXtCols;
    at::Tensor xt = torch::zeros({Mp, K}, torch::kFloat32);
    xt.narrow(0, 0, M).copy_(x);
    xt = xt.view({Mp / kXtCols, kXtCols, K}).transpose(1, 2).contiguous();
    at::Tensor yt = torch::zeros({w.N, Mp}, torch::kFloat32);
    const float* xtp = xt.data_ptr<float>();
    float* ytp = yt.data_ptr<float>();
    // AVX-512: 32 rows of x a pass (block_avx512). On an AMD EPYC with AVX-512 (2 threads,
    // in turn in one process) 1.70-1.76x the AVX2 blocks' speed at M = 64 and 1.80x at
    // M = 512 on 4096x4096 (FP6 E3M2, INT4 g128).
    const bool wide = isa >= Isa::Avx512;
    at::parallel_for(0, w.N, std::max<int64_t>(24, row_grain(w.N)), [&](int64_t n0, int64_t n1) {
      const KeepDenormals keep;
      with_format(w, [&](auto b, auto d, auto z) { gemm_avx2_t<decltype(b)::value, decltype(d)::value, decltype(z)::value>(w, xtp, Mp, n0, n1, ytp, wide); });
    });
    at::Tensor y = yt.narrow(1, 0, M).t().contiguous();
    return y;
  }
#endif
  at::Tensor y = torch::empty({M, w.N}, torch::kFloat32);
  gemv(w, isa, x.data_ptr<float>(), M, y.data_ptr<float>());
  return y;
}

at::Tensor dequantize(Packed w, Isa isa) {
  if (w.dec == Dec::Fp16Nibble) w.dec = Dec::Table;  // writes weights in k order
  const int64_t K = w.K;
  at::Tensor out = torch::empty({w.N, K}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.N, row_grain(w.N), [&](int64_t n0, int64_t n1) {
    const KeepDenormals keep;
#if FPBENCH_X86
    if (isa >= Isa::Avx512) {
      with_format(w, [&](auto b, auto d, auto z) { dequant_avx512_t<decltype(b)::value, decltype(d)::value, decltype(z)::value>(w, n0, n1, op); });
      return;
    }
    if (isa == Isa::Avx2) {
      with_format(w, [&](auto b, auto d, auto z) { dequant_avx2_t<decltype(b)::value, decltype(d)::value, decltype(z)::value>(w, n0, n1, op); });
      return;
    }
#endif
    RowScales rs(w, Isa::Scalar);
    for (int64_t n = n0; n < n1; ++n) dequant_row_scalar(w, rs, n, op + n * K);
  });
  return out;
}

uint64_t stream_scalar(const uint8_t* p, int64_t bytes) {
  const uint64_t* words = reinterpret_cast<const uint64_t*>(p);
  uint64_t acc[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i + 4 <= bytes / 8; i += 4)
    for (int j = 0; j < 4; ++j) acc[j] ^= words[i + j];
  return acc[0] ^ acc[1] ^ acc[2] ^ acc[3];
}

// Best streaming-read bandwidth (GB/s) over `repeats` passes of every thread over its
// share of `buffer`, with the widest loads `isa` allows, as 1 or 8 streams a thread (the
// scalar loop: 1): the ceiling a weight-streaming kernel can reach on this machine.
double stream_read_gbps(const at::Tensor& buffer, int64_t repeats, const std::string& isa_request, int64_t streams) {
  TORCH_CHECK(buffer.is_contiguous() && buffer.data_ptr() != nullptr &&
                  reinterpret_cast<uintptr_t>(buffer.data_ptr()) % 64 == 0,
              "buffer must be contiguous and 64-byte aligned");
  TORCH_CHECK(streams == 1 || streams == 8, "streams must be 1 or 8, not ", streams);
  const Isa isa = pick_isa(isa_request);
  const uint8_t* base = static_cast<const uint8_t*>(buffer.data_ptr());
  const int64_t bytes = buffer.numel() * buffer.element_size() / 4096 * 4096;
  const int64_t pages = bytes / 4096;
  std::vector<uint64_t> sinks(static_cast<size_t>(at::get_num_threads()) * 8, 0);
  double best = 0.0;
  for (int64_t r = 0; r < repeats; ++r) {
    auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, pages, 64, [&](int64_t p0, int64_t p1) {
      const uint8_t* p = base + p0 * 4096;
      const int64_t n = (p1 - p0) * 4096;
      uint64_t acc;
#if FPBENCH_X86
      if (isa >= Isa::Avx512) acc = streams == 1 ? stream_avx512<1>(p, n) : stream_avx512<8>(p, n);
      else if (isa == Isa::Avx2) acc = streams == 1 ? stream_avx2<1>(p, n) : stream_avx2<8>(p, n);
      else acc = stream_scalar(p, n);
#else
      acc = stream_scalar(p, n);
#endif
      sinks[static_cast<size_t>(at::get_thread_num()) * 8] ^= acc;  // keeps the loads alive
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, bytes / seconds / 1e9);
  }
  return sinks[0] == 0x5eed ? -best : best;  // a use of the sink the compiler cannot drop
}

}  // namespace

// The tensors a Packed points into stay referenced here, so a layer's handle stays valid
// whatever Python does with its buffers.
struct fpbench::KernelLinear::Impl {
  at::Tensor plane_a, plane_b, table, scales, zeros;
  std::optional<at::Tensor> scale_table, zero_table, bias;
  Owned owned;
  Packed w;
  Isa isa;
};

fpbench::KernelLinear::KernelLinear(const at::Tensor& plane_a, const at::Tensor& plane_b, const at::Tensor& table,
                                    const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t K,
                                    int64_t G, const std::vector<int64_t>& decode, const std::string& isa,
                                    const std::optional<at::Tensor>& scale_table,
                                    const std::optional<at::Tensor>& zero_table,
                                    const std::optional<at::Tensor>& bias) {
  auto impl = std::make_shared<Impl>();
  impl->plane_a = plane_a, impl->plane_b = plane_b, impl->table = table, impl->scales = scales, impl->zeros = zeros;
  impl->scale_table = scale_table, impl->zero_table = zero_table;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->numel() == plane_a.size(0),
                "the bias must be fp32 with one value per output row");
    impl->bias = bias;
  }
  impl->w = make_packed(impl->plane_a, impl->plane_b, impl->table, impl->scales, impl->zeros, bits, K, G, decode,
                        impl->scale_table, impl->zero_table, impl->owned);
  impl->isa = pick_isa(isa);
  impl_ = std::move(impl);
}

at::Tensor fpbench::KernelLinear::product(const at::Tensor& x) const { return ::product(impl_->w, impl_->isa, x); }

at::Tensor fpbench::KernelLinear::dequantize() const { return ::dequantize(impl_->w, impl_->isa); }

void fpbench::KernelLinear::forward_row(const float* x, float* y) const {
  gemv(impl_->w, impl_->isa, x, 1, y);
  add_bias(y);
}

void fpbench::KernelLinear::forward_row(const c10::BFloat16* x, float* y, std::vector<float>& wide) const {
  const Packed& w = impl_->w;
#if FPBENCH_X86
  if (takes_bf16_gemv(w, impl_->isa, 1, torch::kBFloat16)) {
    gemv_bf16(w, reinterpret_cast<const uint16_t*>(x), 1, y);
    return add_bias(y);
  }
#endif
  wide.assign(x, x + w.K);  // exact, as product's conversion
  forward_row(wide.data(), y);
}

void fpbench::KernelLinear::add_bias(float* y) const {
  if (impl_->bias) {
    const float* bias = impl_->bias->data_ptr<float>();
    for (int64_t n = 0; n < impl_->w.N; ++n) y[n] += bias[n];
  }
}

int64_t fpbench::KernelLinear::out_features() const { return impl_->w.N; }

std::string fpbench::KernelLinear::decoder() const { return decoder_name(impl_->w.dec); }

at::Tensor fpbench::KernelLinear::forward(const at::Tensor& x) const {
  const Packed& w = impl_->w;
  const at::Tensor rows = x.reshape({-1, w.K});
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.N;
#if FPBENCH_X86
  // bf16 x on the bf16 GEMM: bf16 y with the bias straight from the GEMM.
  if (takes_bf16_gemm(w, impl_->isa, rows.size(0), x.scalar_type()))
    return gemm_bf16(w, rows, true, impl_->bias ? impl_->bias->data_ptr<float>() : nullptr).view(shape);
#endif
  // The scalar kernels have no blocked GEMM: from kScalarGemmMinRows rows the layer
  // dequantizes once and calls torch's fp32 GEMM.
  at::Tensor y = rows.size(0) >= kScalarGemmMinRows && impl_->isa == Isa::Scalar
                     ? at::matmul(rows.to(torch::kFloat32), dequantize().t())
                     : product(rows);
  if (impl_->bias) y.add_(*impl_->bias);
  if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
  return y.view(shape);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // scales / zeros: fp32, fp16 or bf16 values, or uint8 codes with scale_table / zero_table
  // (256 fp32 values each); zeros empty for symmetric formats.
  using fpbench::KernelLinear;
  m.def("lut_linear",
        [](const at::Tensor& x, const at::Tensor& plane_a, const at::Tensor& plane_b, const at::Tensor& table,
           const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t K, int64_t G,
           const std::vector<int64_t>& decode, const std::string& isa, const std::optional<at::Tensor>& scale_table,
           const std::optional<at::Tensor>& zero_table) {
          return KernelLinear(plane_a, plane_b, table, scales, zeros, bits, K, G, decode, isa, scale_table,
                              zero_table, std::nullopt)
              .product(x);
        },
        "y = x @ w^T, w = (table[code] - zero) * scale per group, from packed 4/6/8-bit codes; fp32 result",
        py::arg("x"), py::arg("plane_a"), py::arg("plane_b"), py::arg("table"), py::arg("scales"), py::arg("zeros"),
        py::arg("bits"), py::arg("K"), py::arg("G"), py::arg("decode"), py::arg("isa"),
        py::arg("scale_table") = py::none(), py::arg("zero_table") = py::none());
  m.def("lut_dequantize",
        [](const at::Tensor& plane_a, const at::Tensor& plane_b, const at::Tensor& table, const at::Tensor& scales,
           const at::Tensor& zeros, int64_t bits, int64_t K, int64_t G, const std::vector<int64_t>& decode,
           const std::string& isa, const std::optional<at::Tensor>& scale_table,
           const std::optional<at::Tensor>& zero_table) {
          return KernelLinear(plane_a, plane_b, table, scales, zeros, bits, K, G, decode, isa, scale_table,
                              zero_table, std::nullopt)
              .dequantize();
        },
        "fp32 weights [N, K] decoded by the kernel's own code path",
        py::arg("plane_a"), py::arg("plane_b"), py::arg("table"), py::arg("scales"), py::arg("zeros"),
        py::arg("bits"), py::arg("K"), py::arg("G"), py::arg("decode"), py::arg("isa"),
        py::arg("scale_table") = py::none(), py::arg("zero_table") = py::none());
  py::class_<KernelLinear, std::shared_ptr<KernelLinear>>(
      m, "KernelLinear", "one layer's packed weights, checked once: LutLinear's compiled half")
      .def(py::init<const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    int64_t, int64_t, int64_t, const std::vector<int64_t>&, const std::string&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&>(),
           py::arg("plane_a"), py::arg("plane_b"), py::arg("table"), py::arg("scales"), py::arg("zeros"),
           py::arg("bits"), py::arg("K"), py::arg("G"), py::arg("decode"), py::arg("isa"), py::arg("scale_table"),
           py::arg("zero_table"), py::arg("bias"))
      .def("forward", &KernelLinear::forward, "x [..., K] -> [..., N] in x's dtype, bias added in fp32")
      .def("dequantize", &KernelLinear::dequantize, "fp32 weights [N, K] as this layer's ISA decodes them")
      .def("decoder", &KernelLinear::decoder,
           "the decoder of this layer's codes: decoder()'s, but float for float_special codes that hold no "
           "inf or NaN");
  fpbench::bind_llama_step(m);
  m.def("stream_read_gbps", &stream_read_gbps, "best streaming-read bandwidth in GB/s with the given ISA's loads",
        py::arg("buffer"), py::arg("repeats"), py::arg("isa"), py::arg("streams") = 1);
  m.def("decoder", [](int64_t bits, const std::vector<int64_t>& decode) { return decoder_name(pick_decoder(bits, decode)); },
        "the decoder the AVX2 kernels use for these codes: table, signed_int, unsigned_int, float, float_special, "
        "fp16_nibble or sign_magnitude");
  m.def("scale_decode",
        [](const at::Tensor& table) {
          TORCH_CHECK(table.scalar_type() == torch::kFloat32 && table.is_contiguous() && table.numel() == 256,
                      "a scale table is 256 contiguous fp32 values");
          const ByteDecode d = find_byte_decode(table.data_ptr<float>());
          using K = ByteDecode::Kind;
          return std::string(d.kind == K::Exponent ? "exponent" : d.kind == K::Minifloat ? "minifloat" : "gather");
        },
        "how the SIMD kernels decode 8-bit scale codes with this table: exponent or minifloat arithmetic "
        "(bit-identical to the table, checked on all 256 codes), else gather");
  m.def("scalar_gemm_min_rows", [] { return kScalarGemmMinRows; },
        "rows of x from which the scalar kernels' layer dequantizes once and calls torch's fp32 GEMM");
  m.def("blocked_min_rows", [] { return kBlockedMinRows; },
        "rows of x from which the SIMD kernels decode weight panels once and reuse them (blocked GEMM)");
  m.def("bf16_gemm_min_rows", [] { return kBf16GemmMinRows; },
        "rows of bf16 x from which the avx512bf16 kernels take the bf16 GEMM instead of the bf16 GEMV");
  m.def("best_isa", [] { return isa_name(best_isa()); }, "widest ISA this CPU supports");
  m.def("position_to_k", [](int64_t p) { return position_to_k(static_cast<int>(p)); },
        "weight offset inside a 64-weight unit of code position p");
}
