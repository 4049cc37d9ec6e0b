"""Generation throughput: fpbench's continuous batching against a plain loop of
``model.generate``, both on the same HumanEval chat prompts, in one run.

The naive loop is what a user would write first: prompts in their order, batches of 8,
left padding, greedy ``model.generate`` until every row of the batch has closed its code
fence (the same per-row stop rule fpbench uses) or hit the token limit. Both paths use
the same model in its own precision (fp32 for the default model), the same prompts and
the same ``max_new_tokens``; the record holds both wall times, their ratio, the tokens
each produced and how many answers agree (greedy decoding in different batch shapes can
diverge where two logits are within fp32 rounding).

The record also holds the time of one decode step at 1-16 rows with torch's ``linear``
and with :class:`~fpbench.eval.generation.FewRowLinear`, the form fpbench uses for the few-row
steps at the tail of a run.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteriaList

from fpbench.eval.generation import (DEFAULT_BATCH_SIZE, GenerationSettings, SlotCache, StopPerSequence, cache_keyword,
                                     count_new_tokens, cut_at_stop, eos_ids, few_row_linears, generate)
from fpbench.records.environment import environment, utc_now
from fpbench.records.schema import GENERATION_BENCH
from fpbench.records.store import append_jsonl

NAIVE_BATCH = 8
STEP_ROWS = (16, 8, 4, 2, 1)  # decode-step timings, largest first (rows are dropped from one cache)
STEP_CONTEXT = 512  # cached tokens per row for those timings


@torch.inference_mode()
def naive_generate(model, tokenizer, prompts: list[str], settings: GenerationSettings,
                   batch_size: int = NAIVE_BATCH, progress: bool = True) -> tuple[list[str], int, float]:
    """(texts, generated tokens, seconds) of ``model.generate`` over batches in prompt order."""
    end_ids = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(end_ids), 0)
    end_ids.add(pad_id)
    texts, tokens = [], 0
    start = time.perf_counter()
    for first in tqdm(range(0, len(prompts), batch_size), desc="naive generate", disable=not progress, leave=False):
        encoded = tokenizer(prompts[first:first + batch_size], add_special_tokens=False, padding=True,
                            padding_side="left", return_tensors="pt")
        width = encoded.input_ids.shape[1]
        stop = StopPerSequence(tokenizer, width, settings.stop, settings.stop_after_fences)
        out = model.generate(**encoded, max_new_tokens=settings.max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, stopping_criteria=StoppingCriteriaList([stop]))
        generated = out[:, width:]
        tokens += count_new_tokens(generated, end_ids)
        texts += [cut_at_stop(t, settings.stop, settings.stop_after_fences)
                  for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return texts, tokens, time.perf_counter() - start


@torch.inference_mode()
def decode_step_ms(model, rows: tuple[int, ...] = STEP_ROWS, context: int = STEP_CONTEXT,
                   repeats: int = 9) -> dict[str, dict[str, float]]:
    """Median milliseconds of one greedy decode step over a ``context``-token cache, per
    row count: {rows: {"linear": ms, "few_row": ms}}. The two forms alternate step by step
    on the same cache, so both see the same machine state and cache lengths."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (max(rows), context), generator=generator)
    cache, keyword = SlotCache(), cache_keyword(model)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), **{keyword: cache}, use_cache=True, logits_to_keep=1)
    length, result = context, {}
    for n in sorted(rows, reverse=True):
        cache.batch_select_indices(torch.arange(n))
        times = {"linear": [], "few_row": []}
        for _ in range(repeats):
            for form, seconds in times.items():
                with few_row_linears(model) if form == "few_row" else nullcontext():
                    start = time.perf_counter()
                    model(input_ids=ids[:n, -1:], attention_mask=torch.ones(n, length + 1, dtype=torch.long),
                          position_ids=torch.full((n, 1), length), **{keyword: cache}, use_cache=True)
                    seconds.append(time.perf_counter() - start)
                length += 1
        result[str(n)] = {form: round(1e3 * statistics.median(t), 2) for form, t in times.items()}
    return result


def run_generation_bench(loaded, problems: int | None = None, max_new_tokens: int = 512,
                         batch_size: int = DEFAULT_BATCH_SIZE, out_dir: str | Path | None = None,
                         progress: bool = True) -> dict:
    """Time both paths on the first ``problems`` HumanEval problems (chat mode); write the
    record to ``out_dir/generation.jsonl`` when given and return it."""
    from fpbench.eval.codegen import COMPLETION_STOP, build_prompt, choose_prompt_mode, humaneval_problems

    chosen = humaneval_problems()[:problems]
    mode = choose_prompt_mode(loaded.tokenizer)
    prompts = [build_prompt(p, mode, loaded.tokenizer) for p in chosen]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  stop_after_fences=2 if mode == "chat" else 0,
                                  stop=() if mode == "chat" else COMPLETION_STOP,
                                  add_special_tokens=mode == "completion")
    naive_texts, naive_tokens, naive_s = naive_generate(loaded.model, loaded.tokenizer, prompts, settings,
                                                        progress=progress)
    ours = generate(loaded.model, loaded.tokenizer, prompts, settings, progress=progress, desc="fpbench generate")
    same = sum(a == b[0] for a, b in zip(naive_texts, ours.texts))
    steps = decode_step_ms(loaded.model)
    record = {
        "bench": "generation", "model": loaded.name, "task": "humaneval", "prompt_mode": mode,
        "problems": len(prompts), "max_new_tokens": max_new_tokens,
        "naive_batch_size": NAIVE_BATCH, "batch_size": batch_size,
        "naive_seconds": round(naive_s, 2), "fpbench_seconds": round(ours.seconds, 2),
        "speedup": round(naive_s / ours.seconds, 3),
        "naive_new_tokens": naive_tokens, "fpbench_new_tokens": ours.new_tokens,
        "naive_tokens_per_s": round(naive_tokens / naive_s, 2), "fpbench_tokens_per_s": round(ours.tokens_per_s, 2),
        "identical_answers": same,
        "decode_step_ms": steps, "decode_step_context": STEP_CONTEXT,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "time": utc_now(),
        "environment": environment(),
    }
    if out_dir is not None:
        append_jsonl(Path(out_dir) / "generation.jsonl", [record], GENERATION_BENCH.name)
    return record


def generation_summary(r: dict) -> str:
    return (f"HumanEval, {r['problems']} problems, {r['prompt_mode']} mode, greedy, max {r['max_new_tokens']} new tokens, "
            f"{r['model']} in {r['dtype']}\n"
            f"  naive model.generate, batch {r['naive_batch_size']}: {r['naive_seconds']:.1f} s, "
            f"{r['naive_new_tokens']} tokens ({r['naive_tokens_per_s']:.1f} tokens/s)\n"
            f"  fpbench continuous batching, {r['batch_size']} rows: {r['fpbench_seconds']:.1f} s, "
            f"{r['fpbench_new_tokens']} tokens ({r['fpbench_tokens_per_s']:.1f} tokens/s)\n"
            f"  speed-up {r['speedup']:.2f}x; identical answers {r['identical_answers']}/{r['problems']}\n"
            f"  one decode step ({r['decode_step_context']}-token cache), torch linear -> FewRowLinear: "
            + ", ".join(f"{n} rows {t['linear']:.1f} -> {t['few_row']:.1f} ms"
                        for n, t in sorted(r["decode_step_ms"].items(), key=lambda kv: int(kv[0]))))
