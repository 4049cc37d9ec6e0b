"""Batched generation: same tokens as transformers' generate, per-row stopping, seeding."""

from __future__ import annotations

import torch

from fpbench.generation import GenerationSettings, cut_at_stop, decode_batched, generate

PROMPTS = ["def add(a, b):", "Once upon a time, in a land far away, there lived",
           "x", "The quick brown fox jumps over the lazy dog and then"]


def _ids(tokenizer, prompts=PROMPTS):
    return [tokenizer(p).input_ids for p in prompts]


def _left_padded(tokenizer, prompts):
    ids = _ids(tokenizer, prompts)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return input_ids, mask


def _decode(loaded, end_ids, max_new_tokens, batch_size=16, refill_at=None):
    return decode_batched(loaded.model, loaded.tokenizer, _ids(loaded.tokenizer),
                          GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size), end_ids,
                          pad_id=loaded.tokenizer.pad_token_id, refill_at=refill_at)


def test_greedy_matches_transformers_generate(tiny_loaded):
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    input_ids, mask = _left_padded(tokenizer, PROMPTS)
    ours = _decode(tiny_loaded, set(), 12)
    reference = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    assert ours == reference[:, input_ids.shape[1]:].tolist()


def test_finished_rows_leave_the_batch_without_changing_the_others(tiny_loaded):
    """Rows that stop early (a token declared EOS) must not change what the remaining rows
    generate after they leave the batch and the KV cache."""
    full = _decode(tiny_loaded, set(), 10)
    # A token some rows generate and others never do: those rows end early, the rest run on.
    stopper = next(t for row in full for t in row if any(t not in other for other in full))
    shrunk = _decode(tiny_loaded, {stopper}, 10)
    for row_full, row_shrunk in zip(full, shrunk):
        cut = row_full.index(stopper) + 1 if stopper in row_full else len(row_full)
        assert row_shrunk == row_full[:cut]
    assert min(map(len, shrunk)) < 10 and max(map(len, shrunk)) == 10


def test_rows_joining_mid_flight_generate_what_they_generate_alone(tiny_loaded):
    """Continuous batching: with 2 places and 4 prompts, rows that end early free their
    place for the next prompt, which joins left-padded beside a row already decoding. Every
    row must generate exactly what it generates alone."""
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    full = _decode(tiny_loaded, set(), 10)
    stopper = next(t for row in full for t in row if any(t not in other for other in full))
    joined = _decode(tiny_loaded, {stopper}, 10, batch_size=2, refill_at=1)
    alone = [decode_batched(model, tokenizer, [ids], GenerationSettings(max_new_tokens=10), {stopper},
                            pad_id=tokenizer.pad_token_id)[0] for ids in _ids(tokenizer)]
    assert joined == alone
    assert min(map(len, joined)) < 10  # some rows did end early, so places were refilled


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
    # each row draws from its own generator: the batch it shared does not change its samples
    one_row_batches = generate(model, tokenizer, PROMPTS, GenerationSettings(
        max_new_tokens=6, temperature=1.0, num_samples=2, seed=7, batch_size=1), progress=False).texts
    assert one_row_batches == sampled[0]
    assert all(len(samples) == 2 for samples in sampled[0])


def test_cut_at_stop():
    assert cut_at_stop("    return 1\ndef other():", ("\ndef ", "\n#")) == "    return 1"
    assert cut_at_stop("text\n```python\nx = 1\n```\nmore ```", (), fences=2) == "text\n```python\nx = 1\n```"
    assert cut_at_stop("no stop", ("\ndef ",)) == "no stop"
