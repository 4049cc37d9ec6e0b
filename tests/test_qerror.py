import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from fpbench.errors import FpbenchError
from fpbench.quant.formats import get_format
from fpbench.quant.qerror import (Gaussian, Laplace, Sample, StudentT, best_clip, mse, positive_grid,
                            row_errors)
from fpbench.quant.weights import compute_scales, fake_quantize
from fpbench.quant.scheme import Granularity

DISTS = [Gaussian(), Laplace(), StudentT(10.0), StudentT(3.0), StudentT(2.5)]


def _pdf(dist):
    """Independent densities from scipy, scaled to unit variance."""
    if isinstance(dist, Gaussian):
        return stats.norm.pdf
    if isinstance(dist, Laplace):
        return lambda x: stats.laplace.pdf(x, scale=1 / math.sqrt(2))
    sigma = math.sqrt((dist.dof - 2) / dist.dof)
    return lambda x: stats.t.pdf(x / sigma, dist.dof) / sigma


@pytest.mark.parametrize("dist", DISTS, ids=lambda d: d.name)
def test_partial_moments_match_numerical_integration(dist):
    pdf = _pdf(dist)
    points = np.array([0.3, 1.0, 2.7, 9.0])
    got = dist.partial(points)
    for k in range(3):
        expected = [2 * integrate.quad(lambda x: x**k * pdf(x), 0, t)[0] for t in points]
        np.testing.assert_allclose(got[k], expected, rtol=1e-7, atol=1e-12)
    totals = dist.partial(np.array(np.inf))
    assert float(totals[0]) == pytest.approx(1.0) and float(totals[2]) == pytest.approx(1.0)


@pytest.mark.parametrize("fmt_name", ["int8", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp4_e2m1", "int4"])
def test_expected_mse_matches_monte_carlo_with_the_real_rounder(fmt_name):
    fmt = get_format(fmt_name)
    grid = positive_grid(fmt)
    x = torch.from_numpy(np.random.default_rng(0).laplace(scale=1 / math.sqrt(2), size=1_000_000))
    for clip in (3.0, 8.0):
        scale = clip / grid[-1]
        simulated = (fake_quantize(x, fmt, torch.tensor(scale, dtype=torch.float64)) - x).pow(2).mean().item()
        assert mse(Laplace(), grid, scale)[0] == pytest.approx(simulated, rel=0.03)
        # On the sample itself the cell sums are exact (no sampling error at all).
        assert mse(Sample(x), grid, scale)[0] == pytest.approx(simulated, rel=1e-9)


def test_row_errors_match_fake_quantize_per_row():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 96, generator=generator)
    rows[:, 7] *= 20
    for fmt_name in ("int8", "fp8_e4m3", "fp8_e2m5"):
        fmt = get_format(fmt_name)
        scale, _ = compute_scales(rows, fmt, Granularity("channel"))
        scales = scale.double() * torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
        errors = row_errors(rows, fmt, scales)
        for j in range(3):
            reference = (fake_quantize(rows.double(), fmt, scales[:, j:j + 1]) - rows.double()).pow(2).sum(dim=1)
            torch.testing.assert_close(errors[:, j], reference, rtol=1e-9, atol=1e-12)


def test_best_clip_beats_a_dense_scan():
    grid = positive_grid("int8")
    clip, error = best_clip(Gaussian(), "int8", 0.5, 64)
    scan = np.linspace(2.0, 6.0, 4001)
    assert error <= mse(Gaussian(), grid, scan / grid[-1]).min() * (1 + 1e-9)
    assert 3.5 < clip < 4.5


def test_positive_grid():
    assert positive_grid("int8").tolist() == list(range(128))
    e4m3 = positive_grid("fp8_e4m3")
    assert e4m3[-1] == 448 and e4m3[0] == 0 and len(e4m3) == 127  # 0, 126 nonzero finite, no NaN
    with pytest.raises(FpbenchError, match="symmetric"):
        positive_grid("int8_asym")
    with pytest.raises(FpbenchError):
        StudentT(2.0)
