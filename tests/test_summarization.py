"""Summarization: ROUGE against hand-computed values and rouge_score, bootstrap, and the
pipeline on tiny random decoder-only and encoder-decoder (BART) models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fpbench.data.task_defs import Source
from fpbench.eval.task_options import GenerationOptions
from fpbench.eval.base import EvalOptions, get_task
from fpbench.eval import summarization as summ


def test_rouge_matches_hand_computed_values():
    # Unigram overlap the,the,cat,on,mat = 5 of 6 on both sides; bigrams 3 of 5; LCS 5.
    [scores] = summ.rouge_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)
    assert scores["rougeL"] == pytest.approx(5 / 6)
    assert scores["rougeLsum"] == pytest.approx(5 / 6)


def test_rouge_stems_and_matches_rouge_score_directly():
    from rouge_score import rouge_scorer

    prediction = "Officials said the storms were running east. Thousands lost power on Sunday."
    reference = "Storm runs east, officials say.   Thousands of homes lose power on Sunday."
    [ours] = summ.rouge_scores([prediction], [reference])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    # Sentence-per-line input written out by hand, as rougeLsum expects.
    direct = scorer.score("Storm runs east, officials say.\nThousands of homes lose power on Sunday.",
                          "Officials said the storms were running east.\nThousands lost power on Sunday.")
    for name in summ.ROUGE_TYPES:
        assert ours[name] == pytest.approx(direct[name].fmeasure)
    unstemmed = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score(reference, prediction)
    assert ours["rouge1"] > unstemmed["rouge1"].fmeasure  # running/runs, storms/storm match


def test_split_sentences():
    assert summ.split_sentences("One here. Two there!  Three\nFour?") == "One here.\nTwo there!\nThree\nFour?"


def test_bootstrap_interval_brackets_the_mean():
    rng = np.random.default_rng(1)
    values = rng.normal(40, 10, size=200)
    low, high = summ.bootstrap_interval(values, seed=0)
    assert low < values.mean() < high
    # Close to the normal approximation mean +- 1.96 * sd / sqrt(n).
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert summ.bootstrap_interval([3.0] * 5) == (3.0, 3.0)


@pytest.fixture
def local_task(tmp_path):
    rows = [{"doc": "the council voted on tuesday to close the old bridge . repairs would cost millions .",
             "ref": "Council votes to close old bridge.", "key": "a"},
            {"doc": "a local team won the cup after a late goal . fans celebrated in the streets .",
             "ref": "Local team wins the cup.", "key": "b"},
            {"doc": "heavy rain flooded roads across the region . schools were closed .",
             "ref": "Rain floods roads; schools close.", "key": "c"}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = dataclasses.replace(get_task("cnn_dailymail"), source=Source(
        file="docs.jsonl", record_fields={"document": "doc", "reference": "ref", "id": "key"}))
    return task, tmp_path


def _check_outputs(metrics, n):
    assert [m.metric for m in metrics] == list(summ.ROUGE_TYPES)
    for m in metrics:
        assert m.n == n and 0 <= m.value <= 100
        assert m.details["ci95_low"] <= m.value + 1e-9 and m.value <= m.details["ci95_high"] + 1e-9
    lines = [json.loads(x) for x in Path(metrics[0].details["summaries_file"]).read_text().splitlines()]
    assert len(lines) == n and {"id", "prediction", "reference", "rouge1"} <= set(lines[0])
    return lines


def test_tiny_decoder_only_pipeline(tiny_loaded, local_task):
    task, folder = local_task
    options = EvalOptions(data_dir=str(folder), out_dir=str(folder / "out"), progress=False,
                          generation=GenerationOptions(max_new_tokens=8), scheme="fp16", run_key="k")
    metrics = summ.evaluate(tiny_loaded, task, options)
    lines = _check_outputs(metrics, 3)
    assert [x["id"] for x in lines] == ["a", "b", "c"]
    assert metrics[0].details["prompt_mode"] == "chat"


def test_long_articles_are_truncated_to_fit(tiny_loaded, local_task):
    task, _ = local_task
    tokenizer = tiny_loaded.tokenizer
    documents = [{"document": "word " * 5000, "reference": "x"}]
    [prompt] = summ._decoder_prompts(tiny_loaded, task, documents, "chat", max_new_tokens=64, max_input_tokens=300)
    overhead = len(tokenizer(summ._decoder_prompts(tiny_loaded, task, [{"document": "", "reference": ""}], "chat",
                                                   64, 300)[0], add_special_tokens=False).input_ids)
    assert len(tokenizer(prompt, add_special_tokens=False).input_ids) <= overhead + 300 + 2


def test_tiny_bart_pipeline_and_quantization(default_tokenizer, local_task):
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    from fpbench.quant.model import quantize_model, target_linears
    from fpbench.models import LoadedModel
    from fpbench.quant.scheme import Scheme

    tokenizer = default_tokenizer
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=1, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=1,
                        forced_eos_token_id=None)
    model = BartForConditionalGeneration(config).eval()
    model.generation_config.num_beams = 2
    model.generation_config.max_length = 12
    model.generation_config.min_length = 3
    loaded = LoadedModel(model, tokenizer, "tiny-bart", "random")
    assert loaded.is_encoder_decoder
    layers = target_linears(model)
    assert any(".encoder." in name for name in layers) and any(".decoder." in name for name in layers)
    before = model.model.encoder.layers[0].fc1.weight.clone()
    quantize_model(model, Scheme.parse("int4/channel/rtn"), progress=False)
    assert not torch.equal(before, model.model.encoder.layers[0].fc1.weight)

    task, folder = local_task
    options = EvalOptions(data_dir=str(folder), out_dir=str(folder / "bart"), progress=False)
    metrics = summ.evaluate(loaded, task, options)
    _check_outputs(metrics, 3)
    assert metrics[0].details["prompt_mode"] == "encoder-decoder"
    # Beam search ran with the model's own max_length: at most 12 tokens incl. the start token.
    assert metrics[0].details["new_tokens"] <= 3 * 11


def test_local_cnn_dailymail_copy_loads(data_dir):
    documents = summ.load_documents(get_task("cnn_dailymail"), data_dir)
    assert len(documents) == 100 and [d["id"] for d in documents] == list(range(100))
    assert documents[0]["document"].startswith("( cnn ) two cnn heroes")
    assert all(d["reference"].strip() for d in documents)
