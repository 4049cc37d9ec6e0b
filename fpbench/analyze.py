"""`fpbench analyze`: where does a floating-point grid beat a uniform (integer) one?

Two analyses after van Baalen et al., "FP8 versus INT8 for efficient deep learning
inference" (arXiv 2303.17951), each format judged at its own best clipping:

- ``synthetic``: the expected MSE / SQNR of INT8 and FP8 with 2, 3, 4, 5 exponent bits,
  and of the 4-6-bit formats, on unit-variance Gaussian, Laplace and Student-t
  distributions of decreasing degrees of freedom (heavier tails, more outliers). Exact
  expectations (closed-form partial moments, ``qerror``), no sampling noise.
  With them, block-scaled formats (MXFP4/6/8, MXINT8, NVFP4) against INT4/FP4/FP6/INT8
  with fp16 group scales of the same block size, each at absmax scales (no clipping
  search: block formats fix their scale rule). A block's scale depends on the block's
  maximum, which has no closed form here, so these SQNRs are a seeded Monte-Carlo
  estimate (``BLOCK_MC_SHAPE`` values drawn per distribution with ``BLOCK_MC_SEED``,
  quantized by the very RTN code the runs use); the ``method`` column says so. For
  Student-t with 4 or fewer degrees of freedom (infinite fourth moment) the estimate is
  dominated by rare extreme blocks and moves by several tenths of a dB between seeds.
- ``layers``: for a model and calibration text, every quantized linear layer's weight
  and input activation: kurtosis, max/std, and the SQNR under each format for four
  quantizers: weight per tensor (best clip), weight per output channel (absmax scaled
  by the MSE-best ratio, i.e. ``--clip mse``), input per tensor (best clip: what a
  static MSE-calibrated scale can reach at best), input per token (absmax, dynamic).
  The fraction of layers each format wins follows.

Both write a CSV and a PNG to the output folder and append summary records (task
``analyze-synthetic`` / ``analyze-layers``) to its results store.

Formats here are the registry's: FP8 E4M3 is the "fn" variant, E5M2 and E3M4 keep IEEE
inf/NaN (their top binade holds no finite values), the rest use every code.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fpbench.quant.formats import FloatFormat, get_format
from fpbench.quant.model import target_linears
from fpbench.quant.qerror import (Gaussian, Laplace, RowSamples, Sample, StudentT, best_clip, positive_grid, row_errors,
                     sqnr_db)
from fpbench.quant.scheme import Scheme
from fpbench.quant.weights import CLIP_RATIOS, bits_per_weight, fake_quantize_weight
from fpbench.records.environment import utc_now
from fpbench.records.store import ResultStore

FORMATS_8BIT = ("int8", "fp8_e2m5", "fp8_e3m4", "fp8_e4m3", "fp8_e5m2")
FORMATS_LOW_BIT = ("int4", "fp4_e2m1", "fp4_e3m0", "int5", "fp5_e2m2", "fp5_e3m1",
                   "int6", "fp6_e2m3", "fp6_e3m2")
STUDENT_T_DOFS = (30, 10, 6, 5, 4, 3, 2.5)
# Best-clip search range in standard deviations: wide enough that no format's optimum
# for these distributions sits on an end (checked by the tests).
SYNTHETIC_CLIP_RANGE = (0.25, 2.0**32)
# For a tensor, clips from absmax/2^12 to absmax.
LAYER_CLIP_FLOOR = 2.0**-12
DEFAULT_LAYER_SAMPLES = 1  # windows of DEFAULT_CALIB_SEQLEN tokens
LAYER_KINDS = ("weight-tensor", "weight-channel", "input-tensor", "input-token")

# Block formats beside same-block fp16-scale INT/FP schemes (Monte-Carlo, see the docstring).
BLOCK_SCHEMES = ("int4/g32/rtn", "fp4_e2m1/g32/rtn", "mxfp4_e2m1/g32/rtn", "mxfp4_e2m1:ceil/g32/rtn",
                 "int4/g16/rtn", "fp4_e2m1/g16/rtn", "nvfp4/g16/rtn",
                 "fp6_e3m2/g32/rtn", "mxfp6_e3m2/g32/rtn", "mxfp6_e2m3/g32/rtn",
                 "int8/g32/rtn", "mxint8/g32/rtn", "fp8_e4m3/g32/rtn", "mxfp8_e4m3/g32/rtn", "mxfp8_e5m2/g32/rtn")
BLOCK_MC_SHAPE = (256, 1024)  # 2^18 values per distribution (the spread over seeds is in the tests)
BLOCK_MC_SEED = 0
MONTE_CARLO = "monte-carlo"

SYNTHETIC_CSV, SYNTHETIC_TABLE_CSV, SYNTHETIC_PNG = "analyze_synthetic.csv", "analyze_synthetic_table.csv", "analyze_synthetic.png"
SYNTHETIC_BLOCKS_CSV = "analyze_synthetic_blocks.csv"
LAYERS_CSV, LAYERS_SUMMARY_CSV, LAYERS_PNG = "analyze_layers.csv", "analyze_layers_summary.csv", "analyze_layers.png"


def distributions():
    """Ordered by excess kurtosis (Laplace's 3 equals t6's), lightest tails first."""
    ts = [StudentT(float(dof)) for dof in STUDENT_T_DOFS]
    return sorted([Gaussian(), Laplace(), *ts], key=lambda d: (d.excess_kurtosis, -getattr(d, "dof", math.inf)))


def _family(name: str) -> str:
    return "fp" if isinstance(get_format(name), FloatFormat) else "int"


# -- synthetic ---------------------------------------------------------------------------
def synthetic_frame(formats=FORMATS_8BIT + FORMATS_LOW_BIT, dists=None) -> pd.DataFrame:
    """One row per (distribution, format): best clip (in std), MSE and SQNR in dB."""
    rows = []
    for dist in dists or distributions():
        for name in formats:
            fmt = get_format(name)
            clip, error = best_clip(dist, fmt, *SYNTHETIC_CLIP_RANGE)
            rows.append({"distribution": dist.name, "excess_kurtosis": dist.excess_kurtosis,
                         "format": fmt.name, "bits": fmt.bits, "family": _family(fmt.name),
                         "best_clip_std": clip, "mse": error, "sqnr_db": sqnr_db(dist.second_moment, error)})
    return pd.DataFrame(rows)


def block_frame(schemes=BLOCK_SCHEMES, dists=None, shape=BLOCK_MC_SHAPE, seed=BLOCK_MC_SEED) -> pd.DataFrame:
    """One row per (distribution, scheme): SQNR (dB) of RTN with the scheme's own scales on
    ``shape`` values drawn from the distribution (the same draw for every scheme)."""
    rows = []
    for dist in dists or distributions():
        rng = np.random.default_rng(seed)
        x = torch.from_numpy(dist.sample(shape[0] * shape[1], rng).reshape(shape)).float()
        energy = x.double().pow(2).sum().item()
        for name in schemes:
            scheme = Scheme.parse(name)
            dequantized = fake_quantize_weight(x, scheme.format, scheme.granularity, scheme.clip,
                                               scheme.scale_format)
            error = (dequantized.double() - x.double()).pow(2).sum().item()
            rows.append({"distribution": dist.name, "excess_kurtosis": dist.excess_kurtosis, "scheme": name,
                         "format": scheme.format, "scale_format": scheme.scale_format,
                         "bits_per_weight": bits_per_weight(get_format(scheme.format), scheme.granularity, shape,
                                                            scheme.scale_format),
                         "sqnr_db": sqnr_db(energy, error), "method": MONTE_CARLO, "values": x.numel(),
                         "seed": seed})
    return pd.DataFrame(rows)


def block_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows = distributions, columns = SQNR (dB) per scheme, headed ``SCHEME (MC)``."""
    order = list(dict.fromkeys(frame["distribution"]))
    table = frame.pivot(index="distribution", columns="scheme", values="sqnr_db").reindex(order)
    table = table[list(dict.fromkeys(frame["scheme"]))]
    return table.rename(columns=lambda name: f"{name} (MC)")


