// The portable scalar kernels: the reference every SIMD ISA is tested against, and the
// only kernels of a non-x86 build. Part of lut_linear.cpp's translation unit.
#pragma once

#include "lut_common.h"

namespace {

// ---------------------------------------------------------------- scalar (reference)

inline int code_at(const Packed& w, int64_t n, int64_t u, int p) {
  if (w.bits == 8) return w.plane_a[n * w.lda + u * kUnit + p];
  const uint8_t byte = w.plane_a[n * w.lda + u * 32 + (p % 32)];
  const int nibble = p < 32 ? byte & 15 : byte >> 4;
  if (w.bits == 4) return nibble;
  const int low2 = (w.plane_b[n * w.ldb + u * 16 + (p % 16)] >> (2 * (p / 16))) & 3;
  return nibble << 2 | low2;
}

inline float decode_scalar(const Packed& w, int code) {
  switch (w.dec) {
    case Dec::SignedInt: return static_cast<float>(static_cast<int8_t>(code));
    case Dec::UnsignedInt: return static_cast<float>(code);
    case Dec::Float:
    case Dec::FloatSpecial: {
      const uint32_t sign = static_cast<uint32_t>(code >> (w.fbits - 1)) & 1u;
      const uint32_t raw = sign << 31 | (static_cast<uint32_t>(code) & w.em_mask) << (23 - w.mbits);
      const bool special = w.dec == Dec::FloatSpecial && (raw & w.special32) == w.special32;
      float value;
      const uint32_t bits = special ? raw | 0x7F800000u : raw;
      std::memcpy(&value, &bits, 4);
      return special ? value : value * w.pow2;
    }
    default: return w.table[code];
  }
}

void dequant_row_scalar(const Packed& w, RowScales& rs, int64_t n, float* out) {
  const float* srow = rs.scales(n);
  const float* zrow = rs.zeros(n);
  for (int64_t u = 0; u < w.K / kUnit; ++u)
    for (int p = 0; p < kUnit; ++p) {
      const int64_t k = u * kUnit + (w.bits == 8 ? p : position_to_k(p));
      const int32_t g = w.group_of[k / 8];
      float value = decode_scalar(w, code_at(w, n, u, p));
      if (zrow) value = value - zrow[g];
      out[k] = value * srow[g];
    }
}

void rows_scalar(const Packed& w, const float* x, int64_t ldx, int64_t M, int64_t n0, int64_t n1,
                 float* y, int64_t ldy) {
  std::vector<float> row(w.K);
  RowScales rs(w, Isa::Scalar);
  for (int64_t n = n0; n < n1; ++n) {
    dequant_row_scalar(w, rs, n, row.data());
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < w.K; ++k) acc += x[m * ldx + k] * row[k];
      y[m * ldy + n] = acc;
    }
  }
}

}  // namespace
