"""Perplexity over a test set, the standard procedure (as in GPTQ and ZeroQuant):
join the test text, tokenize once, cut non-overlapping windows of ``seqlen`` tokens,
average the next-token NLL over every predicted token of every window, exponentiate."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fpbench.data.sources import load_texts
from fpbench.data.task_defs import TaskDef
from fpbench.errors import FpbenchError
from fpbench.eval.base import DEFAULT_SEQLEN, EvalOptions, Metric


def token_stream(loaded, task: TaskDef, data_dir=None) -> torch.Tensor:
    text = task.join.join(load_texts(task.source, task.name, data_dir))
    tokenizer = loaded.tokenizer
    # One long sequence on purpose: silence the "longer than max length" warning.
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e12)
    try:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    finally:
        tokenizer.model_max_length = saved
    return ids


@torch.inference_mode()
def evaluate(loaded, task: TaskDef, options: EvalOptions) -> list[Metric]:
    if loaded.is_encoder_decoder:
        raise FpbenchError(f"task {task.name} scores decoder-only models; {loaded.name} is encoder-decoder")
    ids = token_stream(loaded, task, options.data_dir)
    seqlen = min(options.seqlen or DEFAULT_SEQLEN, loaded.max_length)
    windows = ids.numel() // seqlen
    if options.limit:
        windows = min(windows, options.limit)
    if windows == 0:
        raise FpbenchError(f"task {task.name}: fewer than {seqlen} tokens; lower --seqlen")
    model = loaded.model
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    for i in tqdm(range(windows), desc=f"{task.name} ppl", disable=not options.progress, leave=False):
        window = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
        logits = model(input_ids=window).logits[0, :-1].float()
        total_nll += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        total_tokens += seqlen - 1
    seconds = time.perf_counter() - start
    return [Metric("perplexity", math.exp(total_nll / total_tokens), windows, {
        "seqlen": seqlen, "tokens": total_tokens, "eval_s": seconds,
        "tokens_per_s": windows * seqlen / seconds,
    })]
