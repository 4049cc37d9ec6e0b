"""Zero-shot family: local lm-eval configs, prompt layouts, scoring, exactness vs lm-eval."""

import json

import pytest
import torch

from fpbench.errors import FpbenchError
from fpbench.eval.task_options import ZeroShotOptions
from fpbench.eval.base import EvalOptions, available_tasks, get_task
from fpbench.eval.zeroshot import (DATA_DIR_PLACEHOLDER, LM_EVAL_TEMPLATE_DIR, choose_source, evaluate,
                                    lm_eval_include_dir, write_lm_eval_configs)

ZEROSHOT_TASKS = ["lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq"]


def read_jsonl(path, count):
    with open(path) as fh:
        return [json.loads(next(fh)) for _ in range(count)]


def test_every_zeroshot_task_is_declared_with_a_local_config():
    tasks = available_tasks()
    for name in ZEROSHOT_TASKS:
        assert tasks[name].family == "zeroshot"
        assert tasks[name].lm_eval["hub"] == name  # lm-eval's own task name
        local = tasks[name].lm_eval["local"]
        assert f"task: {local}\n" in (LM_EVAL_TEMPLATE_DIR / f"{local}.yaml").read_text()


def test_written_configs_point_at_existing_files(data_dir, tmp_path):
    written = write_lm_eval_configs(data_dir, tmp_path)
    assert (written / "utils.py").is_file()
    for name in ZEROSHOT_TASKS:
        text = (written / f"{name}_local.yaml").read_text()
        assert DATA_DIR_PLACEHOLDER not in text
        assert str(data_dir.resolve() / get_task(name).source.file) in text


@pytest.fixture(scope="module")
def local_lm_eval_tasks(data_dir):
    """Instantiated lm-eval tasks of the local configs (datasets read from data_dir)."""
    from lm_eval.tasks import TaskManager

    with lm_eval_include_dir(data_dir) as include:
        manager = TaskManager(include_path=str(include), include_defaults=False)
        yield manager.load([f"{name}_local" for name in ZEROSHOT_TASKS])["tasks"]


def first_doc(task):
    return task.test_docs()[0]


def test_local_prompts_rebuild_lm_eval_hub_layout(local_lm_eval_tasks, data_dir):
    """Each local config yields the prompt lm-eval's hub task builds from the original
    fields, recovered here independently from the llm-foundry / klosax layouts."""
    piqa = read_jsonl(data_dir / "piqa/piqa.jsonl", 1)[0]
    goal = piqa["query"].removeprefix("Question: ").removesuffix("\n")
    task = local_lm_eval_tasks["piqa_local"]
    doc = first_doc(task)
    assert task.doc_to_text(doc) == f"Question: {goal}\nAnswer:"  # lm-eval piqa.yaml
    assert task.doc_to_choice(doc) == piqa["choices"] and task.doc_to_target(doc) == piqa["gold"]

    for name in ("arc_easy", "arc_challenge"):
        row = read_jsonl(data_dir / f"{name}/{name}.jsonl", 1)[0]
        task = local_lm_eval_tasks[f"{name}_local"]
        question = row["query"].removeprefix("Question: ")
        assert task.doc_to_text(first_doc(task)) == f"Question: {question}\nAnswer:"
        assert task.doc_to_choice(first_doc(task)) == row["choices"]

    row = read_jsonl(data_dir / "boolq/boolq.jsonl", 1)[0]
    passage, question = row["query"].removeprefix("Passage: ").rsplit("\nQuestion: ", 1)
    task = local_lm_eval_tasks["boolq_local"]
    assert task.doc_to_text(first_doc(task)) == f"{passage}\nQuestion: {question}\nAnswer:"
    assert task.doc_to_choice(first_doc(task)) == ["no", "yes"]

    row = read_jsonl(data_dir / "lambada_openai/lambada_test.jsonl", 1)[0]
    task = local_lm_eval_tasks["lambada_openai_local"]
    context, last_word = row["text"].rsplit(" ", 1)
    assert task.doc_to_text(first_doc(task)) == context and task.doc_to_target(first_doc(task)) == " " + last_word

    # WinoGrande: partial scoring, the options are alternative contexts (multiple input).
    row = read_jsonl(data_dir / "winogrande/winogrande.jsonl", 1)[0]
    task = local_lm_eval_tasks["winogrande_local"]
    assert task.multiple_input == 2
    assert task.doc_to_text(first_doc(task)) == row["gold"]
    assert task.doc_to_choice(first_doc(task)) == row["context_options"]
    assert task.doc_to_target(first_doc(task)) == row["continuation"]

    task = local_lm_eval_tasks["hellaswag_local"]
    doc = first_doc(task)
    assert task.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. he"
    assert task.doc_to_target(doc) == 3 and len(task.doc_to_choice(doc)) == 4


