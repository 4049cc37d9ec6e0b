"""The generation-throughput benchmark: both paths run on the same prompts and the
record's numbers are consistent with each other."""

from __future__ import annotations

import json

from fpbench.bench.generation import generation_summary, naive_generate, run_generation_bench
from fpbench.eval.generation import GenerationSettings, generate


def test_naive_loop_and_continuous_batching_give_the_same_greedy_answers(tiny_loaded):
    prompts = ["def add(a, b):", "Once upon a time", "x", "The quick brown fox jumps over", "import os"]
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    texts, tokens, seconds = naive_generate(tiny_loaded.model, tiny_loaded.tokenizer, prompts, settings,
                                            batch_size=3, progress=False)
    ours = generate(tiny_loaded.model, tiny_loaded.tokenizer, prompts, settings, progress=False)
    assert texts == [t[0] for t in ours.texts]
    assert tokens == ours.new_tokens == 8 * len(prompts) and seconds > 0


def test_generation_bench_record(tiny_loaded, tmp_path):
    record = run_generation_bench(tiny_loaded, problems=3, max_new_tokens=6, batch_size=2, out_dir=tmp_path,
                                  progress=False)
    assert record["problems"] == 3 and record["prompt_mode"] == "chat"
    assert record["speedup"] > 0 and record["naive_seconds"] > 0 and record["fpbench_seconds"] > 0
    assert 0 < record["fpbench_new_tokens"] <= 3 * 6 and 0 < record["naive_new_tokens"] <= 3 * 6
    assert 0 <= record["identical_answers"] <= 3
    steps = record["decode_step_ms"]
    assert set(steps) == {"1", "2", "4", "8", "16"}
    assert all(t["linear"] > 0 and t["few_row"] > 0 for t in steps.values())
    stored = [json.loads(line) for line in (tmp_path / "generation.jsonl").read_text().splitlines()]
    assert stored == [record]
    summary = generation_summary(record)
    assert "speed-up" in summary and f"1 rows {steps['1']['linear']:.1f} -> {steps['1']['few_row']:.1f} ms" in summary
