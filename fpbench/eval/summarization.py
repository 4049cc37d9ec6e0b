"""Abstractive summarization scored with ROUGE: CNN/DailyMail and XSum.

Decoder-only models get an instruction ("Summarize the article in N sentences") through
their chat template (or a plain ``Article: ... Summary:`` prompt without one); articles
are cut, in tokens, so prompt plus answer fit the context (and ``max_input_tokens``).
Encoder-decoder models (BART, as the 406M summarizer in ZeroQuant(4+2)) read the
article as encoder input and decode with their own generation config (beams, length
penalty, min/max length): the settings they were tuned with.

Scores: ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F1 with Porter stemming, from
``rouge_score`` (Google's reference implementation), as mean x 100 with a bootstrap 95%
interval over documents. ROUGE-Lsum needs one sentence per line, so both sides are split
into sentences first.
"""

from __future__ import annotations

import re

import numpy as np
from rouge_score import rouge_scorer

from fpbench.data.sources import load_rows
from fpbench.data.task_defs import TaskDef
from fpbench.errors import FpbenchError
from fpbench.eval.base import (EvalOptions, GenerationPlan, GenerativeFamily, Metric, choose_prompt_mode,
                               generation_batch_size)
from fpbench.eval.generation import GenerationSettings, chat_prompt

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BOOTSTRAP_SAMPLES = 1000
DEFAULT_MAX_INPUT_TOKENS = 1024
DEFAULT_MAX_NEW_TOKENS = 128
INSTRUCTION = "Summarize the following article in {sentences} sentences.\n\nArticle:\n{article}"
COMPLETION = "Article:\n{article}\n\nSummary in {sentences} sentences:\n"
# Sentence ends: . ! ? (optionally followed by a quote or bracket) then space; or two+
# spaces (CNN/DM highlights separated by runs of spaces); or a newline.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\s{2,}|\n+")


# Record field names of the hub rows when the task declares none (CNN/DailyMail's).
DEFAULT_FIELDS = {"document": "article", "reference": "highlights", "id": "id"}


def load_documents(task: TaskDef, data_dir=None) -> list[dict]:
    """[{id, document, reference}] from the local JSONL or the hub; a local copy may name
    its fields differently (``source.local``: document, reference, id)."""
    rows = load_rows(task.source, task.name, data_dir)
    names = DEFAULT_FIELDS | dict(task.fields) | (dict(task.source.record_fields) if rows.local else {})
    documents = []
    for number, row in enumerate(rows.items):
        if names["document"] not in row or names["reference"] not in row:
            raise FpbenchError(f"{task.name}: record {number} lacks {names['document']!r} or "
                               f"{names['reference']!r}; set source.local.document / .reference in the task YAML")
        documents.append({"id": row.get(names["id"], number), "document": row[names["document"]],
                          "reference": row[names["reference"]]})
    return documents


def split_sentences(text: str) -> str:
    """One sentence per line, as ROUGE-Lsum expects."""
    return "\n".join(s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip())


def rouge_scores(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """Per-document F1 (0-1) for every ROUGE type, stemmed."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = []
    for prediction, reference in zip(predictions, references):
        result = scorer.score(split_sentences(reference), split_sentences(prediction))
        scores.append({name: result[name].fmeasure for name in ROUGE_TYPES})
    return scores


def bootstrap_interval(values, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                       confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap over documents for the mean."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def truncate_tokens(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def _decoder_prompts(loaded, task: TaskDef, documents: list[dict], mode: str, max_new_tokens: int,
                     max_input_tokens: int) -> list[str]:
    tokenizer = loaded.tokenizer
    sentences = task.sentences
    template = INSTRUCTION if mode == "chat" else COMPLETION
    render = (lambda article: chat_prompt(tokenizer, template.format(sentences=sentences, article=article))) \
        if mode == "chat" else (lambda article: template.format(sentences=sentences, article=article))
    overhead = len(tokenizer(render(""), add_special_tokens=False).input_ids)
    budget = min(max_input_tokens, loaded.max_length - max_new_tokens - overhead)
    if budget < 32:
        raise FpbenchError(f"{task.name}: only {budget} tokens left for the article; lower --max-new-tokens")
    return [render(truncate_tokens(tokenizer, d["document"], budget)) for d in documents]


class Summarization(GenerativeFamily):
    artifact_suffix = ".summaries.jsonl"
    artifact_key = "summaries_file"
    verb = "summarize"

    def items(self, loaded, task: TaskDef, options: EvalOptions) -> list[dict]:
        return load_documents(task, options.data_dir)

    def plan(self, loaded, task: TaskDef, options: EvalOptions, documents: list[dict]) -> GenerationPlan:
        gen = options.generation
        max_input_tokens = int(options.seqlen or task.max_input_tokens or DEFAULT_MAX_INPUT_TOKENS)
        batch_size = generation_batch_size(task, options)
        if loaded.is_encoder_decoder:
            # The model's generation config holds the tuned beam search; honour a user's
            # explicit --max-new-tokens, else keep the config's max_length.
            settings = GenerationSettings(max_new_tokens=gen.max_new_tokens, batch_size=batch_size,
                                          seed=options.seed)
            limit = min(max_input_tokens, getattr(loaded.model.config, "max_position_embeddings", max_input_tokens))
            mode, prompts = "encoder-decoder", [d["document"] for d in documents]
        else:
            mode = choose_prompt_mode(loaded.tokenizer, gen.prompt_mode)
            max_new_tokens = int(gen.max_new_tokens or task.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
            settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=options.seed,
                                          temperature=float(gen.temperature or 0.0),
                                          stop=() if mode == "chat" else ("\n\n",),
                                          add_special_tokens=mode == "completion")
            prompts = _decoder_prompts(loaded, task, documents, mode, max_new_tokens, max_input_tokens)
            limit = None
        return GenerationPlan(prompts, settings, {"prompt_mode": mode, "max_input_tokens": max_input_tokens,
                                                  "batch_size": batch_size, "scale": "F1 x 100"},
                              max_input_tokens=limit)

    def score(self, task, options, documents, result, plan):
        predictions = [texts[0].strip() for texts in result.texts]
        per_document = rouge_scores(predictions, [d["reference"] for d in documents])
        records = [{"id": d["id"], "prediction": prediction, "reference": d["reference"],
                    **{k: round(v, 6) for k, v in scores.items()}}
                   for d, prediction, scores in zip(documents, predictions, per_document)]
        metrics = []
        for name in ROUGE_TYPES:
            values = [s[name] * 100 for s in per_document]
            low, high = bootstrap_interval(values, seed=options.seed)
            metrics.append(Metric(name, float(np.mean(values)), len(documents),
                                  {"ci95_low": round(low, 4), "ci95_high": round(high, 4)}))
        return records, metrics


evaluate = Summarization().evaluate
