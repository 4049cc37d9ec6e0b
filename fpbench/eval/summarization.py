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

import json
import re
from pathlib import Path

import numpy as np

from fpbench.data.sources import _missing, hub_offline, local_file, read_jsonl, resolve_data_dir
from fpbench.errors import FpbenchError
from fpbench.eval.generation import DEFAULT_BATCH_SIZE, GenerationSettings, chat_prompt, generate, has_chat_template
from fpbench.eval.base import EvalOptions, Metric

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BOOTSTRAP_SAMPLES = 1000
DEFAULT_MAX_INPUT_TOKENS = 1024
DEFAULT_MAX_NEW_TOKENS = 128
INSTRUCTION = "Summarize the following article in {sentences} sentences.\n\nArticle:\n{article}"
COMPLETION = "Article:\n{article}\n\nSummary in {sentences} sentences:\n"
# Sentence ends: . ! ? (optionally followed by a quote or bracket) then space; or two+
# spaces (CNN/DM highlights separated by runs of spaces); or a newline.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\s{2,}|\n+")


def load_documents(task: dict, data_dir=None) -> list[dict]:
    """[{id, document, reference}] from the local JSONL (fields named in the YAML) or the hub."""
    source = task["source"]
    fields = task.get("fields", {})
    doc_field, ref_field = fields.get("document", "article"), fields.get("reference", "highlights")
    id_field = fields.get("id", "id")
    path = local_file(source, task["name"], data_dir)
    if path is not None:
        doc_field = source["local"].get("document", doc_field)
        ref_field = source["local"].get("reference", ref_field)
        id_field = source["local"].get("id", id_field)
        rows = read_jsonl(path)
    else:
        hub = source.get("hub")
        resolved = resolve_data_dir(data_dir)
        if hub is None:
            raise _missing(task["name"], source, resolved, "no hub source is defined")
        if hub_offline():
            raise _missing(task["name"], source, resolved, "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1)")
        try:
            import datasets

            rows = datasets.load_dataset(hub["path"], hub.get("name"), split=hub["split"])
        except Exception as exc:  # network, missing dataset: one user-facing problem
            raise _missing(task["name"], source, resolved, f"hub load failed: {str(exc).splitlines()[0]}") from exc
    documents = []
    for number, row in enumerate(rows):
        if doc_field not in row or ref_field not in row:
            raise FpbenchError(f"{task['name']}: record {number} lacks {doc_field!r} or {ref_field!r}; "
                               "set source.local.document / .reference in the task YAML")
        documents.append({"id": row.get(id_field, number), "document": row[doc_field],
                          "reference": row[ref_field]})
    return documents


def split_sentences(text: str) -> str:
    """One sentence per line, as ROUGE-Lsum expects."""
    return "\n".join(s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip())


def rouge_scores(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """Per-document F1 (0-1) for every ROUGE type, stemmed."""
    from rouge_score import rouge_scorer

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


def _artifact_path(options: EvalOptions, task_name: str) -> Path:
    scheme = str(options.extra.get("scheme", "run")).replace("/", "_")
    key = options.extra.get("run_key")
    name = f"{task_name}__{scheme}" + (f"__{key}" if key else "") + ".summaries.jsonl"
    return Path(options.out_dir or ".") / "generations" / name


def _decoder_prompts(loaded, task: dict, documents: list[dict], mode: str, max_new_tokens: int,
                     max_input_tokens: int) -> list[str]:
    tokenizer = loaded.tokenizer
    sentences = task.get("sentences", 3)
    template = INSTRUCTION if mode == "chat" else COMPLETION
    render = (lambda article: chat_prompt(tokenizer, template.format(sentences=sentences, article=article))) \
        if mode == "chat" else (lambda article: template.format(sentences=sentences, article=article))
    overhead = len(tokenizer(render(""), add_special_tokens=False).input_ids)
    budget = min(max_input_tokens, loaded.max_length - max_new_tokens - overhead)
    if budget < 32:
        raise FpbenchError(f"{task['name']}: only {budget} tokens left for the article; lower --max-new-tokens")
    return [render(truncate_tokens(tokenizer, d["document"], budget)) for d in documents]


def evaluate(loaded, task: dict, options: EvalOptions) -> list[Metric]:
    extra = options.extra
    documents = load_documents(task, options.data_dir)
    if options.limit:
        documents = documents[:options.limit]
    max_input_tokens = int(options.seqlen or task.get("max_input_tokens", DEFAULT_MAX_INPUT_TOKENS))
    batch_size = int(options.batch_size or extra.get("batch_size") or task.get("batch_size", DEFAULT_BATCH_SIZE))
    if loaded.is_encoder_decoder:
        mode = "encoder-decoder"
        # The model's generation config holds the tuned beam search; honour a user's explicit
        # --max-new-tokens, else keep the config's max_length.
        settings = GenerationSettings(max_new_tokens=int(extra["max_new_tokens"]) if extra.get("max_new_tokens")
                                      else None, batch_size=batch_size, seed=options.seed)
        limit = min(max_input_tokens, getattr(loaded.model.config, "max_position_embeddings", max_input_tokens))
        prompts = [d["document"] for d in documents]
        result = generate(loaded.model, loaded.tokenizer, prompts, settings, progress=options.progress,
                          desc=f"{task['name']} summarize", max_input_tokens=limit)
    else:
        mode = extra.get("prompt_mode") or "auto"
        if mode == "auto":
            mode = "chat" if has_chat_template(loaded.tokenizer) else "completion"
        max_new_tokens = int(extra.get("max_new_tokens") or task.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        temperature = float(extra.get("temperature") or 0.0)
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                      batch_size=batch_size, seed=options.seed,
                                      stop=() if mode == "chat" else ("\n\n",),
                                      add_special_tokens=mode == "completion")
        prompts = _decoder_prompts(loaded, task, documents, mode, max_new_tokens, max_input_tokens)
        result = generate(loaded.model, loaded.tokenizer, prompts, settings, progress=options.progress,
                          desc=f"{task['name']} summarize")
    predictions = [texts[0].strip() for texts in result.texts]
    references = [d["reference"] for d in documents]
    per_document = rouge_scores(predictions, references)

    path = _artifact_path(options, task["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for d, prediction, scores in zip(documents, predictions, per_document):
            fh.write(json.dumps({"id": d["id"], "prediction": prediction, "reference": d["reference"],
                                 **{k: round(v, 6) for k, v in scores.items()}}) + "\n")
    details = {"prompt_mode": mode, "max_input_tokens": max_input_tokens, "batch_size": batch_size,
               "new_tokens": result.new_tokens, "generate_s": round(result.seconds, 3),
               "tokens_per_s": round(result.tokens_per_s, 2), "summaries_file": str(path),
               "scale": "F1 x 100"}
    metrics = []
    for name in ROUGE_TYPES:
        values = [s[name] * 100 for s in per_document]
        low, high = bootstrap_interval(values, seed=options.seed)
        metrics.append(Metric(name, float(np.mean(values)), len(documents),
                              details | {"ci95_low": round(low, 4), "ci95_high": round(high, 4)}))
    return metrics