def synthetic_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows = distributions (lightest tails first), columns = SQNR (dB) per format, then per
    bit width the winning format and the best FP minus the INT of the same width (dB):
    positive where FP overtakes INT."""
    order = list(dict.fromkeys(frame["distribution"]))
    table = frame.pivot(index="distribution", columns="format", values="sqnr_db").reindex(order)
    table = table[list(dict.fromkeys(frame["format"]))]
    for bits, group in frame.groupby("bits"):
        wide = group.pivot(index="distribution", columns="format", values="sqnr_db").reindex(order)
        table[f"best_{bits}bit"] = wide.idxmax(axis=1)
        ints = [c for c in wide.columns if _family(c) == "int"]
        fps = [c for c in wide.columns if _family(c) == "fp"]
        if ints and fps:
            table[f"fp_minus_int{bits}_db"] = wide[fps].max(axis=1) - wide[ints].max(axis=1)
    kurtosis = frame.groupby("distribution")["excess_kurtosis"].first().reindex(order)
    table.insert(0, "excess_kurtosis", kurtosis)
    table.index.name = "distribution"
    return table


def plot_synthetic(frame: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(dict.fromkeys(frame["distribution"]))
    widths = sorted(frame["bits"].unique(), reverse=True)
    fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 4.2), squeeze=False)
    for ax, bits in zip(axes[0], widths):
        group = frame[frame["bits"] == bits]
        for name, rows in group.groupby("format", sort=False):
            rows = rows.set_index("distribution").reindex(order)
            style = "-" if _family(name) == "int" else "--"
            ax.plot(range(len(order)), rows["sqnr_db"], style, marker="o", ms=3, label=name,
                    lw=2.2 if _family(name) == "int" else 1.2)
        ax.set_xticks(range(len(order)), [o.replace("student_", "") for o in order], rotation=45, ha="right")
        ax.set_title(f"{bits}-bit formats, best clipping")
        ax.set_ylabel("SQNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Expected SQNR on unit-variance distributions (tails heavier to the right)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_synthetic(out_dir, formats=FORMATS_8BIT + FORMATS_LOW_BIT,
                  block_schemes=BLOCK_SCHEMES) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """Compute, write CSVs + PNG, append records (model ``synthetic``) to the store. The
    returned table holds the exact best-clip SQNRs, then the block comparison's
    Monte-Carlo SQNRs (columns ``SCHEME (MC)``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = synthetic_frame(formats)
    table = synthetic_table(frame)
    blocks = block_frame(block_schemes) if block_schemes else None
    if blocks is not None:
        table = table.join(block_table(blocks))
    paths = [out_dir / SYNTHETIC_CSV, out_dir / SYNTHETIC_TABLE_CSV, out_dir / SYNTHETIC_PNG]
    frame.to_csv(paths[0], index=False)
    table.to_csv(paths[1])
    plot_synthetic(frame, paths[2])
    now = utc_now()
    # float()/int(): pandas hands out numpy scalars, which are not JSON numbers.
    records = [{"model": "synthetic", "scheme": row.format, "task": "analyze-synthetic",
                "metric": f"sqnr_db:{row.distribution}", "value": float(row.sqnr_db), "n": None, "limit": None,
                "distribution": row.distribution, "format": row.format, "bits": int(row.bits),
                "best_clip_std": float(row.best_clip_std), "mse": float(row.mse), "bits_per_weight": None,
                "method": "exact", "quantize_s": None, "time": now} for row in frame.itertuples()]
    if blocks is not None:
        paths.append(out_dir / SYNTHETIC_BLOCKS_CSV)
        blocks.to_csv(paths[-1], index=False)
        records += [{"model": "synthetic", "scheme": row.scheme, "task": "analyze-synthetic",
                     "metric": f"sqnr_db:{row.distribution}", "value": float(row.sqnr_db), "n": int(row.values),
                     "limit": None, "distribution": row.distribution, "format": row.format,
                     "scale_format": row.scale_format, "bits_per_weight": float(row.bits_per_weight),
                     "method": row.method, "seed": int(row.seed), "quantize_s": None, "time": now}
                    for row in blocks.itertuples()]
    ResultStore(out_dir).append(records)
    return frame, table, paths


# -- per layer ---------------------------------------------------------------------------
def tensor_stats(x: torch.Tensor) -> dict:
    """Pearson kurtosis (3 for a Gaussian) and absmax / std, in float64."""
    flat = x.detach().reshape(-1).double()
    centred = flat - flat.mean()
    variance = centred.pow(2).mean()
    kurtosis = (centred.pow(4).mean() / variance**2).item() if variance > 0 else math.nan
    std = variance.sqrt().item()
    return {"kurtosis": kurtosis, "max_over_std": flat.abs().max().item() / std if std > 0 else math.nan}


def _best_clip_rows(x: torch.Tensor, formats) -> dict[str, dict]:
    sample = Sample(x)
    out = {}
    for name in formats:
        clip, error = best_clip(sample, name, sample.absmax * LAYER_CLIP_FLOOR, sample.absmax, points=80)
        out[name] = {"sqnr_db": sqnr_db(sample.second_moment, error), "clip_over_absmax": clip / sample.absmax}
    return out


def _per_row_sqnr(sample: RowSamples, name: str, ratios) -> float:
    """SQNR with one absmax scale per row, each shrunk by its best ratio in ``ratios``."""
    top = float(positive_grid(name)[-1])
    absmax = torch.where(sample.absmax > 0, sample.absmax, torch.ones_like(sample.absmax))
    scales = absmax / top * torch.tensor(ratios, dtype=torch.float64)
    error = row_errors(sample, name, scales).min(dim=1).values.sum().item()
    return sqnr_db(sample.energy, error)


def weight_rows(weight: torch.Tensor, formats) -> list[dict]:
    stats = tensor_stats(weight)
    per_tensor = _best_clip_rows(weight, formats)
    channels = RowSamples(weight)
    rows = []
    for name in formats:
        rows.append({"kind": "weight-tensor", "format": name, **stats, **per_tensor[name]})
        # Per output channel with the ratios of `--clip mse` (quant.CLIP_RATIOS).
        rows.append({"kind": "weight-channel", "format": name, **stats,
                     "sqnr_db": _per_row_sqnr(channels, name, CLIP_RATIOS), "clip_over_absmax": math.nan})
    return rows


def input_rows(x: torch.Tensor, formats) -> list[dict]:
    tokens = x.reshape(-1, x.shape[-1])
    stats = tensor_stats(tokens)
    per_tensor = _best_clip_rows(tokens, formats)
    per_token = RowSamples(tokens)
    rows = []
    for name in formats:
        rows.append({"kind": "input-tensor", "format": name, **stats, **per_tensor[name]})
        # Per token, absmax: what the token-dynamic quantizer does.
        rows.append({"kind": "input-token", "format": name, **stats,
                     "sqnr_db": _per_row_sqnr(per_token, name, (1.0,)), "clip_over_absmax": 1.0})
    return rows


@torch.no_grad()
def layers_frame(model: torch.nn.Module, windows: torch.Tensor, formats=FORMATS_8BIT,
                 include_head: bool = False, progress: bool = True) -> pd.DataFrame:
    """One row per (layer, kind, format). Inputs come from one forward pass over all
    calibration windows as a batch; layers that share an input (q/k/v, gate/up) share
    its statistics."""
    for name in formats:
        positive_grid(name)  # symmetric formats only: fail before the forward pass
    layers = target_linears(model, include_head)
    bar = tqdm(total=2 * len(layers), desc="analyze layers", disable=not progress, leave=False)
    rows, last = [], {}

    def hook(module, args, name):
        x = args[0]
        # Holding the last input keeps its memory from being reused, so `is` is safe.
        if last.get("input") is not x:
            last.update(input=x, rows=input_rows(x, formats))
        rows.extend({"layer": name, **row} for row in last["rows"])
        bar.update()

    handles = [module.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
               for name, module in layers.items()]
    try:
        extra = {"decoder_input_ids": windows} if getattr(model.config, "is_encoder_decoder", False) else {}
        model(input_ids=windows, **extra)
    finally:
        for handle in handles:
            handle.remove()
    last.clear()
    for name, module in layers.items():
        rows.extend({"layer": name, **row} for row in weight_rows(module.weight, formats))
        bar.update()
    bar.close()
    frame = pd.DataFrame(rows)
    order = {name: i for i, name in enumerate(layers)}
    return frame.sort_values(["layer", "kind"], key=lambda c: c.map(order) if c.name == "layer" else c,
                             kind="stable").reset_index(drop=True)


def layers_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per kind and format: fraction of layers won (highest SQNR), median and min SQNR,
    and the median of (this format's SQNR - INT8's) over layers."""
    rows = []
    for kind, group in frame.groupby("kind", sort=False):
        wide = group.pivot(index="layer", columns="format", values="sqnr_db")
        winners = wide.idxmax(axis=1)
        int8 = wide["int8"] if "int8" in wide else None
        for name in wide.columns:
            rows.append({"kind": kind, "format": name, "layers": len(wide),
                         "win_fraction": float((winners == name).mean()),
                         "median_sqnr_db": float(wide[name].median()), "min_sqnr_db": float(wide[name].min()),
                         "median_minus_int8_db": float((wide[name] - int8).median()) if int8 is not None else math.nan})
    return pd.DataFrame(rows)


def plot_layers(frame: pd.DataFrame, summary: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, marker in zip(LAYER_KINDS, "os^v"):
        group = frame[frame["kind"] == kind]
        if group.empty or "int8" not in set(group["format"]):
            continue
        wide = group.pivot(index="layer", columns="format", values="sqnr_db")
        fps = [c for c in wide.columns if _family(c) == "fp"]
        kurtosis = group.groupby("layer")["kurtosis"].first().reindex(wide.index)
        left.scatter(kurtosis, wide[fps].max(axis=1) - wide["int8"], s=12, marker=marker, label=kind, alpha=0.7)
    left.axhline(0, color="k", lw=0.8)
    left.set_xscale("log")
    left.set_xlabel("kurtosis of the tensor (Gaussian = 3)")
    left.set_ylabel("best FP8 SQNR - INT8 SQNR (dB)")
    left.set_title("FP8 wins above the line")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    wins = summary.pivot(index="kind", columns="format", values="win_fraction")
    wins = wins.reindex([k for k in LAYER_KINDS if k in wins.index])
    wins.plot.bar(ax=right, rot=0)
    right.set_ylabel("fraction of layers won (highest SQNR)")
    right.set_title("Which 8-bit format wins, per quantizer")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_layers(loaded, windows: torch.Tensor, out_dir, formats=FORMATS_8BIT, include_head: bool = False,
               progress: bool = True, calib: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """Analyze every quantized linear layer of ``loaded`` on ``windows``; write CSVs + PNG
    and append one record per (kind, format, statistic) to the store."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = layers_frame(loaded.model, windows, formats, include_head, progress)
    summary = layers_summary(frame)
    paths = [out_dir / LAYERS_CSV, out_dir / LAYERS_SUMMARY_CSV, out_dir / LAYERS_PNG]
    frame.to_csv(paths[0], index=False)
    summary.to_csv(paths[1], index=False)
    plot_layers(frame, summary, paths[2], f"{loaded.name}: {frame['layer'].nunique()} linear layers, "
                                          f"{windows.numel()} calibration tokens")
    now = utc_now()
    common = {"model": loaded.name, "model_source": loaded.source, "task": "analyze-layers", "limit": None,
              "calib": calib, "calib_samples": int(windows.shape[0]), "calib_seqlen": int(windows.shape[1]),
              "caveat": loaded.caveat, "bits_per_weight": None, "quantize_s": None, "time": now}
    records = []
    for row in summary.itertuples():
        for metric in ("win_fraction", "median_sqnr_db"):
            records.append(common | {"scheme": row.format, "format": row.format, "kind": row.kind,
                                     "metric": f"{metric}:{row.kind}", "value": float(getattr(row, metric)),
                                     "n": int(row.layers)})
    ResultStore(out_dir).append(records)
    return frame, summary, paths
