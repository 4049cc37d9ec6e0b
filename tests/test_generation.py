"""Batched generation: same tokens as transformers' generate, per-row stopping, seeding."""

from __future__ import annotations

import torch

from fpbench.generation import GenerationSettings, cut_at_stop, decode_shrinking, generate

PROMPTS = ["def add(a, b):", "Once upon a time, in a land far away, there lived",
           "x", "The quick brown fox jumps over the lazy dog and then"]


def _left_padded(tokenizer, prompts):
    ids = [tokenizer(p).input_ids for p in prompts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return input_ids, mask


def test_greedy_matches_transformers_generate(tiny_loaded):
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    input_ids, mask = _left_padded(tokenizer, PROMPTS)
    ours = decode_shrinking(model, tokenizer, input_ids, mask, GenerationSettings(max_new_tokens=12), set())
    reference = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    assert ours == reference[:, input_ids.shape[1]:].tolist()


def test_finished_rows_leave_the_batch_without_changing_the_others(tiny_loaded):
    """Rows that stop early (a token declared EOS) must not change what the remaining rows
    generate after they leave the batch and the KV cache."""
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    input_ids, mask = _left_padded(tokenizer, PROMPTS)
    full = decode_shrinking(model, tokenizer, input_ids, mask, GenerationSettings(max_new_tokens=10), set())
    # A token some rows generate and others never do: those rows end early, the rest run on.
    stopper = next(t for row in full for t in row if any(t not in other for other in full))
    shrunk = decode_shrinking(model, tokenizer, input_ids, mask, GenerationSettings(max_new_tokens=10), {stopper})
    for row_full, row_shrunk in zip(full, shrunk):
        cut = row_full.index(stopper) + 1 if stopper in row_full else len(row_full)
        assert row_shrunk == row_full[:cut]
    assert min(map(len, shrunk)) < 10 and max(map(len, shrunk)) == 10


def test_generate_sorts_stops_and_seeds(tiny_loaded):
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    greedy = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=6, batch_size=3),
                      progress=False)
    one_by_one = [generate(model, tokenizer, [p], GenerationSettings(max_new_tokens=6), progress=False).texts[0]
                  for p in PROMPTS]
    assert greedy.texts == one_by_one  # batching and sorting do not change greedy answers
    assert greedy.new_tokens == 6 * len(PROMPTS)
    sampled = [generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=6, temperature=1.0,
                                                                      num_samples=2, seed=7),
                        progress=False).texts for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same samples
    assert all(len(samples) == 2 for samples in sampled[0])


def test_cut_at_stop():
    assert cut_at_stop("    return 1\ndef other():", ("\ndef ", "\n#")) == "    return 1"
    assert cut_at_stop("text\n```python\nx = 1\n```\nmore ```", (), fences=2) == "text\n```python\nx = 1\n```"
    assert cut_at_stop("no stop", ("\ndef ",)) == "no stop"
