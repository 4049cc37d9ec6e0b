"""Number formats as data: a value grid with an exact encoder, decoder and rounder.

Three families, one frozen dataclass each (the microxcaling idea: a new format is a
table row, not a new class):

- ``FloatFormat``: sign + ``ebits`` exponent + ``mbits`` mantissa, a bias, and a rule for
  special values (``ieee``: top exponent holds inf/NaN; ``fn``: only the all-ones code is
  NaN, no inf; ``finite``: every code is a finite number).
- ``IntFormat``: ``bits``-bit integers, symmetric (restricted range ``±(2^(b-1)-1)``, so
  the grid is symmetric like the float grids) or asymmetric (``0 .. 2^b-1`` with a zero
  point).
- ``BaselineFormat``: fp16, bf16, fp32 - a cast, so a baseline is just another row.

Two more families exist for block scaling:

- ``PowerOfTwoFormat``: E8M0, the OCP MX scale: unsigned, ``2^(code - 127)`` for codes
  0..254, code 255 is NaN; no zero, no sign. It rounds a positive value to the nearest
  power of two; a tie (1.5 * 2^e, the midpoint) goes *up*, as ml_dtypes'
  ``float8_e8m0fnu`` and torch's ``float8_e8m0fnu`` both do (with no mantissa bits
  "ties to even" is not defined). fpbench saturates where both references do not:
  beyond 2^127 (and +inf) gives 2^127, and zero, negatives and anything below 2^-127
  give 2^-127, the smallest value (ml_dtypes gives NaN for 0 and overflow; torch gives
  NaN for overflow), so a scale never becomes NaN or 0.
- ``BlockFormat``: an element format plus a block size, a scale format and the rule
  that picks the block scale (a table row per format, like microxcaling's ``mx/``):

  * OCP Microscaling v1.0 (``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp6_e3m2``,
    ``mxfp6_e2m3``, ``mxfp4_e2m1``, ``mxint8``): blocks of 32, one E8M0 scale each. The
    spec's shared exponent is ``floor(log2(amax)) - emax_elem`` (``emax_elem``: the
    exponent of the element's largest normal), so ``amax / 2^shared`` lies in
    ``[2^emax, 2^(emax+1))`` and values above the element's max saturate to it
    (clipping, as the spec accepts). Elements round RNE and saturate. MXINT8's element
    is 8-bit two's complement with an implicit 2^-6, clamped to ±127/64 as
    microxcaling does (code -128 = -2 is decodable but never produced).
    ``NAME:ceil`` (e.g. ``mxfp4_e2m1:ceil``) rounds the scale exponent up instead, the
    smallest power of two with ``amax <= max * 2^shared``, so nothing clips (at the cost
    of a coarser grid for about half the blocks).
    An all-zero block gets the smallest scale, 2^-127 (``floor(log2 0)`` clamped to
    E8M0's range); a shared exponent outside [-127, 127] is clamped. A block holding
    NaN or ±inf gets the NaN scale (E8M0 code 255) and decodes to NaN throughout.
  * NVFP4 (``nvfp4``): E2M1 elements in blocks of 16, an E4M3 block scale and an fp32
    per-tensor scale ``amax_tensor / (448 * 6)``; the block scale is E4M3 of
    ``(amax_block / 6) / tensor_scale`` (RNE, saturating at 448) and a value decodes as
    ``element * fp32(e4m3_scale * tensor_scale)``, the order torchao uses. The product
    is not exact in E4M3, so the tensor scale is kept apart from the block scales. An
    all-zero tensor gets tensor scale 1; a block scale that rounds to 0 (block amax
    below 2^-10 * 6 * tensor_scale; torchao clamps it to 2^-6 instead) flushes the
    block to 0. NaN or ±inf anywhere makes the tensor scale non-finite: NaN throughout.

  A block format behaves as its element grid for ``round``/``encode``/``decode``
  (MXINT8's grid includes the 2^-6), so every routine that rounds onto "a grid under a
  scale" serves it unchanged.

Rounding is round-to-nearest, ties to even, saturating to ±max (an input beyond max,
including ±inf, becomes ±max; NaN stays NaN). Codes are the format's bit patterns,
the same as ml_dtypes' (sign bit on top), stored in uint8.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from fpbench.errors import FpbenchError


@dataclass(frozen=True)
class FloatFormat:
    name: str
    ebits: int
    mbits: int
    bias: int
    special: str  # "ieee" | "fn" | "finite"

    family = "float"

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (subnormals share its quantum)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        top_field = (1 << self.ebits) - 1
        if self.special == "ieee":
            top_field -= 1  # the all-ones exponent is inf/NaN
        return top_field - self.bias

    @property
    def max(self) -> float:
        top_mantissa = (1 << self.mbits) - 1
        if self.special == "fn":
            top_mantissa -= 1  # all-ones exponent and mantissa is the one NaN code
        return 2.0**self.emax * (1 + top_mantissa / 2**self.mbits)

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)

    @cached_property
    def decode_table(self) -> torch.Tensor:
        """float64 value of every code 0 .. 2^bits - 1 (NaN/inf where the rule says)."""
        values = []
        for code in range(1 << self.bits):
            sign = -1.0 if code >> (self.bits - 1) else 1.0
            exp_field = (code >> self.mbits) & ((1 << self.ebits) - 1)
            mantissa = code & ((1 << self.mbits) - 1)
            top_exp = exp_field == (1 << self.ebits) - 1
            if self.special == "ieee" and top_exp:
                value = math.inf if mantissa == 0 else math.nan
            elif self.special == "fn" and top_exp and mantissa == (1 << self.mbits) - 1:
                value = math.nan
            elif exp_field == 0:
                value = mantissa * self.min_subnormal
            else:
                value = 2.0 ** (exp_field - self.bias) * (1 + mantissa / 2**self.mbits)
            values.append(sign * value)
        return torch.tensor(values, dtype=torch.float64)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round onto the grid (RNE, saturating). Works in float32, or float64 for float64
        input; both are exact because the quantum is a power of two."""
        work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        int_type, shift, ieee_bias = (torch.int64, 52, 1023) if work.dtype == torch.float64 else (torch.int32, 23, 127)
        magnitude = work.abs()
        # floor(log2 |x|) is the biased exponent field less the bias; clamped to
        # [emin, emax]: subnormals share emin's quantum, and anything from 2^(emax+1) up
        # (inf and NaN included) rounds above max and saturates below. In-place steps:
        # each pass over a fresh full-size tensor costs as much as the arithmetic.
        exponent = (magnitude.view(int_type) >> shift).sub_(ieee_bias).clamp_(self.emin, self.emax).sub_(self.mbits)
        quantum = ((exponent + ieee_bias) << shift).view(work.dtype)
        inverse = exponent.neg_().add_(ieee_bias).bitwise_left_shift_(shift).view(work.dtype)
        # Scaling by a power of two is exact; torch.round is round-half-to-even; a carry
        # into the next binade lands on its first value, which is on the grid. clamp
        # saturates (inf becomes max) and keeps NaN.
        rounded = magnitude.mul_(inverse).round_().mul_(quantum).clamp_(max=self.max)
        return rounded.copysign_(work).to(x.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bit patterns (uint8) of round(x). NaN maps to the NaN code where one exists.

        Every grid value of a format of at most 8 bits is a normal float32 (or zero), so
        its fields are read straight off the float32 bit pattern: the exponent field and
        the top ``mbits`` mantissa bits for normals, value / min_subnormal (an exact
        integer) for subnormals."""
        value = self.round(x if x.dtype == torch.float64 else x.to(torch.float32)).to(torch.float32)
        pattern = value.view(torch.int32)
        # Normals: float32 exponent and top mantissa bits, exponent rebiased.
        fields = ((pattern >> (23 - self.mbits)) & ((1 << (8 + self.mbits)) - 1)).sub_((127 - self.bias) << self.mbits)
        # Subnormals (value / min_subnormal < 2^mbits, an exact integer); clamped first so
        # large values cannot overflow the integer conversion.
        scaled = value.abs().mul_(1 / self.min_subnormal).clamp_(max=1 << self.mbits).to(torch.int32)
        codes = torch.where(scaled < (1 << self.mbits), scaled, fields)
        codes.bitwise_or_((pattern >> 31) & (1 << (self.bits - 1)))  # the sign bit on top
        nan = torch.isnan(value)
        if nan.any():
            if self.special == "finite":
                raise FpbenchError(f"{self.name} has no NaN code; the input holds NaN values")
            nan_code = (1 << (self.bits - 1)) - 1  # exponent and mantissa all ones
            codes = torch.where(nan, torch.full_like(codes, nan_code), codes)
        return codes.to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode_table[codes.to(torch.int64)].to(torch.float32)


@dataclass(frozen=True)
class IntFormat:
    name: str
    bits: int
    symmetric: bool

    family = "int"

    @property
    def qmin(self) -> int:
        return -((1 << (self.bits - 1)) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def max(self) -> float:
        """Largest grid magnitude: absmax / max is the symmetric scale."""
        return float(self.qmax)

    @cached_property
    def decode_table(self) -> torch.Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float64)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round to the nearest integer (ties to even), clamped to [qmin, qmax]."""
        rounded = torch.clamp(torch.round(x.float()), self.qmin, self.qmax)
        return torch.where(torch.isnan(x), x.float(), rounded).to(x.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes: int8 for symmetric (signed), uint8 for asymmetric."""
        if torch.isnan(x).any():
            raise FpbenchError(f"{self.name} has no NaN code; the input holds NaN values")
        dtype = torch.int8 if self.symmetric else torch.uint8
        return self.round(x.to(torch.float32)).to(dtype)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32)


@dataclass(frozen=True)
class BaselineFormat:
    name: str
    dtype: torch.dtype

    family = "baseline"

    @property
    def bits(self) -> int:
        return torch.finfo(self.dtype).bits

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).to(x.dtype)


@dataclass(frozen=True)
class PowerOfTwoFormat:
    """Unsigned exponent-only format (E8M0): value 2^(code - bias), the top code is NaN."""

    name: str
    ebits: int
    bias: int

    family = "pow2"

    @property
    def bits(self) -> int:
        return self.ebits

    @property
    def emin(self) -> int:
        return -self.bias

    @property
    def emax(self) -> int:
        return (1 << self.ebits) - 2 - self.bias  # the all-ones code is NaN

    @property
    def max(self) -> float:
        return 2.0**self.emax

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @cached_property
    def decode_table(self) -> torch.Tensor:
        exponents = torch.arange(1 << self.ebits, dtype=torch.float64) - self.bias
        return torch.where(exponents > self.emax, math.nan, torch.exp2(exponents))

    def _exponent(self, x: torch.Tensor) -> torch.Tensor:
        """Exponent of the nearest power of two (ties up), clamped to [emin, emax]."""
        work = x.to(torch.float64)
        mantissa, exp = torch.frexp(work)  # work = mantissa * 2^exp, mantissa in [0.5, 1)
        # 2^(exp-1) <= work < 2^exp; the midpoint is 0.75 * 2^exp, and a tie goes up.
        exponent = torch.where(mantissa >= 0.75, exp, exp - 1)
        exponent = torch.where(work > 0, exponent, self.emin)  # no zero: the smallest
        exponent = torch.where(torch.isinf(work) & (work > 0), self.emax, exponent)
        return torch.clamp(exponent, self.emin, self.emax)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        rounded = torch.ldexp(torch.ones_like(x, dtype=torch.float64), self._exponent(x).to(torch.int32))
        return torch.where(torch.isnan(x), math.nan, rounded).to(x.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        codes = (self._exponent(x) + self.bias).to(torch.int64)
        return torch.where(torch.isnan(x), (1 << self.ebits) - 1, codes).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode_table[codes.to(torch.int64)].to(torch.float32)


BLOCK_SCALE_RULES = ("floor", "ceil", "nearest")


@dataclass(frozen=True)
class BlockFormat:
    """Element format x block size x scale format (see the module docstring)."""

    name: str
    element_name: str
    block_size: int
    scale_format: str
    element_scale: float = 1.0  # MXINT8: element codes count units of 2^-6
    has_tensor_scale: bool = False  # NVFP4: an fp32 per-tensor scale under the block scales
    # "floor": the MX spec's shared exponent; "ceil": rounded up so nothing clips;
    # "nearest": amax / max rounded (RNE) onto the scale format (NVFP4).
    scale_rule: str = "floor"

    family = "block"

    @cached_property
    def element(self) -> FloatFormat | IntFormat:
        return get_format(self.element_name)

    @cached_property
    def scale(self) -> FloatFormat | PowerOfTwoFormat:
        return get_format(self.scale_format)

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def max(self) -> float:
        return self.element.max * self.element_scale

    @property
    def emax(self) -> int:
        """Exponent of the element's largest normal (the spec's emax_elem): MXFP4 2, MXINT8 0."""
        return math.floor(math.log2(self.max))

    @cached_property
    def decode_table(self) -> torch.Tensor:
        return self.element.decode_table * self.element_scale

    def round(self, x: torch.Tensor) -> torch.Tensor:
        # element_scale is a power of two: dividing and multiplying by it is exact.
        return self.element.round(x / self.element_scale) * self.element_scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.element.encode(x / self.element_scale)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.element.decode(codes) * self.element_scale

    def tensor_scale_for(self, absmax: torch.Tensor) -> torch.Tensor:
        """NVFP4's fp32 per-tensor scale: absmax / (scale max * element max), 1 for a zero tensor."""
        scale = absmax.float() / (self.scale.max * self.max)
        return torch.where(absmax == 0, torch.ones_like(scale), scale)

    def block_scales(self, absmax: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Each block's scale (fp32, exactly a value of the scale format) from its absmax;
        relative to ``tensor_scale`` when the format has one."""
        absmax = absmax.float()
        if self.scale_rule == "nearest":
            relative = absmax / self.max
            if self.has_tensor_scale:
                relative = relative / tensor_scale
            return self.scale.round(relative)
        # OCP MX v1.0, section 6.3: shared_exp = floor(log2(amax)) - emax_elem. frexp
        # gives floor(log2) exactly: amax = m * 2^e, m in [0.5, 1).
        _, exp = torch.frexp(absmax.double())
        shared = exp.to(torch.int64) - 1 - self.emax
        if self.scale_rule == "ceil":
            # One binade up where the spec's scale would clip the block's absmax.
            clips = absmax.double() > torch.ldexp(torch.full_like(absmax, self.max, dtype=torch.float64),
                                                  shared.to(torch.int32))
            shared = shared + clips.to(torch.int64)
        shared = torch.where(absmax == 0, self.scale.emin, shared)
        shared = torch.clamp(shared, self.scale.emin, self.scale.emax)
        scales = torch.ldexp(torch.ones_like(absmax), shared.to(torch.int32))
        return torch.where(torch.isfinite(absmax), scales, math.nan)


NumberFormat = FloatFormat | IntFormat | BaselineFormat | PowerOfTwoFormat | BlockFormat


def _float(ebits: int, mbits: int, special: str = "finite", bias: int | None = None) -> FloatFormat:
    bits = 1 + ebits + mbits
    bias = (1 << (ebits - 1)) - 1 if bias is None else bias
    return FloatFormat(f"fp{bits}_e{ebits}m{mbits}", ebits, mbits, bias, special)


# The registry: names a user types. Minifloats of 8 bits follow the OCP/ml_dtypes
# conventions (E4M3 "fn", E5M2 and E3M4 IEEE-like); narrower ones use every code.
FORMATS: dict[str, NumberFormat] = {
    f.name: f
    for f in [
        BaselineFormat("fp32", torch.float32),
        BaselineFormat("fp16", torch.float16),
        BaselineFormat("bf16", torch.bfloat16),
        _float(4, 3, "fn"),
        _float(5, 2, "ieee"),
        _float(3, 4, "ieee"),
        _float(3, 2),
        _float(2, 3),
        _float(2, 1),
        IntFormat("int8", 8, True),
        IntFormat("int4", 4, True),
        IntFormat("int8_asym", 8, False),
        IntFormat("int4_asym", 4, False),
        PowerOfTwoFormat("e8m0", 8, 127),
        # OCP Microscaling Formats (MX) v1.0, section 5: blocks of 32, E8M0 scales.
        BlockFormat("mxfp8_e4m3", "fp8_e4m3", 32, "e8m0"),
        BlockFormat("mxfp8_e5m2", "fp8_e5m2", 32, "e8m0"),
        BlockFormat("mxfp6_e3m2", "fp6_e3m2", 32, "e8m0"),
        BlockFormat("mxfp6_e2m3", "fp6_e2m3", 32, "e8m0"),
        BlockFormat("mxfp4_e2m1", "fp4_e2m1", 32, "e8m0"),
        BlockFormat("mxint8", "int8", 32, "e8m0", element_scale=2.0**-6),
        # NVIDIA NVFP4: blocks of 16, E4M3 scales under an fp32 per-tensor scale.
        BlockFormat("nvfp4", "fp4_e2m1", 16, "fp8_e4m3", has_tensor_scale=True, scale_rule="nearest"),
    ]
}

# Short aliases: "fp6" is the ZeroQuant(4+2) format, "fp8" the common E4M3; the scale
# formats are often named by their fields alone.
ALIASES = {"fp8": "fp8_e4m3", "fp6": "fp6_e3m2", "fp4": "fp4_e2m1", "uint4": "int4_asym", "uint8": "int8_asym",
           "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2", "mxfp4": "mxfp4_e2m1"}
CEIL_SUFFIX = ":ceil"  # mxfp4_e2m1:ceil - the MX variant whose scale never clips

_FLOAT_NAME = re.compile(r"^fp(\d+)_e(\d+)m(\d+)$")
_INT_NAME = re.compile(r"^int(\d+)(_asym)?$")


def get_format(name: str) -> NumberFormat:
    """Look up a format by name; any ``fpN_eXmY`` (N = 1+X+Y, all codes finite unless it
    is a registered 8-bit format) and any ``intN`` / ``intN_asym`` (2 <= N <= 8) parse."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key.endswith(CEIL_SUFFIX):
        base = get_format(key[:-len(CEIL_SUFFIX)])
        if not (isinstance(base, BlockFormat) and base.scale_rule == "floor"):
            raise FpbenchError(f"format {name!r}: {CEIL_SUFFIX} applies to the MX formats only "
                               f"(e.g. mxfp4_e2m1{CEIL_SUFFIX})")
        return replace(base, name=base.name + CEIL_SUFFIX, scale_rule="ceil")
    if key in FORMATS:
        return FORMATS[key]
    if m := _FLOAT_NAME.match(key):
        bits, ebits, mbits = map(int, m.groups())
        if bits != 1 + ebits + mbits or ebits < 1 or mbits < 0 or bits > 8:
            raise FpbenchError(
                f"format {name!r}: fpN_eXmY needs N = 1 + X + Y <= 8 and X >= 1 (e.g. fp6_e3m2)"
            )
        return _float(ebits, mbits)
    if m := _INT_NAME.match(key):
        bits = int(m.group(1))
        if 2 <= bits <= 8:
            return IntFormat(key, bits, m.group(2) is None)
    raise FpbenchError(
        f"unknown format {name!r}; known: {', '.join(FORMATS)} "
        f"(or any fpN_eXmY / intN / intN_asym, MX formats with {CEIL_SUFFIX}; aliases {', '.join(ALIASES)})"
    )


def format_table() -> list[dict]:
    """One row per registered format, for `fpbench formats`."""
    rows = []
    for fmt in FORMATS.values():
        row = {"format": fmt.name, "family": fmt.family, "bits": fmt.bits}
        if isinstance(fmt, FloatFormat):
            finite = int(torch.isfinite(fmt.decode_table).sum())
            row |= {
                "exp_bits": fmt.ebits, "man_bits": fmt.mbits, "bias": fmt.bias,
                "special": fmt.special, "max": fmt.max, "min_normal": fmt.min_normal,
                "min_subnormal": fmt.min_subnormal, "finite_values": finite,
            }
        elif isinstance(fmt, IntFormat):
            row |= {
                "special": "symmetric" if fmt.symmetric else "asymmetric (zero point)",
                "max": float(fmt.qmax), "min_normal": 1.0, "min_subnormal": None,
                "finite_values": fmt.qmax - fmt.qmin + 1,
            }
        elif isinstance(fmt, PowerOfTwoFormat):
            row |= {"exp_bits": fmt.ebits, "man_bits": 0, "bias": fmt.bias, "special": "unsigned, no zero; NaN code",
                    "max": fmt.max, "min_normal": fmt.min_normal, "min_subnormal": None,
                    "finite_values": (1 << fmt.ebits) - 1}
        elif isinstance(fmt, BlockFormat):
            row |= {"special": f"{fmt.element.name} x {fmt.element_scale:g}, blocks of {fmt.block_size}, "
                               f"{fmt.scale.name} scales" + (" + fp32 tensor scale" if fmt.has_tensor_scale else ""),
                    "max": fmt.max, "finite_values": int(torch.isfinite(fmt.decode_table).sum())}
        else:
            info = torch.finfo(fmt.dtype)
            row |= {
                "exp_bits": info.bits - 1 - _mantissa_bits(fmt.dtype),
                "man_bits": _mantissa_bits(fmt.dtype), "special": "ieee", "max": info.max,
                "min_normal": info.smallest_normal,
                "min_subnormal": info.smallest_normal * info.eps,
            }
            row["bias"] = (1 << (row["exp_bits"] - 1)) - 1
            # every code except the all-ones exponent (inf/NaN), both signs
            row["finite_values"] = (1 << info.bits) - 2 * (1 << row["man_bits"])
        rows.append(row)
    return rows


def _mantissa_bits(dtype: torch.dtype) -> int:
    return {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
