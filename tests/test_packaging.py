"""A non-editable install works: the wheel carries the task declarations and the kernel
sources, and the installed package runs `fpbench run`, `--backend kernel` included,
from outside the source tree."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(REPO)], check=True, timeout=600, cwd=out)
    return next(out.glob("fpbench-*.whl"))


def test_wheel_ships_task_declarations_and_kernel_sources(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tasks = {Path(n).name for n in names if n.startswith("fpbench/data/tasks/")}
    assert {"wikitext2.yaml", "humaneval.yaml", "latency.yaml", "piqa_local.yaml", "utils.py"} <= tasks
    assert any(n.startswith("fpbench/kernels/cpp/") and n.endswith(".cpp") for n in names)


@pytest.mark.slow
def test_installed_package_runs_with_the_kernel_backend(wheel, tmp_path, tiny_model_dir, data_dir):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, timeout=600)
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    probe = subprocess.run([sys.executable, "-c", "import fpbench; print(fpbench.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip().startswith(str(site))  # the installed copy, not the source tree
    result = subprocess.run(
        [sys.executable, "-m", "fpbench.cli", "run", "--model", str(tiny_model_dir), "--format", "fp6",
         "--backend", "kernel", "--task", "wikitext2", "--limit", "1", "--seqlen", "32",
         "--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "out" / "results.jsonl").read_text()
    assert '"backend": "kernel"' in text and '"task": "latency"' in text
