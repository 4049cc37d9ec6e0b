"""Granularity and Scheme: small immutable values with a short string form that
round-trips through parsing (``int4/g128/rtn``, ``fp6_e3m2/channel/rtn``, ``fp16``).
The string is the key everywhere: CLI, sweep YAML, result records, reports.

Name grammar: ``FORMAT/GRANULARITY/ALGO[/s:SCALE_FORMAT][/a:ACT_FORMAT-ACT_GRANULARITY]``,
or a baseline format alone. The scale format is printed only when it is not the format's
default (fp16 for integer and minifloat formats, the format's own for MX and NVFP4), so
``int4/g128/rtn`` means fp16 scales and ``int4/g128/rtn/s:fp32`` fp32 ones. A block
format's granularity is its block: ``mxfp4_e2m1/g32/rtn``, ``nvfp4/g16/rtn``; given no
granularity it takes its block, and any other one is an error."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from fpbench.errors import FpbenchError
from fpbench.quant.formats import BaselineFormat, BlockFormat, FloatFormat, PowerOfTwoFormat, get_format

DEFAULT_GROUP_SIZE = 128
ALGOS = ("rtn", "gptq")
CLIPS = ("none", "mse")
# Activation scales: one per tensor fixed by calibration, one per token on the fly, or
# (block formats: MX, NVFP4) one per block of the token's features on the fly.
ACT_GRANULARITIES = ("tensor-static", "token-dynamic", "block-dynamic")
BLOCK_ACT_GRANULARITY = "block-dynamic"
ACT_PREFIX = "a:"  # marks the activation part of a name: int8/channel/rtn/a:int8-token-dynamic
SCALE_PREFIX = "s:"  # marks a non-default scale format: int4/g128/rtn/s:fp32
# Scales of integer and minifloat formats are stored as fp16 (as GPTQ/AWQ checkpoints do).
DEFAULT_SCALE_FORMAT = "fp16"


def default_scale_format(fmt) -> str | None:
    """fp16, a block format's own scale format, or None for a baseline (no scales)."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if isinstance(fmt, BaselineFormat):
        return None
    if isinstance(fmt, BlockFormat):
        return fmt.scale.name
    return DEFAULT_SCALE_FORMAT


def scale_format_of(fmt, scale_format: str | None) -> str | None:
    """The scale format's registry name (the default when None), checked: scales need a
    float-like format, and a block format keeps its own."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    default = default_scale_format(fmt)
    if scale_format is None or default is None:
        return default
    scale_fmt = get_format(scale_format)
    if isinstance(fmt, BlockFormat) and scale_fmt.name != default:
        raise FpbenchError(f"{fmt.name} stores its block scales as {default} by definition; "
                           f"drop the scale format {scale_fmt.name}")
    if not isinstance(scale_fmt, (BaselineFormat, FloatFormat, PowerOfTwoFormat)):
        raise FpbenchError(f"scale format {scale_fmt.name}: scales need a float format "
                           "(fp32, fp16, bf16, e8m0, e4m3 or any fpN_eXmY)")
    return scale_fmt.name


def check_act_granularity(act, granularity: str | None) -> str:
    """An activation granularity that fits the format: block formats take (and default to)
    ``block-dynamic``, which is theirs only."""
    act = get_format(act) if isinstance(act, str) else act
    block = isinstance(act, BlockFormat)
    if block and granularity is None:
        granularity = BLOCK_ACT_GRANULARITY
    if granularity not in ACT_GRANULARITIES:
        raise FpbenchError(f"activation granularity {granularity!r}: use one of "
                           f"{', '.join(ACT_GRANULARITIES)} (--act-granularity)")
    if block != (granularity == BLOCK_ACT_GRANULARITY):
        raise FpbenchError(f"activation granularity {granularity!r} with {act.name}: "
                           f"{BLOCK_ACT_GRANULARITY} is for block formats (MX, NVFP4), and is theirs only")
    return granularity


def check_block_granularity(fmt, granularity: Granularity | None) -> Granularity | None:
    """A block format's granularity is its block (None means it too); others pass as given."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if not isinstance(fmt, BlockFormat):
        return granularity
    block = Granularity("group", fmt.block_size)
    if granularity is not None and granularity != block:
        raise FpbenchError(f"{fmt.name} has blocks of {fmt.block_size} by definition, not {granularity}; "
                           f"drop --granularity or give group:{fmt.block_size}")
    return block


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


DEFAULT_CALIB_SOURCE = "wikitext2"  # calibration text of GPTQ / static activation scales without --calib


