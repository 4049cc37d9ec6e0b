// From a layer's tensors to a Packed: the decoder a format gets, the checks on codes,
// tables, scales and zero points, and the tables the kernels keep beside the tensors.
// Part of lut_linear.cpp's translation unit.
#pragma once

#include "lut_common.h"

#include <ATen/Parallel.h>

#include <atomic>

namespace {

// The decoder for `bits`-bit codes of a format described by `decode` = {kind, ebits,
// mbits, bias, special}: kind 0 table, 1 signed integer, 2 unsigned integer, 3 float;
// special 0 finite, 1 fn (all-ones code is NaN), 2 ieee (all-ones exponent is inf/NaN).
// Anything the arithmetic decoders do not cover takes the table.
Dec pick_decoder(int64_t bits, const std::vector<int64_t>& decode) {
  TORCH_CHECK(decode.size() == 5, "decode must be [kind, ebits, mbits, bias, special]");
  const int64_t kind = decode[0], e = decode[1], m = decode[2], bias = decode[3], special = decode[4];
  TORCH_CHECK(kind >= 0 && kind <= 3 && special >= 0 && special <= 2, "unknown decode kind ", kind,
              " or special rule ", special);
  if (bits == 4) return Dec::Table;  // one vpshufb per 32 codes: cheaper than arithmetic
  if (kind == 1 || kind == 2) return bits == 8 ? (kind == 1 ? Dec::SignedInt : Dec::UnsignedInt) : Dec::Table;
  if (bits == 6 && kind == 3 && e == 3 && m == 2 && special == 0 && bias >= -100 && bias <= 100) return Dec::Fp16Nibble;
  if (bits == 6) return kind == 3 ? Dec::SignMagnitude : Dec::Table;  // make_packed checks the table
  if (kind != 3 || bits != 8 || e < 1 || m < 0) return Dec::Table;
  // Codes are sign-extended from bit 7 and placed in fp16, whose all-ones exponent (E = 31)
  // is inf/NaN: only an ieee format may use it.
  const bool layout = 1 + e + m == 8 && m <= 10 && (e < 5 || (e == 5 && special == 2));
  // 2^(127 - bias) and 2^(15 - bias) must be normal fp32s, and so must every value.
  const bool range = 127 - bias <= 127 && 15 - bias >= -126 && 1 - bias - m >= -126 && (1 << e) - 1 - bias <= 127;
  if (!layout || !range) return Dec::Table;
  return special == 0 ? Dec::Float : Dec::FloatSpecial;
}

std::string decoder_name(Dec dec) {
  switch (dec) {
    case Dec::SignedInt: return "signed_int";
    case Dec::UnsignedInt: return "unsigned_int";
    case Dec::Float: return "float";
    case Dec::FloatSpecial: return "float_special";
    case Dec::Fp16Nibble: return "fp16_nibble";
    case Dec::SignMagnitude: return "sign_magnitude";
    default: return "table";
  }
}

void set_float_decode(Packed& w, const std::vector<int64_t>& decode) {
  const int e = static_cast<int>(decode[1]), m = static_cast<int>(decode[2]), bias = static_cast<int>(decode[3]);
  w.fbits = 1 + e + m;
  w.mbits = m;
  w.em_mask = (1u << (e + m)) - 1;
  w.mask32 = 0x80000000u | w.em_mask << (23 - m);
  w.special32 = decode[4] == 1 ? w.em_mask << (23 - m) : ((1u << e) - 1) << 23;
  w.pow2 = std::ldexp(1.0f, 127 - bias);
  w.mask16 = static_cast<uint16_t>(0x8000u | w.em_mask << (10 - m));
  w.special16 = static_cast<uint16_t>(decode[4] == 1 ? w.em_mask << (10 - m) : ((1u << e) - 1) << 10);
  w.pow2_16 = std::ldexp(1.0f, 15 - bias);
}

struct Owned {  // what a Packed points into besides the tensors (2^bits + K/8 entries)
  std::vector<int32_t> group_of;
  std::vector<uint8_t> table_lo, table_hi;
  std::vector<float> scale_factors;  // 256 or none: see set_scale_factors
};

// Exact as a bf16 that vdpbf16ps takes as it is: zero or a normal number (it flushes
// subnormal inputs).
inline bool exact_in_bf16(double v) {
  const float f = static_cast<float>(v);
  return static_cast<double>(f) == v && (float_bits(f) & 0xFFFF) == 0 && (f == 0 || std::isnormal(f));
}

// Packed::scale_factors: byte scales decoded by arithmetic are f(c) * multiplier (Exponent:
// f(c) the value, multiplier 1; Minifloat: f(c) the widened fp16 pattern, the product
// rounded to fp32 once), and where every value times every f(c) is exact in bf16 (FP4 x
// E4M3: 2 + 4 significant bits; an element x E8M0 within bf16's normal range), the bf16
// GEMM holds value * f(c) in its panels and multiplies by the multiplier once per output.
// Only the codes the layer uses are checked: E8M0's extremes (2^±127) would overflow or
// underflow with any element, and no layer of real weights holds them. A code the formula
// misses (NaN; E8M0's 2^-127) takes its table value over the multiplier.
void set_scale_factors(Packed& w, Owned& owned) {
  const Stored& s = w.scales;
  const ByteDecode& d = s.decode;
  if (s.kind != Store::Byte || d.kind == ByteDecode::Kind::Gather) return;
  const bool exponent = d.kind == ByteDecode::Kind::Exponent;
  const double multiplier = exponent ? 1.0 : d.multiplier;
  bool used[256] = {};
  const uint8_t* codes = static_cast<const uint8_t*>(s.data);
  for (int64_t i = 0; i < w.N * w.groups; ++i) used[codes[i]] = true;
  std::vector<float> factors(256);
  for (int c = 0; c < 256; ++c) {
    const bool patched = std::find(d.patch_code, d.patch_code + d.patches, c) != d.patch_code + d.patches;
    factors[c] = exponent || patched ? static_cast<float>(s.table[c] / multiplier)
                                     : half_to_float(static_cast<uint16_t>((c & 0x80) << 8 | (c & 0x7F) << d.shift));
    if (!used[c] || std::isnan(factors[c])) continue;
    for (int64_t v = 0; v < (int64_t{1} << w.bits); ++v)
      if (std::isfinite(w.table[v]) && !exact_in_bf16(static_cast<double>(w.table[v]) * factors[c])) return;
  }
  owned.scale_factors = std::move(factors);
  w.scale_factors = s;
  w.scale_factors.table = owned.scale_factors.data();
  w.scale_factors.decode = find_byte_decode(w.scale_factors.table);
  w.scale_multiplier = static_cast<float>(multiplier);
}

// Whether the 64 bf16 patterns are those of sign-magnitude codes: code c + 32 is code c
// (< 32, sign bit clear) with the sign bit set.
bool sign_magnitude(const Owned& t) {
  if (t.table_hi.size() != 64) return false;
  for (int c = 0; c < 32; ++c)
    if (t.table_hi[c] & 0x80 || t.table_hi[c + 32] != (t.table_hi[c] | 0x80) || t.table_lo[c + 32] != t.table_lo[c])
      return false;
  return true;
}

// Whether values[half + c] is values[c] with the sign bit flipped, for every c < half
// (a NaN pairs with any NaN: a NaN code decodes to some NaN).
bool mirrored(const float* values, int64_t half) {
  for (int64_t c = 0; c < half; ++c) {
    uint32_t low, high;
    std::memcpy(&low, &values[c], 4);
    std::memcpy(&high, &values[half + c], 4);
    if (high != (low ^ 0x80000000u) && !(std::isnan(values[c]) && std::isnan(values[half + c]))) return false;
  }
  return true;
}

// Whether any of the n codes has a value that is not finite (inf, NaN). FloatSpecial's
// blend writes those codes' patterns; a layer without them takes Dec::Float, which gives
// every finite code the same bits. Quantized finite weights hold none, and the blend cost
// the fp32 GEMVs a fifth of their time (FP8 at M = 1 on 4096x4096 with the weights in
// cache, Zen 4, 2 threads, in turn in one process: AVX2 1.20-1.30x, AVX-512 without VBMI
// 1.25-1.39x as fast without it; the VBMI and bf16 kernels decode 8-bit codes through byte
// tables).
bool holds_nonfinite(const uint8_t* codes, int64_t n, const float* values) {
  uint8_t nonfinite[256];
  bool any = false;
  for (int c = 0; c < 256; ++c) any |= (nonfinite[c] = !std::isfinite(values[c]));
  if (!any) return false;
  std::atomic<bool> found{false};
  at::parallel_for(0, n, int64_t{1} << 22, [&](int64_t i0, int64_t i1) {
    uint8_t hit = 0;
    for (int64_t i = i0; i < i1; ++i) hit |= nonfinite[codes[i]];
    if (hit) found.store(true, std::memory_order_relaxed);
  });
  return found.load();
}

// Scales or zero points as passed: fp32, fp16 or bf16 values, or uint8 codes with their
// 256-entry fp32 table. Empty: none (zero points of a symmetric format).
Stored stored(const at::Tensor& values, const std::optional<at::Tensor>& table, int64_t count, const char* what) {
  Stored out;
  if (values.numel() == 0) return out;
  TORCH_CHECK(values.is_contiguous() && values.numel() == count, what, " must be contiguous [N, ceil(K/G)]");
  out.data = values.data_ptr();
  const auto type = values.scalar_type();
  if (type == torch::kUInt8) {
    TORCH_CHECK(table && table->scalar_type() == torch::kFloat32 && table->is_contiguous() && table->numel() == 256,
                what, " stored as 8-bit codes need their fp32 table of 256 values");
    out.kind = Store::Byte;
    out.table = table->data_ptr<float>();
    out.decode = find_byte_decode(out.table);
    return out;
  }
  TORCH_CHECK(type == torch::kFloat32 || type == torch::kFloat16 || type == torch::kBFloat16, what,
              " must be fp32, fp16, bf16 or uint8 codes with a table");
  out.kind = type == torch::kFloat32 ? Store::F32 : type == torch::kFloat16 ? Store::F16 : Store::BF16;
  return out;
}

// Packed::int_offset and int_base where the 16 values are (n ^ flip) + c for an integer c.
// Symmetric INT4 has no code -8 (nibble 8): its table entry is 0 and is not checked.
inline void set_int_words(Packed& w) {
  if (w.bits != 4) return;
  for (const int flip : {0, 8}) {
    const float c = w.table[1 ^ flip] - 1.f;
    bool fits = c == std::nearbyint(c) && std::abs(c) <= 16.f;
    for (int n = 0; n < 16 && fits; ++n)
      fits = w.table[n] == static_cast<float>(n ^ flip) + c || (flip == 8 && n == 8 && w.table[n] == 0.f);
    if (fits) {
      w.int_offset = 128 - static_cast<int>(c), w.int_base = static_cast<uint16_t>(0x4300 | flip);
      return;
    }
  }
}

Packed make_packed(const at::Tensor& plane_a, const at::Tensor& plane_b, const at::Tensor& table,
                   const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t K, int64_t G,
                   const std::vector<int64_t>& decode, const std::optional<at::Tensor>& scale_table,
                   const std::optional<at::Tensor>& zero_table, Owned& owned) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "code width ", bits, " has no kernel; use 4, 6 or 8 bits");
  TORCH_CHECK(K % kUnit == 0, "K = ", K, " must be a multiple of ", kUnit);
  TORCH_CHECK(G >= 8 && G % 8 == 0, "group size ", G, " must be a multiple of 8");
  TORCH_CHECK(plane_a.dtype() == torch::kUInt8 && plane_a.is_contiguous() && plane_a.dim() == 2,
              "packed codes must be contiguous uint8 [N, bytes]");
  const int64_t N = plane_a.size(0);
  TORCH_CHECK(plane_a.size(1) == (bits == 8 ? K : K / 2), "packed codes: wrong row length for K = ", K);
  if (bits == 6)
    TORCH_CHECK(plane_b.dtype() == torch::kUInt8 && plane_b.is_contiguous() && plane_b.size(0) == N &&
                    plane_b.size(1) == K / 4,
                "6-bit codes need a 2-bit plane uint8 [N, K/4]");
  TORCH_CHECK(table.dtype() == torch::kFloat32 && table.numel() == (int64_t{1} << bits),
              "the value table must be fp32 with 2^bits entries");
  const int64_t groups = (K + G - 1) / G;
  const Stored scale_store = stored(scales, scale_table, N * groups, "scales");
  TORCH_CHECK(scale_store.kind != Store::None, "scales must be given: [N, ceil(K/G)]");
  const Stored zero_store = stored(zeros, zero_table, N * groups, "zero points");
  const bool zp = zero_store.kind != Store::None;
  // bf16 byte tables; every value must be exact in bf16 (true of every format <= 8 bits).
  TORCH_CHECK(table.is_contiguous(), "the value table must be contiguous");
  const float* values = table.data_ptr<float>();
  owned.table_lo.resize(table.numel());
  owned.table_hi.resize(table.numel());
  for (int64_t c = 0; c < table.numel(); ++c) {
    uint32_t bits32;
    std::memcpy(&bits32, &values[c], 4);
    if (std::isnan(values[c])) bits32 = 0x7FC00000u;  // any NaN decodes to a quiet NaN
    TORCH_CHECK((bits32 & 0xFFFF) == 0, "table value ", values[c], " of code ", c, " is not exact in bf16");
    owned.table_lo[c] = static_cast<uint8_t>(bits32 >> 16);
    owned.table_hi[c] = static_cast<uint8_t>(bits32 >> 24);
  }
  owned.group_of.resize(K / 8);
  for (int64_t j = 0; j < K / 8; ++j) owned.group_of[j] = static_cast<int32_t>((8 * j) / G);
  Packed w{static_cast<int>(bits),
           plane_a.data_ptr<uint8_t>(),
           bits == 6 ? plane_b.data_ptr<uint8_t>() : nullptr,
           plane_a.size(1),
           bits == 6 ? plane_b.size(1) : 0,
           scale_store,
           zero_store,
           groups,
           G,
           N,
           K,
           owned.group_of.data(),
           values,
           owned.table_lo.data(),
           owned.table_hi.data(),
           pick_decoder(bits, decode),
           0, 0, 0, 0, 0, 0.f, 0, 0, 0.f};
  if (w.dec == Dec::Fp16Nibble && G % 32 != 0) w.dec = Dec::Table;  // a half unit spans two groups
  if (w.dec == Dec::SignMagnitude && !sign_magnitude(owned)) w.dec = Dec::Table;  // e.g. a NaN code
  if (w.dec == Dec::FloatSpecial && !holds_nonfinite(w.plane_a, N * w.lda, values)) w.dec = Dec::Float;
  if (w.dec == Dec::Float || w.dec == Dec::FloatSpecial || w.dec == Dec::Fp16Nibble) set_float_decode(w, decode);
  w.mirrored = bits == 8 && mirrored(values, 128);
  set_int_words(w);
  if (!zp) set_scale_factors(w, owned);
  w.u_end = K / kUnit;
  TORCH_CHECK(!zp || w.dec == Dec::Table || w.dec == Dec::SignedInt || w.dec == Dec::UnsignedInt,
              "zero points are for integer formats; a float format takes scales only");
  return w;
}

}  // namespace
