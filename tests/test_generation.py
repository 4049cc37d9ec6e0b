"""Batched generation: same tokens as transformers' generate, per-row stopping, seeding."""

from __future__ import annotations

import torch

import pytest

from fpbench.eval.generation import (FEW_ROWS, FEW_ROWS_HEAD, FewRowLinear, GenerationSettings, cut_at_stop,
                                decode_batched, few_row_linears, generate)

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


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 10, 11, 16])
def test_few_row_linear_computes_the_layers_products(rows):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(48, 300, bias=rows % 2 == 0)
    x = torch.randn(rows, 1, 48)
    exact = x.double() @ linear.weight.double().T + (linear.bias.double() if linear.bias is not None else 0)
    got = FewRowLinear(linear, max_rows=10)(x)
    assert got.shape == (rows, 1, 300) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, linear(x), rtol=1e-5, atol=1e-5)


def test_few_row_linears_are_swapped_in_for_decoding_only(tiny_loaded):
    model = tiny_loaded.model
    before = dict(model.named_modules())
    linears = {name for name, m in before.items() if type(m) is torch.nn.Linear}
    head = model.get_output_embeddings()
    with few_row_linears(model):
        during = dict(model.named_modules())
        wrapped = {name for name, m in during.items() if isinstance(m, FewRowLinear)}
        assert wrapped == linears and len(wrapped) > 2
        assert all(during[name].linear is before[name] for name in wrapped)
        assert model.get_output_embeddings().max_rows == FEW_ROWS_HEAD
        assert during[next(n for n in wrapped if n != "lm_head")].max_rows == FEW_ROWS
    assert dict(model.named_modules()) == before
    with pytest.raises(RuntimeError), few_row_linears(model):
        raise RuntimeError("a failed decode")
    assert dict(model.named_modules()) == before  # restored after an error too
    half = torch.nn.Linear(4, 4).to(torch.bfloat16)
    model.set_output_embeddings(half)
    try:
        with few_row_linears(model):
            assert model.get_output_embeddings() is half  # only float32 Linear layers are wrapped
    finally:
        model.set_output_embeddings(head)


def test_generate_with_few_row_linears_matches_transformers_generate(tiny_loaded):
    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    input_ids, mask = _left_padded(tokenizer, PROMPTS)
    reference = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    expected = tokenizer.batch_decode(reference[:, input_ids.shape[1]:], skip_special_tokens=True)
    # batch 1: every step takes the few-row form
    ours = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=1), progress=False)
    assert [t[0] for t in ours.texts] == expected


def test_layers_with_activation_quantizers_keep_their_hooks_while_decoding(tiny_loaded):
    """Activation quantizers are forward pre-hooks: a hooked layer is not wrapped, so
    generation at one row (every step few-row) still quantizes its inputs at every step."""
    from fpbench.quant.activations import attach_act_quantizers
    from fpbench.quant.model import target_linears

    model, tokenizer = tiny_loaded.model, tiny_loaded.tokenizer
    hooked = target_linears(model)
    quantizers = attach_act_quantizers(hooked, "fp4_e2m1", "token-dynamic")
    first = next(iter(hooked.values()))
    calls = []
    counter = first.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        with few_row_linears(model):
            during = dict(model.named_modules())
            assert all(during[name] is module for name, module in hooked.items())
            assert isinstance(model.get_output_embeddings(), FewRowLinear)  # the unhooked head still is
        input_ids, mask = _left_padded(tokenizer, PROMPTS[:1])
        reference = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        expected = tokenizer.decode(reference[0, input_ids.shape[1]:], skip_special_tokens=True)
        calls.clear()
        ours = generate(model, tokenizer, PROMPTS[:1], GenerationSettings(max_new_tokens=8, batch_size=1),
                        progress=False)
        assert ours.texts[0][0] == expected
        assert calls == [1] * 8  # prefill + 7 one-row steps, each through the layer's hooks
    finally:
        counter.remove()
        quantizers.remove()
