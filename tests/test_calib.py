"""Calibration windows: shapes, seeding, where the text comes from, and the errors.

A byte-level tokenizer (token = UTF-8 byte) makes "this window is a slice of that text"
an exact check, independent of any real tokenizer."""

from __future__ import annotations

import json
import sysconfig
from types import SimpleNamespace

import pytest
import torch

from fpbench.quant.calibration import (
    DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQLEN, calibration_windows, check_source, code_corpus_files,
)
from fpbench.errors import FpbenchError


class ByteTokenizer:
    def __call__(self, text, add_special_tokens=False, verbose=True):
        return SimpleNamespace(input_ids=list(text.encode("utf-8")))


def _is_slice(window: torch.Tensor, haystack: bytes) -> bool:
    return bytes(window.tolist()) in haystack


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("".join(f"line {i} of some calibration text.\n" for i in range(400)), encoding="utf-8")
    return path


def test_defaults_are_the_papers():
    assert (DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQLEN) == (128, 2048)


def test_windows_are_seeded_random_slices(text_file):
    tok = ByteTokenizer()
    windows = calibration_windows(tok, str(text_file), n_samples=16, seqlen=64, seed=0)
    assert windows.shape == (16, 64) and windows.dtype == torch.long
    raw = text_file.read_bytes()
    assert all(_is_slice(w, raw) for w in windows)
    assert torch.equal(windows, calibration_windows(tok, str(text_file), 16, 64, seed=0))
    assert not torch.equal(windows, calibration_windows(tok, str(text_file), 16, 64, seed=1))
    assert len({tuple(w.tolist()) for w in windows}) > 1  # random offsets, not one window


def test_seqlen_is_lowered_to_the_model_limit(text_file):
    windows = calibration_windows(ByteTokenizer(), str(text_file), n_samples=3, seqlen=2048, max_length=100)
    assert windows.shape == (3, 100)


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "calib.jsonl"
    rows = [{"text": f"document {i} " * 20, "other": i} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    windows = calibration_windows(ByteTokenizer(), str(path), n_samples=8, seqlen=50)
    joined = "\n\n".join(r["text"] for r in rows).encode()
    assert all(_is_slice(w, joined) for w in windows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "no text field"}) + "\n")
    with pytest.raises(FpbenchError, match="'text' field"):
        calibration_windows(ByteTokenizer(), str(bad), 1, 4)


@pytest.mark.parametrize("source,message", [
    ("/no/such/file.txt", "not found"),
    ("nonsense", "unknown calibration source"),
])
def test_bad_sources_are_one_error(source, message):
    with pytest.raises(FpbenchError, match=message):
        calibration_windows(ByteTokenizer(), source, 2, 8)


def test_too_little_text_is_an_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(FpbenchError, match="fewer than one window"):
        calibration_windows(ByteTokenizer(), str(path), 2, 64)


def test_c4_offline_is_an_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FpbenchError, match="c4.*offline"):
        calibration_windows(ByteTokenizer(), "c4", 2, 8)
    with pytest.raises(FpbenchError, match="c4"):
        check_source("c4")


def test_task_source_offline_without_data_is_an_error(monkeypatch):
    monkeypatch.delenv("FPBENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FpbenchError, match="wiki.valid.tokens"):
        check_source("wikitext2")


def test_code_corpus_is_the_standard_library():
    files = code_corpus_files()
    stdlib = sysconfig.get_paths()["stdlib"]
    names = {f.name for f in files}
    assert {"os.py", "abc.py", "random.py"} <= names
    assert all(str(f).startswith(stdlib) and f.suffix == ".py" for f in files)
    windows = calibration_windows(ByteTokenizer(), "code", n_samples=4, seqlen=256, seed=3)
    corpus = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files).encode()
    assert all(_is_slice(w, corpus) for w in windows)


@pytest.mark.parametrize("task,valid,test", [
    ("wikitext2", "wikitext2/wiki.valid.tokens", "wikitext2/wiki.test.raw"),
    ("ptb", "ptb/ptb.valid.txt", "ptb/ptb.test.txt"),
])
def test_task_sources_use_the_validation_split(data_dir, task, valid, test):
    """Windows are slices of the validation text and never of the scored test text."""
    from fpbench.data.sources import read_lines
    from fpbench.eval.base import get_task

    join = get_task(task).join
    valid_text = join.join(read_lines(data_dir / valid)).encode()
    test_text = join.join(read_lines(data_dir / test)).encode()
    windows = calibration_windows(ByteTokenizer(), task, n_samples=8, seqlen=200, data_dir=data_dir)
    assert all(_is_slice(w, valid_text) for w in windows)
    assert not any(_is_slice(w, test_text) for w in windows)