@dataclass(frozen=True)
class Scheme:
    """Weight format x granularity x algorithm (+ clipping, calibration source).
    Baseline formats (fp32/fp16/bf16) carry no granularity or algorithm."""

    format: str
    granularity: Granularity | None = None
    algo: str = "rtn"
    clip: str = "none"
    calib: str | None = None  # GPTQ calibration source; part of the name when set
    act_format: str | None = None  # activation format (W8A8); None = weight-only
    act_granularity: str | None = None  # one of ACT_GRANULARITIES
    act_clip: str = "none"  # static activation scale: absmax ("none") or "mse"
    scale_format: str | None = None  # weight scales' format; None = the format's default

    @property
    def calib_source(self) -> str:
        """Where this scheme's calibration text comes from: its own source, else the default."""
        return self.calib or DEFAULT_CALIB_SOURCE

    def __post_init__(self):
        fmt = get_format(self.format)
        if isinstance(fmt, PowerOfTwoFormat):
            raise FpbenchError(f"{fmt.name} is a scale format only; use it as a scale format (/{SCALE_PREFIX}{fmt.name})")
        object.__setattr__(self, "format", fmt.name)
        if self.algo not in ALGOS:
            raise FpbenchError(f"unknown algorithm {self.algo!r}; use one of {', '.join(ALGOS)}")
        if self.clip not in CLIPS:
            raise FpbenchError(f"unknown clipping {self.clip!r}; use one of {', '.join(CLIPS)}")
        self._check_activation()
        if isinstance(fmt, BlockFormat) and self.clip != "none":
            raise FpbenchError(f"{fmt.name} picks its block scales by its own rule; drop --clip {self.clip}")
        if self.is_baseline:
            object.__setattr__(self, "granularity", None)
            if self.scale_format is not None:
                raise FpbenchError(f"{self.format} is a plain cast with no scales; drop the scale format")
        else:
            object.__setattr__(self, "granularity", check_block_granularity(fmt, self.granularity))
        object.__setattr__(self, "scale_format", scale_format_of(fmt, self.scale_format))
        if self.granularity is None and not self.is_baseline:
            raise FpbenchError(
                f"format {self.format} needs a granularity: --granularity tensor, channel "
                f"or group:G (e.g. group:{DEFAULT_GROUP_SIZE})"
            )

    def _check_activation(self) -> None:
        if self.act_format is None:
            if self.act_granularity is not None or self.act_clip != "none":
                raise FpbenchError("an activation granularity or clipping needs an activation format: "
                                   "add --act-format (e.g. int8)")
            return
        act = get_format(self.act_format)
        if isinstance(act, BaselineFormat):
            raise FpbenchError(f"activation format {act.name} is a baseline (no quantization); "
                               "use int8, fp8_e4m3, fp8_e5m2, ... or drop --act-format")
        object.__setattr__(self, "act_format", act.name)
        object.__setattr__(self, "act_granularity", check_act_granularity(act, self.act_granularity))
        if self.act_clip not in CLIPS:
            raise FpbenchError(f"unknown activation clipping {self.act_clip!r}; use one of {', '.join(CLIPS)}")
        if self.act_clip == "mse" and self.act_granularity != "tensor-static":
            raise FpbenchError("activation MSE clipping applies to tensor-static scales only")

    @property
    def act_name(self) -> str | None:
        """``a:int8-tensor-static`` (``-mse`` appended with MSE clipping), or None."""
        if self.act_format is None:
            return None
        return f"{ACT_PREFIX}{self.act_format}-{self.act_granularity}" + ("-mse" if self.act_clip == "mse" else "")

    @property
    def is_baseline(self) -> bool:
        return isinstance(get_format(self.format), BaselineFormat)

    @property
    def name(self) -> str:
        """Weight part, then ``/a:...`` when activations are quantized too."""
        if self.act_format is None:
            return self._weight_name
        return f"{self._weight_name}/{self.act_name}"

    @property
    def _weight_name(self) -> str:
        if self.is_baseline:
            return self.format
        algo = self.algo + ("-mse" if self.clip == "mse" else "")
        if self.calib:
            algo += f"@{self.calib}"
        name = f"{self.format}/{self.granularity.short}/{algo}"
        if self.scale_format != default_scale_format(self.format):
            name += f"/{SCALE_PREFIX}{self.scale_format}"
        return name

    @classmethod
    def parse(cls, name: str) -> Scheme:
        """Inverse of ``name``: ``int4/g128/gptq@wikitext2`` -> Scheme."""
        parts = name.strip().split("/")
        act = {}
        if len(parts) > 1 and parts[-1].startswith(ACT_PREFIX):
            act = cls._parse_activation(parts.pop()[len(ACT_PREFIX):], name)
        if len(parts) > 1 and parts[-1].startswith(SCALE_PREFIX):
            act["scale_format"] = parts.pop()[len(SCALE_PREFIX):]
        if len(parts) == 1 and act:
            return cls(parts[0], **act)
        if len(parts) == 1:
            return cls(parts[0])
        if len(parts) != 3:
            raise FpbenchError(
                f"cannot parse scheme {name!r}; expected FORMAT/GRANULARITY/ALGO[/{SCALE_PREFIX}SCALE_FORMAT] "
                "such as int4/g128/rtn or int4/g128/rtn/s:fp32"
            )
        fmt, gran, algo = parts
        algo, _, calib = algo.partition("@")
        algo, _, clip = algo.partition("-")
        return cls(fmt, Granularity.parse(gran), algo, clip or "none", calib or None, **act)

    @staticmethod
    def _parse_activation(text: str, name: str) -> dict:
        """``int8-tensor-static[-mse]`` -> act_format, act_granularity, act_clip."""
        act_format, _, rest = text.partition("-")  # format names hold no hyphen
        act_clip = "none"
        if rest.endswith("-mse"):
            rest, act_clip = rest[:-len("-mse")], "mse"
        if not act_format or rest not in ACT_GRANULARITIES:
            raise FpbenchError(
                f"cannot parse the activation part of scheme {name!r}; expected "
                f"{ACT_PREFIX}FORMAT-{'|'.join(ACT_GRANULARITIES)}[-mse] such as {ACT_PREFIX}int8-token-dynamic"
            )
        return {"act_format": act_format, "act_granularity": rest, "act_clip": act_clip}

    def fields(self) -> dict:
        """Flat fields for a result record."""
        out = asdict(self)
        out["granularity"] = str(self.granularity) if self.granularity else None
        out["scheme"] = self.name
        return out

    def with_(self, **changes) -> Scheme:
        return replace(self, **changes)
