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

Rounding is round-to-nearest, ties to even, saturating to ±max (an input beyond max,
including ±inf, becomes ±max; NaN stays NaN). Codes are the format's bit patterns,
the same as ml_dtypes' (sign bit on top), stored in uint8.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
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
        magnitude = work.abs()
        # frexp: magnitude = m * 2^e with m in [0.5, 1), so floor(log2) = e - 1, exactly.
        _, exp = torch.frexp(magnitude)
        exponent = torch.clamp(exp - 1, min=self.emin)  # subnormals share emin's quantum
        quantum = torch.ldexp(torch.ones_like(work), (exponent - self.mbits).to(torch.int32))
        # torch.round is round-half-to-even; a carry into the next binade lands on its
        # first value, which is on the grid.
        rounded = torch.round(magnitude / quantum) * quantum
        rounded = torch.clamp(rounded, max=self.max)  # saturate (also turns inf into max)
        rounded = torch.where(torch.isnan(work), work, rounded)
        return torch.copysign(rounded, work).to(x.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bit patterns (uint8) of round(x). NaN maps to the NaN code where one exists."""
        value = self.round(x.to(torch.float64))
        magnitude = value.abs()
        sign = torch.signbit(value).to(torch.int64)
        _, exp = torch.frexp(magnitude)
        exponent = exp.to(torch.int64) - 1
        is_normal = magnitude >= self.min_normal
        exp_field = torch.where(is_normal, exponent + self.bias, torch.zeros_like(exponent))
        mantissa = torch.where(
            is_normal,
            magnitude / torch.ldexp(torch.ones_like(magnitude), exponent.to(torch.int32)) - 1,
            magnitude / self.min_subnormal,
        )
        mantissa_field = torch.where(
            is_normal, mantissa * 2**self.mbits, mantissa
        ).round().to(torch.int64)
        codes = (sign << (self.bits - 1)) | (exp_field << self.mbits) | mantissa_field
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


NumberFormat = FloatFormat | IntFormat | BaselineFormat


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
    ]
}

# Short aliases: "fp6" is the ZeroQuant(4+2) format, "fp8" the common E4M3.
ALIASES = {"fp8": "fp8_e4m3", "fp6": "fp6_e3m2", "fp4": "fp4_e2m1", "uint4": "int4_asym", "uint8": "int8_asym"}

_FLOAT_NAME = re.compile(r"^fp(\d+)_e(\d+)m(\d+)$")
_INT_NAME = re.compile(r"^int(\d+)(_asym)?$")


def get_format(name: str) -> NumberFormat:
    """Look up a format by name; any ``fpN_eXmY`` (N = 1+X+Y, all codes finite unless it
    is a registered 8-bit format) and any ``intN`` / ``intN_asym`` (2 <= N <= 8) parse."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
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
        f"(or any fpN_eXmY / intN / intN_asym; aliases {', '.join(ALIASES)})"
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
