"""Granularity and Scheme: small immutable values with a short string form that
round-trips through parsing (``int4/g128/rtn``, ``fp6_e3m2/channel/rtn``, ``fp16``).
The string is the key everywhere: CLI, sweep YAML, result records, reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .errors import FpbenchError
from .formats import BaselineFormat, get_format

DEFAULT_GROUP_SIZE = 128
ALGOS = ("rtn", "gptq")
CLIPS = ("none", "mse")


@dataclass(frozen=True)
class Granularity:
    """``tensor`` (one scale), ``channel`` (one per output row, "coarse"), or
    ``group`` (one per ``group_size`` consecutive input weights of a row, "fine")."""

    kind: str
    group_size: int | None = None

    @classmethod
    def parse(cls, text: str) -> Granularity:
        text = text.strip().lower()
        if text in ("tensor", "channel"):
            return cls(text)
        for prefix in ("group:", "g"):
            if text.startswith(prefix) and text[len(prefix):].isdigit():
                size = int(text[len(prefix):])
                if size < 1:
                    break
                return cls("group", size)
        raise FpbenchError(
            f"unknown granularity {text!r}; use tensor, channel, or group:G with G a "
            f"positive integer (e.g. group:{DEFAULT_GROUP_SIZE})"
        )

    @property
    def short(self) -> str:
        return f"g{self.group_size}" if self.kind == "group" else self.kind

    def __str__(self) -> str:
        return f"group:{self.group_size}" if self.kind == "group" else self.kind


@dataclass(frozen=True)
class Scheme:
    """Weight format x granularity x algorithm (+ clipping, calibration source).
    Baseline formats (fp32/fp16/bf16) carry no granularity or algorithm."""

    format: str
    granularity: Granularity | None = None
    algo: str = "rtn"
    clip: str = "none"
    calib: str | None = None  # GPTQ calibration source; part of the name when set

    def __post_init__(self):
        fmt = get_format(self.format)
        object.__setattr__(self, "format", fmt.name)
        if self.algo not in ALGOS:
            raise FpbenchError(f"unknown algorithm {self.algo!r}; use one of {', '.join(ALGOS)}")
        if self.clip not in CLIPS:
            raise FpbenchError(f"unknown clipping {self.clip!r}; use one of {', '.join(CLIPS)}")
        if self.is_baseline:
            object.__setattr__(self, "granularity", None)
        elif self.granularity is None:
            raise FpbenchError(
                f"format {self.format} needs a granularity: --granularity tensor, channel "
                f"or group:G (e.g. group:{DEFAULT_GROUP_SIZE})"
            )

    @property
    def is_baseline(self) -> bool:
        return isinstance(get_format(self.format), BaselineFormat)

    @property
    def name(self) -> str:
        if self.is_baseline:
            return self.format
        algo = self.algo + ("-mse" if self.clip == "mse" else "")
        if self.calib:
            algo += f"@{self.calib}"
        return f"{self.format}/{self.granularity.short}/{algo}"

    @classmethod
    def parse(cls, name: str) -> Scheme:
        """Inverse of ``name``: ``int4/g128/gptq@wikitext2`` -> Scheme."""
        parts = name.strip().split("/")
        if len(parts) == 1:
            return cls(parts[0])
        if len(parts) != 3:
            raise FpbenchError(
                f"cannot parse scheme {name!r}; expected FORMAT/GRANULARITY/ALGO such as int4/g128/rtn"
            )
        fmt, gran, algo = parts
        algo, _, calib = algo.partition("@")
        algo, _, clip = algo.partition("-")
        return cls(fmt, Granularity.parse(gran), algo, clip or "none", calib or None)

    def fields(self) -> dict:
        """Flat fields for a result record."""
        out = asdict(self)
        out["granularity"] = str(self.granularity) if self.granularity else None
        out["scheme"] = self.name
        return out

    def with_(self, **changes) -> Scheme:
        return replace(self, **changes)
