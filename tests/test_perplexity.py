import math

import pytest
import torch

from fpbench.errors import FpbenchError
from fpbench.eval.base import EvalOptions, available_tasks, evaluate_task, get_task
from fpbench.eval.perplexity import token_stream


def test_task_registry_lists_declared_tasks():
    tasks = available_tasks()
    assert {"wikitext2", "ptb"} <= set(tasks)
    with pytest.raises(FpbenchError, match="unknown task 'wikitext3'"):
        get_task("wikitext3")


@pytest.mark.parametrize("task_name", ["wikitext2", "ptb"])
def test_perplexity_equals_mean_window_loss(tiny_loaded, data_dir, task_name):
    task = get_task(task_name)
    options = EvalOptions(limit=3, seqlen=64, data_dir=str(data_dir), progress=False)
    [metric] = evaluate_task(tiny_loaded, task, options)
    # Independent reference: the model's own loss (mean over each window's 63 predictions).
    ids = token_stream(tiny_loaded, task, data_dir)
    losses = []
    with torch.no_grad():
        for i in range(3):
            window = ids[i * 64:(i + 1) * 64].unsqueeze(0)
            losses.append(tiny_loaded.model(input_ids=window, labels=window).loss.item())
    assert metric.n == 3 and metric.metric == "perplexity"
    assert metric.value == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    assert metric.value > 1000  # a random model is near-uniform over ~49k tokens


def test_wikitext2_local_text_is_the_test_split(tiny_loaded, data_dir):
    ids = token_stream(tiny_loaded, get_task("wikitext2"), data_dir)
    text = tiny_loaded.tokenizer.decode(ids[:20])
    assert "Robert Boulter" in text
    assert 250_000 < ids.numel() < 400_000


def test_missing_data_offline_is_one_clear_line(tiny_loaded, monkeypatch, tmp_path):
    monkeypatch.delenv("FPBENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FpbenchError) as info:
        evaluate_task(tiny_loaded, get_task("ptb"), EvalOptions(limit=1, seqlen=32, data_dir=str(tmp_path)))
    message = str(info.value)
    assert "'ptb'" in message and "--data-dir" in message and "FPBENCH_DATA_DIR" in message
    assert "ptb/ptb.test.txt" in message and "\n" not in message
