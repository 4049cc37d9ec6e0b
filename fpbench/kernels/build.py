"""Build and load the compiled CPU kernels in ``fpbench/kernels/cpp/`` (on first use, then cached).

The extension is compiled by ``torch.utils.cpp_extension.load`` (ninja + the system C++
compiler) into a build folder keyed by the source hash, the torch version and the CPU's
SIMD flags, so an AVX2-only machine and an AVX-512 machine never share a binary. Inside
the binary the ISA is also chosen at run time (AVX-512 > AVX2 > scalar; only scalar
off x86-64); ``isa`` forces a narrower one (for tests and comparisons), as does
``FPBENCH_KERNEL_ISA``.

Build folder: ``$FPBENCH_KERNEL_BUILD_DIR``, else ``$FPBENCH_CACHE_DIR/kernels``, else
``~/.cache/fpbench/kernels``. ``make kernels`` runs the same build ahead of time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

from fpbench.errors import FpbenchError

SOURCE_DIR = Path(__file__).resolve().parent / "cpp"
SOURCES = ("lut_linear.cpp", "llama_step.cpp")
HEADERS = ("kernel_linear.h", "lut_common.h", "lut_scalar.h", "lut_avx2.h", "lut_avx512.h", "lut_bf16.h",
           "lut_bf16_gemv.h", "lut_pack.h")
ISAS = ("auto", "avx512bf16", "avx512vbmi", "avx512", "avx2", "scalar")  # widest first
# The CPU flags that change which code paths exist or are picked.
_RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_bf16")


def cpu_flags() -> list[str]:
    """The SIMD flags of this CPU that matter to the kernels (from /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in _RELEVANT_FLAGS if flag in present]
    except OSError:
        pass
    return []


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_key() -> str:
    import torch

    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(",".join(cpu_flags()).encode())
    return digest.hexdigest()[:12]


def build_dir() -> Path:
    if explicit := os.environ.get("FPBENCH_KERNEL_BUILD_DIR"):
        return Path(explicit) / build_key()
    cache = Path(os.environ.get("FPBENCH_CACHE_DIR", Path.home() / ".cache" / "fpbench"))
    return cache / "kernels" / build_key()


@lru_cache(maxsize=1)
def load(verbose: bool = False):
    """The compiled module (``KernelLinear``, ``LlamaStep``, ``lut_linear``, ``lut_dequantize``,
    ``stream_read_gbps``, ``best_isa``, ...)."""
    missing = [name for name in SOURCES + HEADERS if not (SOURCE_DIR / name).is_file()]
    if missing:
        raise FpbenchError(f"kernel sources {missing} not found in {SOURCE_DIR}; run from a source checkout")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise FpbenchError(f"no C++ compiler ({compiler!r}) found to build the kernels; install g++ "
                           "(e.g. apt-get install g++) or use --backend simulate")
    import torch.utils.cpp_extension as cpp_extension

    if not cpp_extension.is_ninja_available():
        raise FpbenchError("ninja is not installed; `pip install ninja` (a project dependency) to build the kernels")
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=f"fpbench_kernels_{build_key()}",
            sources=[str(SOURCE_DIR / name) for name in SOURCES],
            build_directory=str(folder),
            # -fopenmp: at::parallel_for is OpenMP in torch's CPU build (same libgomp).
            # No -march=native and no -ffast-math: ISAs are picked at run time, and
            # fast-math could flush subnormals. No contraction of a * b + c into one
            # fused rounding: the decode step repeats torch's elementwise roundings.
            extra_cflags=["-O3", "-fopenmp", "-fno-fast-math", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FpbenchError(f"building the kernels in {folder} failed ({first_line}); "
                           "rerun with `make kernels` to see the compiler output") from exc


def runnable_isas() -> list[str]:
    """The ISAs this CPU can run, widest first (``avx512bf16``, ``avx512vbmi``, ``avx512``, ``avx2``, ``scalar``)."""
    return list(ISAS[ISAS.index(load().best_isa()):])


def isa(requested: str | None = None) -> str:
    """The ISA to run, by name (avx512bf16, avx512vbmi, avx512, avx2, scalar): ``requested``, else
    ``$FPBENCH_KERNEL_ISA``, else (auto) the widest this CPU supports."""
    name = (requested or os.environ.get("FPBENCH_KERNEL_ISA") or "auto").lower()
    if name not in ISAS:
        raise FpbenchError(f"kernel ISA {name!r} is unknown; use one of {', '.join(ISAS)}")
    best = load().best_isa()
    if name == "auto":
        return best
    if ISAS.index(name) < ISAS.index(best):
        raise FpbenchError(f"this CPU cannot run the {name} kernels (best: {best}); use auto")
    return name


def main() -> None:
    """``python -m fpbench.kernels.build``: build now (``make kernels``) and say what was built."""
    module = load(verbose=True)
    print(f"built {module.__name__} in {build_dir()} ({cpu_name()}; flags {' '.join(cpu_flags())}; "
          f"best ISA {module.best_isa()})")


if __name__ == "__main__":
    main()
