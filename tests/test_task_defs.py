"""Task declarations (typed, checked as they load), the one row loader, the artifact
writer, the prompt-mode choice, and the eval layer's independence from the runner."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fpbench.data import task_defs
from fpbench.data.sources import load_rows, load_texts
from fpbench.data.task_defs import TASK_DIR, HubSource, Source, available_tasks, get_task
from fpbench.errors import FpbenchError
from fpbench.eval.base import (FAMILIES, EvalOptions, artifact_path, choose_prompt_mode, quiet_libraries,
                               write_artifact)


def test_every_shipped_declaration_loads_typed_and_frozen():
    tasks = available_tasks()
    assert set(tasks) == {yaml.safe_load(p.read_text())["name"] for p in TASK_DIR.glob("*.yaml")}
    assert {t.family for t in tasks.values()} == set(task_defs.FAMILY_KEYS) == set(FAMILIES) | {"latency"}
    wikitext = tasks["wikitext2"]
    assert wikitext.source.file == "wikitext2/wiki.test.raw" and wikitext.join == "\n\n"
    assert wikitext.calibration.hub == HubSource("wikitext", "validation", "wikitext-2-raw-v1", "text")
    assert tasks["ptb"].join == " "
    mbpp = tasks["mbpp"]
    assert mbpp.task_ids == (11, 510) and mbpp.completion_stop[0] == "```" and mbpp.timeout_s == 10.0
    cnn = tasks["cnn_dailymail"]
    assert dict(cnn.source.record_fields) == {"document": "article", "reference": "reference", "id": "idx"}
    assert (cnn.sentences, cnn.max_input_tokens, cnn.max_new_tokens, cnn.batch_size) == (3, 1024, 128, 8)
    assert dict(tasks["piqa"].lm_eval) == {"hub": "piqa", "local": "piqa_local"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        wikitext.join = " "
    with pytest.raises(TypeError):
        cnn.fields["document"] = "x"


def _declare(tmp_path, monkeypatch, text: str) -> Path:
    monkeypatch.setattr(task_defs, "TASK_DIR", tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, problem", [
    ("name: t\nfamily: perplexity\nsource: {local: {file: a.txt}}\njoint: ' '\n", "unknown key 'joint'"),
    ("name: t\nfamily: perplexity\n", "missing required key 'source'"),
    ("family: perplexity\nsource: {local: {file: a.txt}}\n", "missing required key 'name'"),
    ("name: t\nsource: {local: {file: a.txt}}\n", "missing required key 'family'"),
    ("name: t\nfamily: perplexty\nsource: {local: {file: a.txt}}\n", "key 'family' is 'perplexty'"),
    ("name: t\nfamily: perplexity\nsource: {local: {fil: a.txt}}\n", "source.local: unknown key 'fil'"),
    ("name: t\nfamily: perplexity\nsource: {hub: {path: x}}\n", "source.hub: missing required key 'split'"),
    ("name: t\nfamily: codegen\ndataset: apps\n", "key 'dataset' is 'apps'"),
    ("name: t\nfamily: codegen\ndataset: mbpp\n", "missing required key 'source'"),
    ("name: t\nfamily: summarization\nsource: {local: {file: a.jsonl}}\nsentences: three\n",
     "key 'sentences' must be int"),
    ("name: t\nfamily: zeroshot\nsource: {local: {file: a.jsonl}}\nlm_eval: {hub: piqa}\n", "'hub' and 'local'"),
    ("name: t\nfamily: perplexity\nsource: [a\n", "not valid YAML"),
])
def test_a_bad_declaration_is_one_line_naming_file_and_key(tmp_path, monkeypatch, text, problem):
    path = _declare(tmp_path, monkeypatch, text)
    with pytest.raises(FpbenchError) as info:
        get_task("t")
    message = str(info.value)
    assert str(path) in message and problem in message and "\n" not in message


def test_families_defined_outside_the_package_keep_their_own_keys(tmp_path, monkeypatch):
    monkeypatch.setitem(task_defs.EXTERNAL_FAMILIES, "toy", {"offset": True})
    _declare(tmp_path, monkeypatch, "name: t\nfamily: toy\noffset: 2.5\nheadline: score\n")
    task = get_task("t")
    assert task.params["offset"] == 2.5 and task.headline == "score"
    with pytest.raises(FpbenchError, match="built in"):
        task_defs.register_family("codegen", {})


def test_row_loader_reads_local_text_and_records(tmp_path):
    (tmp_path / "t.txt").write_text("first\r\n\r\nsecond\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"a": 1}) + "\n\n" + json.dumps({"a": 2}) + "\n")
    rows = load_rows(Source(file="t.txt"), "toy", tmp_path)
    assert rows.items == ["first", "second"] and rows.local
    assert load_rows(Source(file="r.jsonl"), "toy", tmp_path).items == [{"a": 1}, {"a": 2}]
    with pytest.raises(FpbenchError, match="holds records, not text lines"):
        load_texts(Source(file="r.jsonl"), "toy", tmp_path)


@pytest.mark.parametrize("source, reason", [
    (Source(file="toy/t.txt", hub=HubSource("toy", "test")), "offline"),
    (Source(file="toy/t.txt"), "no hub source is defined"),
])
def test_missing_data_names_dataset_file_and_both_fixes(tmp_path, monkeypatch, source, reason):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FpbenchError) as info:
        load_rows(source, "toy", tmp_path)
    message = str(info.value)
    assert "'toy'" in message and reason in message and str(tmp_path / "toy/t.txt") in message
    assert "--data-dir" in message and "FPBENCH_DATA_DIR" in message and "\n" not in message


def test_artifacts_are_one_file_per_task_scheme_and_run(tmp_path):
    options = EvalOptions(out_dir=str(tmp_path), scheme="int4/g128/rtn", run_key="abc")
    path = write_artifact(options, "mbpp", ".samples.jsonl", [{"x": 1}, {"x": "é"}])
    assert path == tmp_path / "generations" / "mbpp__int4_g128_rtn__abc.samples.jsonl"
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [{"x": 1}, {"x": "é"}]
    assert artifact_path(EvalOptions(), "xsum", ".s.jsonl") == Path("generations/xsum__run.s.jsonl")


def test_prompt_mode_follows_the_chat_template():
    class Plain:
        chat_template = None

    class Chat:
        chat_template = "{{ messages }}"

    assert choose_prompt_mode(Plain()) == "completion" and choose_prompt_mode(Chat(), None) == "chat"
    assert choose_prompt_mode(Chat(), "completion") == "completion"
    with pytest.raises(FpbenchError, match="prompt mode 'fancy' is unknown; use one of auto, completion, chat"):
        choose_prompt_mode(Chat(), "fancy")


def test_batch_size_has_one_home():
    assert EvalOptions(batch_size=4).batch_size == 4
    assert EvalOptions().batch_size is None


def test_quiet_libraries_silences_info_logs_and_bars():
    import datasets
    import huggingface_hub.utils
    import transformers

    saved = {name: logging.getLogger(name).level for name in ("transformers", "datasets", "lm_eval")}
    try:
        quiet_libraries()
        assert transformers.utils.logging.get_verbosity() == logging.WARNING
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled()
        assert huggingface_hub.utils.are_progress_bars_disabled()
        assert logging.getLogger("lm_eval").getEffectiveLevel() == logging.WARNING
    finally:
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
        huggingface_hub.utils.enable_progress_bars()
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def test_eval_layer_does_not_import_the_runner():
    code = ("import sys, fpbench.eval.lm_eval_model, fpbench.eval.codegen, fpbench.eval.summarization, "
            "fpbench.eval.perplexity, fpbench.eval.zeroshot; print('fpbench.runner' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
