"""Quantization error of a symmetric number format on a distribution, exactly.

A symmetric format's grid, scaled by ``scale``, rounds ``|x|`` to the nearest of its
non-negative values ``v_0 = 0 < v_1 < ... < v_K`` (and copies the sign), saturating
beyond ``v_K``. The decision thresholds are the midpoints ``t_i = (v_i + v_{i+1}) / 2``,
so the expected squared error is a sum over cells of partial moments of ``|X|``:

    MSE = sum_i  E[(|X| - v_i)^2 ; t_{i-1} <= |X| < t_i]
        = sum_i  M2_i - 2 v_i M1_i + v_i^2 M0_i,     Mk_i = E[|X|^k ; cell i]

(``t_{-1} = 0``, ``t_K = inf``: the last cell is the clipping error). Ties have measure
zero for a continuous distribution; for a sample they are rare and the tie-to-even rule
of the real rounder is ignored here. The partial moments come either in closed form
(Gaussian, Laplace, Student-t, each scaled to unit variance) or from a sample (sorted
``|x|`` and float64 prefix sums), so the same function gives the expected MSE of a
distribution and the exact MSE of a tensor, for hundreds of scales at once.

This is the analysis of van Baalen et al. (arXiv 2303.17951, section 3): each format is
judged at its own best scale ("best clipping"), found by ``best_clip``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fpbench.errors import FpbenchError
from fpbench.quant.formats import FloatFormat, IntFormat, NumberFormat, get_format


def positive_grid(fmt: NumberFormat | str) -> np.ndarray:
    """Sorted distinct finite values >= 0 of a sign-symmetric format (float64)."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if isinstance(fmt, IntFormat) and fmt.symmetric:
        return np.arange(0, fmt.qmax + 1, dtype=np.float64)
    if isinstance(fmt, FloatFormat):
        table = fmt.decode_table.numpy()
        return np.unique(table[np.isfinite(table) & (table >= 0)])
    raise FpbenchError(
        f"format {fmt.name}: the error analysis needs a sign-symmetric format (intN or fpN_eXmY), "
        "not an asymmetric integer or a baseline"
    )


