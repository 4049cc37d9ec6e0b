"""Calibration data: random token windows from a named source or a file.

GPTQ (and static activation scales) fit their parameters to a small sample of text; which
text matters, because a quantizer fitted to one domain may not help another. Sources:

- ``wikitext2``, ``ptb``: the *validation* split named by the ``calibration:`` entry of
  ``fpbench/data/tasks/wikitext2.yaml`` / ``ptb.yaml`` (a local copy under ``--data-dir`` /
  ``FPBENCH_DATA_DIR`` first, else the hub). The test split, which is scored, is never
  used for calibration.
- ``c4``: the first shard of the English C4 training set (``allenai/c4``, as in the GPTQ
  paper's calibration); hub only, so offline it is an error that says how to supply text.
- ``code``: the ``*.py`` files at the top level of the running interpreter's standard
  library (``sysconfig.get_paths()["stdlib"]``, sorted by name, about 4.7 MB for
  CPython 3.11), a code corpus every machine has offline.
- a path to a ``.txt`` file (used as is) or a ``.jsonl`` file (the ``text`` field of each
  line).

The text of a source is joined, tokenized once, and ``n_samples`` windows of ``seqlen``
tokens start at random offsets drawn from a seeded generator (the GPTQ reference code
does the same for WikiText-2 and PTB), so windows may overlap.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from fpbench.data.sources import hub_offline, load_texts
from fpbench.errors import FpbenchError
from fpbench.data.task_defs import get_task

DEFAULT_CALIB_SAMPLES = 128
DEFAULT_CALIB_SEQLEN = 2048
TASK_SOURCES = ("wikitext2", "ptb")  # calibration text declared in the task YAML
CALIB_SOURCES = (*TASK_SOURCES, "c4", "code")
# C4 as the GPTQ paper samples it: documents of the first English training shard.
C4_HUB = {"path": "allenai/c4", "data_files": "en/c4-train.00000-of-01024.json.gz", "field": "text"}
CODE_GLOB = "*.py"


def code_corpus_files() -> list[Path]:
    """The ``code`` source: top-level standard-library modules, sorted (deterministic)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob(CODE_GLOB))


def _code_texts() -> tuple[list[str], str]:
    files = code_corpus_files()
    if not files:
        raise FpbenchError(
            f"calibration source 'code': no {CODE_GLOB} files in {sysconfig.get_paths()['stdlib']}; "
            "pass --calib PATH.txt with your own code text instead"
        )
    return [f.read_text(encoding="utf-8", errors="replace") for f in files], "\n\n"


def _task_texts(source: str, data_dir) -> tuple[list[str], str]:
    # The validation-split location lives in one place: the task file, next to the scored split.
    task = get_task(source)
    if task.calibration is None:
        raise FpbenchError(f"task {source!r} declares no calibration split; use --calib code or a file")
    return load_texts(task.calibration, f"{source} (validation, calibration)", data_dir), task.join


def _c4_texts(n_tokens_wanted: int, tokenizer, seed: int) -> tuple[list[str], str]:
    check_source("c4")
    fix = "pass --calib wikitext2, ptb, code or a .txt/.jsonl file instead"
    try:
        import datasets

        docs = datasets.load_dataset(C4_HUB["path"], data_files=C4_HUB["data_files"], split="train")
    except Exception as exc:  # network or hub errors: one user-facing problem
        raise FpbenchError(f"calibration source 'c4' failed to load ({str(exc).splitlines()[0]}); {fix}") from exc
    # Random documents (seeded) until there are enough tokens, instead of the whole shard.
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    texts, total = [], 0
    for index in order:
        text = docs[index][C4_HUB["field"]]
        texts.append(text)
        total += len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
        if total >= n_tokens_wanted:
            break
    return texts, "\n\n"


def _file_texts(path: Path) -> tuple[list[str], str]:
    if not path.is_file():
        raise FpbenchError(
            f"calibration file {path} not found; pass --calib with one of {', '.join(CALIB_SOURCES)} "
            "or an existing .txt/.jsonl file"
        )
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise FpbenchError(f"{path} line {number}: expected a JSON object with a string 'text' field")
                texts.append(row["text"])
        return texts, "\n\n"
    return [path.read_text(encoding="utf-8")], ""


def calibration_texts(source: str, data_dir=None) -> tuple[list[str], str]:
    """Text items of a (non-C4) source and the string that joins them."""
    if source in TASK_SOURCES:
        return _task_texts(source, data_dir)
    if source == "code":
        return _code_texts()
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        return _file_texts(path)
    raise FpbenchError(
        f"unknown calibration source {source!r}; use one of {', '.join(CALIB_SOURCES)} "
        "or a path to a .txt or .jsonl (field 'text') file"
    )


def check_source(source: str, data_dir=None) -> None:
    """Fail fast, before a model loads, when a source cannot be read (FpbenchError)."""
    if source == "c4":
        if hub_offline():
            raise FpbenchError("calibration source 'c4' needs the Hugging Face hub, which is offline; "
                               "pass --calib wikitext2, ptb, code or a .txt/.jsonl file instead")
        return
    calibration_texts(source, data_dir)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """One long token sequence (verbose=False: longer than the model limit on purpose)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, source: str, n_samples: int = DEFAULT_CALIB_SAMPLES,
                        seqlen: int = DEFAULT_CALIB_SEQLEN, seed: int = 0, data_dir=None,
                        max_length: int | None = None) -> torch.LongTensor:
    """``n_samples`` random windows of ``seqlen`` tokens, [n_samples, seqlen].

    ``seqlen`` is lowered to ``max_length`` (the model's context) when that is smaller.
    """
    if n_samples < 1 or seqlen < 2:
        raise FpbenchError(f"calibration needs n_samples >= 1 and seqlen >= 2 (got {n_samples}, {seqlen})")
    if max_length:
        seqlen = min(seqlen, int(max_length))
    if source == "c4":
        texts, join = _c4_texts(n_samples * seqlen, tokenizer, seed)
    else:
        texts, join = calibration_texts(source, data_dir)
    ids = tokenize_stream(tokenizer, join.join(texts))
    if ids.numel() < seqlen:
        raise FpbenchError(
            f"calibration source {source!r} has only {ids.numel()} tokens, fewer than one window "
            f"of {seqlen}; lower --calib-seqlen or supply more text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=generator)
    return torch.stack([ids[start:start + seqlen] for start in starts.tolist()])


@dataclass(frozen=True)
class CalibrationSource:
    """Where a run's calibration text comes from (a source name or a file path), with the
    run's seed and data folder: what quantization needs to know of the run."""

    source: str
    seed: int = 0
    data_dir: str | None = None

    def windows(self, tokenizer, n_samples: int, seqlen: int, max_length: int | None = None) -> torch.LongTensor:
        return calibration_windows(tokenizer, self.source, n_samples, seqlen, self.seed, self.data_dir, max_length)
