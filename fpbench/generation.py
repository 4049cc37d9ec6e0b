"""Batched text generation shared by the generative task families (code, summaries).

Why it is faster than a plain loop over ``model.generate``: prompts are sorted by
length so a batch holds similar lengths (little padding in the prefill), every sequence
stops on its own (EOS, a stop string, or a closed code fence), and - the main saving - a
finished sequence leaves the batch: its rows are dropped from the KV cache, so each
decoding step computes only the sequences still running. (``model.generate`` keeps
computing finished rows, padding them, until the longest one ends.) Prompts are left
padded (decoder-only models continue from the right edge). Greedy by default; sampling
(temperature, top-p) draws from a generator seeded per batch, so a run is reproducible.
Encoder-decoder models use ``model.generate`` with their own beam-search settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .errors import FpbenchError

DEFAULT_BATCH_SIZE = 16
FENCE = "```"


@dataclass
class GenerationSettings:
    max_new_tokens: int | None = 256  # None: an encoder-decoder model's own max_length
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.95  # only used when sampling
    num_samples: int = 1  # completions per prompt
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE  # rows (prompts x samples) per generate call
    stop: tuple[str, ...] = ()  # cut and stop at the first of these
    stop_after_fences: int = 0  # stop once this many ``` fences were generated (0: off)
    add_special_tokens: bool = False  # chat-rendered prompts already hold them


@dataclass
class GenerationResult:
    texts: list[list[str]]  # [prompt][sample], stop strings cut off
    new_tokens: int  # generated tokens (up to each row's own stop), all rows
    seconds: float
    rows_per_batch: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, user_message: str, system: str | None = None) -> str:
    """The model's own chat template, ready for the assistant's answer."""
    if not has_chat_template(tokenizer):
        raise FpbenchError("this tokenizer has no chat template; use --prompt-mode completion")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user_message}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def cut_at_stop(text: str, stop: tuple[str, ...], fences: int = 0) -> str:
    """Text up to (not including) the first stop string, or up to the closing fence."""
    end = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            end = min(end, i)
    if fences:
        i = -1
        for _ in range(fences):
            i = text.find(FENCE, i + 1)
            if i == -1:
                break
        if i != -1:
            end = min(end, i + len(FENCE))
    return text[:end]


class _StopPerSequence(StoppingCriteria):
    """Marks each row finished on its own once its generated text holds a stop string
    (or enough code fences); generate() then pads that row and stops when all are done."""

    def __init__(self, tokenizer, prompt_length: int, stop: tuple[str, ...], fences: int):
        self.tokenizer, self.prompt_length, self.stop, self.fences = tokenizer, prompt_length, stop, fences
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in torch.nonzero(~self.done).flatten().tolist():
            text = self.tokenizer.decode(input_ids[row, self.prompt_length:], skip_special_tokens=True)
            if any(s in text for s in self.stop) or (self.fences and text.count(FENCE) >= self.fences):
                self.done[row] = True
        return self.done.clone()


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _count_new_tokens(rows: torch.Tensor, end_ids: set[int]) -> int:
    """Tokens each row really generated: up to and including its first EOS/pad."""
    total = 0
    for row in rows.tolist():
        n = len(row)
        for i, token in enumerate(row):
            if token in end_ids:
                n = i + 1
                break
        total += n
    return total


def _stopped(tokenizer, tokens: list[int], stop: tuple[str, ...], fences: int) -> bool:
    if not stop and not fences:
        return False
    # A stop string is short: it shows up in the decoded tail when it completes.
    tail = tokenizer.decode(tokens[-16:], skip_special_tokens=True)
    if any(s in tail for s in stop):
        return True
    if fences and FENCE in tail:
        return tokenizer.decode(tokens, skip_special_tokens=True).count(FENCE) >= fences
    return False


def _next_tokens(logits: torch.Tensor, settings: GenerationSettings, generator) -> torch.Tensor:
    if settings.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1.0:  # nucleus: keep the smallest set whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > settings.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def decode_shrinking(model, tokenizer, input_ids: torch.Tensor, mask: torch.Tensor,
                     settings: GenerationSettings, end_ids: set[int], seed: int = 0) -> list[list[int]]:
    """Decode a left-padded batch with a KV cache, dropping each row from the batch (and
    the cache) as soon as it ends. Returns each row's generated ids, its EOS included."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1, :]
    last_position = positions[:, -1]
    active = list(range(input_ids.shape[0]))  # batch row -> original row
    generated: list[list[int]] = [[] for _ in active]
    end = torch.tensor(sorted(end_ids)) if end_ids else torch.tensor([], dtype=torch.long)
    for step in range(settings.max_new_tokens):
        tokens = _next_tokens(logits, settings, generator)
        finished = torch.isin(tokens, end)
        for j, row in enumerate(active):
            generated[row].append(int(tokens[j]))
            if not finished[j] and _stopped(tokenizer, generated[row], settings.stop, settings.stop_after_fences):
                finished[j] = True
        if step == settings.max_new_tokens - 1 or bool(finished.all()):
            break
        if bool(finished.any()):
            keep = torch.nonzero(~finished).flatten()
            cache.batch_select_indices(keep)
            mask, tokens, last_position = mask[keep], tokens[keep], last_position[keep]
            active = [active[i] for i in keep.tolist()]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last_position = last_position + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last_position[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1, :]
    return generated


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings,
             progress: bool = True, desc: str = "generate", max_input_tokens: int | None = None,
             generation_overrides: dict | None = None) -> GenerationResult:
    """Generate ``settings.num_samples`` continuations of every prompt.

    Decoder-only models get left-padded prompts and :func:`decode_shrinking`;
    encoder-decoder models get the prompt as encoder input and ``model.generate`` with
    their own generation config (beams, length penalty...) unless ``generation_overrides``
    says otherwise.
    """
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    end_ids = _eos_ids(model, tokenizer)
    if tokenizer.pad_token_id is not None:
        end_ids.add(tokenizer.pad_token_id)
    encoded = [tokenizer(p, add_special_tokens=settings.add_special_tokens or encoder_decoder,
                         truncation=max_input_tokens is not None, max_length=max_input_tokens).input_ids
               for p in prompts]
    rows = [(i, s) for i in range(len(prompts)) for s in range(settings.num_samples)]
    # Longest first: the slowest batch runs first (an honest progress bar and early OOM).
    rows.sort(key=lambda r: -len(encoded[r[0]]))
    texts: list[list[str]] = [[""] * settings.num_samples for _ in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(end_ids), 0)
    # Encoder-decoder models keep their generation config (beams...); only the length
    # limit (when given) and the caller's overrides change it.
    seq2seq_kwargs = {"pad_token_id": pad_id} | (
        {"max_new_tokens": settings.max_new_tokens} if settings.max_new_tokens else {}) | (generation_overrides or {})
    new_tokens, rows_per_batch = 0, []
    start = time.perf_counter()
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, leave=False)
    for b, first in enumerate(range(0, len(rows), settings.batch_size)):
        batch = rows[first:first + settings.batch_size]
        ids = [encoded[i] for i, _ in batch]
        width = max(len(x) for x in ids)
        if encoder_decoder:  # the encoder attends with a mask; pad on the right as trained
            input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        else:
            input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        if encoder_decoder:
            criteria = None
            if settings.stop or settings.stop_after_fences:
                criteria = StoppingCriteriaList([_StopPerSequence(tokenizer, 1, settings.stop,
                                                                  settings.stop_after_fences)])
            torch.manual_seed(settings.seed + b)
            output = model.generate(input_ids=input_ids, attention_mask=mask, stopping_criteria=criteria,
                                    **seq2seq_kwargs)
            generated = output[:, 1:]
            new_tokens += _count_new_tokens(generated, end_ids)
            decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
        else:
            rows_tokens = decode_shrinking(model, tokenizer, input_ids, mask, settings, end_ids,
                                           seed=settings.seed + b)
            new_tokens += sum(len(t) for t in rows_tokens)
            decoded = tokenizer.batch_decode([[t for t in row if t not in end_ids] for row in rows_tokens],
                                             skip_special_tokens=True)
        for (i, s), text in zip(batch, decoded):
            texts[i][s] = cut_at_stop(text, settings.stop, settings.stop_after_fences)
        rows_per_batch.append(len(batch))
        bar.update(len(batch))
    bar.close()
    return GenerationResult(texts, new_tokens, time.perf_counter() - start, rows_per_batch)
