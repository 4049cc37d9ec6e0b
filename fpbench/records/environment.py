"""Where and when a number was measured: versions, git revision, CPU, threads, UTC time.

Every record writer (runner, analyze, bench) takes its environment fields and timestamp
from here, so a report can compare rows field by field. The CPU's name and SIMD flags
come from ``fpbench.kernels.build``, which needs the flags for its build key: records
sit above kernels, so the import goes this way only.
"""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from fpbench import __version__

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def utc_now() -> str:
    """The current UTC time to the second, ISO 8601 (``2026-01-31T12:00:00+00:00``):
    strings of this form sort in time order, which the report relies on."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def checkout_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` holding ``.git`` (a folder, or the file a
    worktree has), else None: an installed package is not inside a checkout."""
    for folder in (start, *start.parents):
        if (folder / ".git").exists():
            return folder
    return None


def git_revision(start: Path | None = None) -> str | None:
    """Short commit hash of the checkout holding ``start`` (default: this package); None
    outside a checkout, without git, or when git fails. git's own messages (``fatal: not a
    git repository``) go to DEVNULL: a run's output is the run's, not git's."""
    root = checkout_root(PACKAGE_DIR if start is None else start)
    if root is None:
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _version(distribution: str) -> str | None:
    # Installed metadata, not an import: the kernel benchmark should not pay for importing
    # transformers just to name its version.
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def environment() -> dict:
    """Versions, git revision, CPU name and SIMD flags, torch threads: what a reader needs
    to trust or rerun a number. Flat fields, shared by every record kind."""
    import torch

    from fpbench.kernels.build import cpu_flags, cpu_name

    return {
        "fpbench_version": __version__, "torch_version": torch.__version__,
        "transformers_version": _version("transformers"), "python_version": platform.python_version(),
        "git_rev": git_revision(), "cpu": cpu_name(), "cpu_flags": " ".join(cpu_flags()),
        "threads": torch.get_num_threads(),
    }