class Moments:
    """Partial moments ``E[|X|^k ; |X| < t]`` for k = 0, 1, 2 (t may be inf)."""

    second_moment: float  # E[X^2]

    def partial(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` independent draws (float64), for what has no closed form (block scales)."""
        raise NotImplementedError


@dataclass
class Gaussian(Moments):
    name: str = "gaussian"
    second_moment: float = 1.0
    excess_kurtosis: float = 0.0

    def partial(self, t):
        t = np.asarray(t, dtype=np.float64)
        from scipy.special import erf

        inner = np.where(np.isinf(t), 0.0, t)
        pdf = np.where(np.isinf(t), 0.0, np.exp(-inner**2 / 2) / math.sqrt(2 * math.pi))
        m0 = erf(t / math.sqrt(2))
        m1 = 2 * (1 / math.sqrt(2 * math.pi) - pdf)
        m2 = m0 - 2 * inner * pdf
        return m0, m1, m2

    def sample(self, count, rng):
        return rng.standard_normal(count)


@dataclass
class Laplace(Moments):
    """Unit variance: |X| is exponential with mean b = 1/sqrt(2)."""

    name: str = "laplace"
    second_moment: float = 1.0
    excess_kurtosis: float = 3.0

    def partial(self, t):
        t = np.asarray(t, dtype=np.float64)
        b = 1 / math.sqrt(2)
        inner = np.where(np.isinf(t), 0.0, t)
        tail = np.where(np.isinf(t), 0.0, np.exp(-inner / b))
        m0 = 1 - tail
        m1 = b - (inner + b) * tail
        m2 = 2 * b * b - (inner**2 + 2 * b * inner + 2 * b * b) * tail
        return m0, m1, m2

    def sample(self, count, rng):
        return rng.laplace(0.0, 1 / math.sqrt(2), count)


@dataclass
class StudentT(Moments):
    """Student-t with ``dof`` > 2 degrees of freedom, scaled to unit variance.

    For T ~ t_nu with density f = C_nu (1 + x^2/nu)^(-(nu+1)/2):
    int_0^u x f = C_nu nu/(nu-1) [1 - (1 + u^2/nu)^(-(nu-1)/2)], and since
    x^2 f = C_nu nu (1 + x^2/nu)^(-(nu-1)/2) - nu f, where the first term is a t_{nu-2}
    density in y = x sqrt((nu-2)/nu), int_0^u x^2 f also reduces to t CDFs.
    """

    dof: float = 5.0
    second_moment: float = 1.0

    def __post_init__(self):
        if self.dof <= 2:
            raise FpbenchError(f"Student-t needs more than 2 degrees of freedom for a finite variance (got {self.dof})")

    @property
    def name(self) -> str:
        return f"student_t{self.dof:g}"

    @property
    def excess_kurtosis(self) -> float:
        return 6 / (self.dof - 4) if self.dof > 4 else math.inf

    @staticmethod
    def _norm(nu: float) -> float:
        return math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)

    def partial(self, t):
        from scipy.special import stdtr

        nu = float(self.dof)
        sigma = math.sqrt((nu - 2) / nu)  # X = sigma T has unit variance
        u = np.asarray(t, dtype=np.float64) / sigma
        c_nu, c_nu2 = self._norm(nu), self._norm(nu - 2)
        finite = np.where(np.isinf(u), 0.0, u)
        half_cdf = np.where(np.isinf(u), 0.5, stdtr(nu, finite) - 0.5)
        m0 = 2 * half_cdf
        base = np.where(np.isinf(u), 0.0, (1 + finite**2 / nu) ** (-(nu - 1) / 2))
        m1 = 2 * c_nu * nu / (nu - 1) * (1 - base)
        y = finite * math.sqrt((nu - 2) / nu)
        half_cdf2 = np.where(np.isinf(u), 0.5, stdtr(nu - 2, y) - 0.5)
        m2 = 2 * (c_nu * nu * math.sqrt(nu / (nu - 2)) * half_cdf2 / c_nu2 - nu * half_cdf)
        return m0, sigma * m1, sigma**2 * m2

    def sample(self, count, rng):
        return rng.standard_t(self.dof, count) * math.sqrt((self.dof - 2) / self.dof)


class Sample(Moments):
    """The empirical distribution of a tensor: exact partial moments of its values."""

    def __init__(self, values: torch.Tensor | np.ndarray):
        flat = values.detach().reshape(-1).double().abs() if isinstance(values, torch.Tensor) \
            else torch.from_numpy(np.abs(np.asarray(values, dtype=np.float64)).reshape(-1))
        if flat.numel() == 0:
            raise FpbenchError("cannot measure the quantization error of an empty tensor")
        self.sorted_abs = torch.sort(flat).values.numpy()
        self.count = self.sorted_abs.size
        zero = np.zeros(1)
        self._s1 = np.concatenate([zero, np.cumsum(self.sorted_abs)])
        self._s2 = np.concatenate([zero, np.cumsum(self.sorted_abs**2)])
        self.second_moment = float(self._s2[-1] / self.count)
        self.absmax = float(self.sorted_abs[-1])

    def partial(self, t):
        index = np.searchsorted(self.sorted_abs, np.asarray(t, dtype=np.float64), side="left")
        return index / self.count, self._s1[index] / self.count, self._s2[index] / self.count


def mse(moments: Moments, grid: np.ndarray, scales) -> np.ndarray:
    """Expected squared error for each scale in ``scales`` (grid values times scale)."""
    scales = np.atleast_1d(np.asarray(scales, dtype=np.float64))
    values = scales[:, None] * grid[None, :]  # [S, K+1]
    edges = np.concatenate([np.zeros((len(scales), 1)), (values[:, :-1] + values[:, 1:]) / 2,
                            np.full((len(scales), 1), np.inf)], axis=1)
    m0, m1, m2 = (np.diff(m, axis=1) for m in moments.partial(edges))
    return np.maximum((m2 - 2 * values * m1 + values**2 * m0).sum(axis=1), 0.0)


def sqnr_db(second_moment: float, error: float) -> float:
    """Signal-to-quantization-noise ratio in dB (inf for an exact representation)."""
    if error <= 0:
        return math.inf
    return 10 * math.log10(second_moment / error)


def best_clip(moments: Moments, fmt: NumberFormat | str, lo: float, hi: float,
              points: int = 160, refine_steps: int = 40) -> tuple[float, float]:
    """(clip, mse) minimising the error over clipping values in [lo, hi].

    The clip is the largest representable magnitude, ``scale * fmt.max``. A log-spaced
    scan finds the best bracket (the error is not unimodal for floats: it ripples as
    the grid's binades slide), then a golden-section search refines inside it.
    """
    grid = positive_grid(fmt)
    top = grid[-1]
    clips = np.geomspace(lo, hi, points)
    errors = mse(moments, grid, clips / top)
    best = int(np.argmin(errors))
    a, b = clips[max(best - 1, 0)], clips[min(best + 1, points - 1)]
    golden = (math.sqrt(5) - 1) / 2
    c, d = b - golden * (b - a), a + golden * (b - a)
    fc, fd = mse(moments, grid, [c / top, d / top])
    for _ in range(refine_steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - golden * (b - a)
            fc = mse(moments, grid, [c / top])[0]
        else:
            a, c, fc = c, d, fd
            d = a + golden * (b - a)
            fd = mse(moments, grid, [d / top])[0]
    candidates = [(float(errors[best]), float(clips[best])), (float(fc), float(c)), (float(fd), float(d))]
    error, clip = min(candidates)
    return clip, error


class RowSamples:
    """Each row of a [N, K] tensor as its own empirical distribution: sorted ``|x|`` and
    float64 prefix sums, computed once and reused for every format and scale."""

    def __init__(self, rows: torch.Tensor):
        self.sorted_abs = rows.detach().double().abs().sort(dim=1).values
        zero = torch.zeros(self.sorted_abs.shape[0], 1, dtype=torch.float64)
        self.s1 = torch.cat([zero, self.sorted_abs.cumsum(dim=1)], dim=1)
        self.s2 = torch.cat([zero, self.sorted_abs.pow(2).cumsum(dim=1)], dim=1)
        self.absmax = self.sorted_abs[:, -1:]
        self.energy = float(self.s2[:, -1].sum())


def row_errors(rows: torch.Tensor | RowSamples, fmt: NumberFormat | str, scales: torch.Tensor) -> torch.Tensor:
    """Squared error summed over each row of ``rows`` [N, K] for each of S scales per row
    (``scales`` [N, S]) -> [N, S]: the same cell sums as ``mse``, batched over rows (one
    sort per row, one batched search for every scale)."""
    sample = rows if isinstance(rows, RowSamples) else RowSamples(rows)
    grid = torch.from_numpy(positive_grid(fmt))
    n = sample.sorted_abs.shape[0]
    scales = scales.double().reshape(n, -1)
    values = scales[:, :, None] * grid  # [N, S, G]
    edges = torch.cat([torch.zeros_like(values[..., :1]), (values[..., :-1] + values[..., 1:]) / 2,
                       torch.full_like(values[..., :1], math.inf)], dim=-1)  # [N, S, G+1]
    flat = torch.searchsorted(sample.sorted_abs, edges.reshape(n, -1))
    m0 = flat.reshape(edges.shape).double().diff(dim=-1)
    m1 = sample.s1.gather(1, flat).reshape(edges.shape).diff(dim=-1)
    m2 = sample.s2.gather(1, flat).reshape(edges.shape).diff(dim=-1)
    return (m2 - 2 * values * m1 + values.pow(2) * m0).sum(dim=-1).clamp_min(0.0)