def test_choose_source(monkeypatch, data_dir, tmp_path):
    task = get_task("piqa")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert choose_source(task, EvalOptions(data_dir=str(data_dir))) == ("local", "piqa_local")
    assert choose_source(task, EvalOptions(zeroshot=ZeroShotOptions(zeroshot_source="hub"))) == ("hub", "piqa")
    with pytest.raises(FpbenchError, match="--data-dir"):
        choose_source(task, EvalOptions(data_dir=str(tmp_path)))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert choose_source(task, EvalOptions(data_dir=str(data_dir))) == ("hub", "piqa")
    with pytest.raises(FpbenchError, match="zeroshot_source"):
        choose_source(task, EvalOptions(zeroshot=ZeroShotOptions(zeroshot_source="web")))


@torch.inference_mode()
def reference_choice_scores(model, tokenizer, context, choices):
    """Sum of log-probs of " " + choice after context, tokenized as lm-eval does
    (encode the whole string, the continuation is what follows the context's tokens)."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    scores = []
    for choice in choices:
        whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
        assert whole[:len(context_ids)] == context_ids
        logits = model(input_ids=torch.tensor([whole])).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        positions = range(len(context_ids) - 1, len(whole) - 1)
        scores.append(sum(logprobs[p, whole[p + 1]].item() for p in positions))
    return scores


def test_evaluate_matches_an_independent_scorer(tiny_loaded, data_dir):
    """acc and acc_norm of fpbench (through lm-eval) equal a brute-force scorer on a tiny model."""
    limit = 8
    metrics = {m.metric: m for m in evaluate(tiny_loaded, get_task("arc_easy"),
                                              EvalOptions(limit=limit, data_dir=str(data_dir), batch_size=4,
                                                          progress=False))}
    assert set(metrics) == {"acc", "acc_norm"}
    correct = correct_norm = 0
    for row in read_jsonl(data_dir / "arc_easy/arc_easy.jsonl", limit):
        scores = reference_choice_scores(tiny_loaded.model, tiny_loaded.tokenizer, row["query"] + "\nAnswer:",
                                         row["choices"])
        normed = [s / len(" " + c) for s, c in zip(scores, row["choices"])]  # lm-eval: per character
        correct += max(range(len(scores)), key=scores.__getitem__) == row["gold"]
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == row["gold"]
    assert metrics["acc"].value == correct / limit
    assert metrics["acc_norm"].value == correct_norm / limit
    details = metrics["acc"].details
    assert metrics["acc"].n == limit and details["task_source"] == "local" and details["lm_eval_task"] == "arc_easy_local"
    assert details["items_per_s"] > 0 and details["batch_size"] == 4 and details["stderr"] > 0


def test_lambada_reports_accuracy_and_perplexity(tiny_loaded, data_dir):
    metrics = {m.metric: m for m in evaluate(tiny_loaded, get_task("lambada_openai"),
                                              EvalOptions(limit=4, data_dir=str(data_dir), progress=False))}
    assert set(metrics) == {"acc", "perplexity"}
    assert 0 <= metrics["acc"].value <= 1 and metrics["acc"].n == 4
    # A random model with a 49k vocabulary: perplexity of the order of the vocabulary size.
    assert 1e3 < metrics["perplexity"].value < 1e6


def test_progress_off_keeps_lm_eval_scoring_bars_off(tiny_loaded, data_dir, capfd):
    for progress in (True, False):
        evaluate(tiny_loaded, get_task("boolq"), EvalOptions(limit=2, data_dir=str(data_dir), batch_size=2,
                                                            progress=progress))
        shown = "Running loglikelihood requests" in capfd.readouterr().err
        assert shown == progress


@pytest.mark.slow
def test_fpbench_accuracy_equals_lm_eval_on_default_model(data_dir, tmp_path):
    """The whole pipeline (load, fp32 'quantize', evaluate) gives exactly lm-eval's own
    numbers for the same model (loaded by lm-eval from disk), task config and limit."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fpbench.models import load_model
    from fpbench.runner import RunConfig, run
    from fpbench.quant.scheme import Scheme
    from fpbench.eval.zeroshot import DEFAULT_BATCH_SIZE

    limit = 20
    records = run(RunConfig(scheme=Scheme("fp32"), tasks=["piqa"], limit=limit, data_dir=str(data_dir),
                            out_dir=str(tmp_path), progress=False))
    ours = {r["metric"]: r["value"] for r in records}
    model_dir = load_model().model.name_or_path  # the safetensors copy fpbench caches
    with lm_eval_include_dir(data_dir) as include:
        reference = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_dir},dtype=float32,device=cpu", tasks=["piqa_local"],
            limit=limit, batch_size=DEFAULT_BATCH_SIZE, log_samples=False,
            task_manager=TaskManager(include_path=str(include), include_defaults=False))
    theirs = reference["results"]["piqa_local"]
    assert ours == {"acc": theirs["acc,none"], "acc_norm": theirs["acc_norm,none"]}


def test_missing_data_folder_is_one_error(tmp_path):
    with pytest.raises(FpbenchError, match="does not exist"):
        with lm_eval_include_dir(tmp_path / "nowhere"):
            pass
