"""Batched text generation shared by the generative task families (code, summaries).

Why it is faster than a plain loop over ``model.generate`` (continuous batching, see
:func:`decode_batched`): every sequence stops on its own (EOS, a stop string, or a closed
code fence) and leaves the batch and its KV cache at once, and waiting prompts (longest
first) take the freed places, so no decoding step computes a finished row and a long
answer does not decode alone while short ones wait. (``model.generate`` keeps computing
finished rows, padding them, until the longest one in its batch ends.) The KV cache grows
in place instead of being concatenated every step. Prompts are left padded (decoder-only
models continue from the right edge). Steps with a few rows (the tail of a run) compute
their linear layers in the form torch runs fastest there (:class:`FewRowLinear`).
Greedy by default; sampling (temperature, top-p) draws each row from its own seeded
generator, so a run is reproducible. Encoder-decoder models use ``model.generate`` with
their own beam-search settings.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from fpbench.errors import FpbenchError

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


class StopPerSequence(StoppingCriteria):
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


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def count_new_tokens(rows: torch.Tensor, end_ids: set[int]) -> int:
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


def _next_tokens(logits: torch.Tensor, settings: GenerationSettings, generators, rows) -> torch.Tensor:
    if settings.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1.0:  # nucleus: keep the smallest set whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > settings.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.stack([torch.multinomial(p, 1, generator=generators[row])[0] for p, row in zip(probs, rows)])


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in a buffer with room to grow, so a
    decoding step writes its new column in place. (``DynamicLayer`` concatenates, copying
    the whole cache every step: for the default model at 16 rows x 700 tokens that is
    about 0.5 GB per step, as much memory traffic as the weights themselves.)"""

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self._len = 0

    def _set(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        self._k, self._v, self._len = k, v, length
        self.keys, self.values = k[:, :, :length], v[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        k, v = self._k, self._v
        if k is None or self._len + t > k.shape[-2]:
            shape = (*key_states.shape[:2], 2 * (self._len + t) + _GROW, key_states.shape[-1])
            k, v = key_states.new_empty(shape), value_states.new_empty(shape)
            if self._k is not None:
                k[:, :, :self._len], v[:, :, :self._len] = self.keys, self.values
        k[:, :, self._len:self._len + t], v[:, :, self._len:self._len + t] = key_states, value_states
        self._set(k, v, self._len + t)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self._k is not None:
            self._set(self._k[indices], self._v[indices], self._len)


_GROW = 64  # spare columns beyond doubling, so short generations never reallocate


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: ``cache`` in transformers 5 (which deprecates
    ``past_key_values`` with a warning), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned, under either name."""
    return output["cache"] if "cache" in output else output["past_key_values"]


class SlotCache(DynamicCache):
    """The KV cache of a batch whose rows come and go (see :func:`decode_batched`)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=_GrowingLayer)

    def trim_front(self, columns: int) -> None:
        """Drop the first ``columns`` positions (padding no remaining row attends to)."""
        for layer in self.layers:
            layer._set(layer._k[:, :, columns:], layer._v[:, :, columns:], layer._len - columns)

    @staticmethod
    def merge(a: "SlotCache", b: "SlotCache") -> "SlotCache":
        """The rows of ``a`` then those of ``b``, the shorter one left-padded (with zeros
        its attention mask hides) to the common length."""
        out = SlotCache()
        for la, lb in zip(a.layers, b.layers):
            length = max(la._len, lb._len)
            ka, kb = la.keys, lb.keys
            shape = (ka.shape[0] + kb.shape[0], ka.shape[1], length + _GROW, ka.shape[-1])
            k, v = ka.new_zeros(shape), ka.new_zeros(shape)
            n = ka.shape[0]
            k[:n, :, length - la._len:length], v[:n, :, length - la._len:length] = la.keys, la.values
            k[n:, :, length - lb._len:length], v[n:, :, length - lb._len:length] = lb.keys, lb.values
            layer = _GrowingLayer()
            layer.lazy_initialization(ka, la.values)
            layer._set(k, v, length)
            out.layers.append(layer)
        return out


class FewRowLinear(torch.nn.Module):
    """A float32 ``Linear`` that computes a few rows as ``mm(W, x.T)`` (at least two rows).

    On the CPU, torch's ``linear`` at one to a few rows streams the weights from memory
    markedly slower than that form; from about six rows it is as fast or faster, except
    for the wide output head (49,152 × 576 for the default model), which keeps the gain
    up to about ten rows. `fpbench bench --generation` times one decode step both ways at
    1-16 rows, and the whole run. The products are the same up to the order of the sums
    (last bits)."""

    def __init__(self, linear: torch.nn.Linear, max_rows: int):
        super().__init__()
        self.linear, self.max_rows = linear, max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        if rows > self.max_rows:
            return self.linear(x)
        both = torch.cat([flat, flat]) if rows == 1 else flat  # one row takes a slower path
        y = torch.mm(self.linear.weight, both.T).T[:rows]
        if self.linear.bias is not None:
            y = y + self.linear.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def applies_to(module) -> bool:
        # A layer with hooks (activation quantizers are forward pre-hooks) keeps its own
        # path: the wrapper would compute without them.
        return (type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
                and module.weight.device.type == "cpu"
                and not module._forward_pre_hooks and not module._forward_hooks)


FEW_ROWS = 4  # rows up to which the layers' linears take the mm form (measured, see above)
FEW_ROWS_HEAD = 10  # the same for the output head


@contextmanager
def few_row_linears(model):
    """While decoding, wrap every float32 CPU ``nn.Linear`` of ``model`` (the output head
    included) in :class:`FewRowLinear`; put the originals back afterwards. Quantized
    kernels, layers with hooks (activation quantization), half-precision and GPU layers
    are left as they are."""
    head = model.get_output_embeddings()
    swapped = []
    for name, module in list(model.named_modules()):
        if FewRowLinear.applies_to(module) and name:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            rows = FEW_ROWS_HEAD if module is head else FEW_ROWS
            setattr(parent, attr, FewRowLinear(module, rows))
            swapped.append((parent, attr, module))
    try:
        yield
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.inference_mode()
def decode_batched(model, tokenizer, prompts: list[list[int]], settings: GenerationSettings, end_ids: set[int],
                   pad_id: int = 0, seed: int = 0, refill_at: int | None = None,
                   on_finish=None) -> list[list[int]]:
    """Continuous batching for a decoder-only model: greedy or sampled continuations of
    every prompt (token ids), each row's generated ids returned with its EOS included.

    Up to ``settings.batch_size`` rows decode together over one KV cache. A row that ends
    (EOS, stop string, closing fence, token limit) leaves the batch and the cache at once;
    when ``refill_at`` slots are free (default: a quarter of the batch) the next prompts
    (longest first) are prefilled and join, left-padded to the batch's length. So a long
    answer never decodes alone while short ones wait, and no step computes a finished row.
    Sampling draws each row from its own generator (``seed`` + row), so samples do not
    depend on which rows shared a batch. ``on_finish(n)`` is told when n rows ended.
    """
    capacity = settings.batch_size
    refill_at = refill_at or max(1, capacity // 4)
    pending = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    generated: list[list[int]] = [[] for _ in prompts]
    generators = ([torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(prompts))]
                  if settings.temperature > 0 else None)
    end = torch.tensor(sorted(end_ids), dtype=torch.long)
    rows: list[int] = []  # batch row -> prompt index
    cache = mask = position = logits = None
    keyword = cache_keyword(model)
    while pending or rows:
        if pending and (not rows or capacity - len(rows) >= refill_at):
            new, pending = pending[:capacity - len(rows)], pending[capacity - len(rows):]
            ids, new_mask = _left_pad([prompts[i] for i in new], pad_id)
            new_cache = SlotCache()
            positions = (new_mask.cumsum(-1) - 1).clamp(min=0)
            new_logits = model(input_ids=ids, attention_mask=new_mask, position_ids=positions,
                               **{keyword: new_cache}, use_cache=True, logits_to_keep=1).logits[:, -1, :]
            if rows:
                width = max(mask.shape[1], new_mask.shape[1])
                mask = torch.cat([torch.nn.functional.pad(mask, (width - mask.shape[1], 0)),
                                  torch.nn.functional.pad(new_mask, (width - new_mask.shape[1], 0))])
                cache = SlotCache.merge(cache, new_cache)
                position = torch.cat([position, positions[:, -1]])
                logits = torch.cat([logits, new_logits])
            else:
                cache, mask, position, logits = new_cache, new_mask, positions[:, -1], new_logits
            rows = rows + new
        tokens = _next_tokens(logits, settings, generators, rows)
        finished = torch.isin(tokens, end)
        for j, row in enumerate(rows):
            generated[row].append(int(tokens[j]))
            if not finished[j] and (len(generated[row]) >= settings.max_new_tokens or _stopped(
                    tokenizer, generated[row], settings.stop, settings.stop_after_fences)):
                finished[j] = True
        if bool(finished.any()):
            if on_finish is not None:
                on_finish(int(finished.sum()))
            keep = torch.nonzero(~finished).flatten()
            rows = [rows[i] for i in keep.tolist()]
            if not rows:
                continue
            cache.batch_select_indices(keep)
            mask, tokens, position = mask[keep], tokens[keep], position[keep]
            first = int(mask.any(dim=0).nonzero()[0])  # leading columns no row attends to
            if first:
                cache.trim_front(first)
                mask = mask[:, first:]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position[:, None],
                       **{keyword: cache}, use_cache=True).logits[:, -1, :]
    return generated


def _generate_seq2seq(model, tokenizer, encoded: list[list[int]], settings: GenerationSettings,
                      end_ids: set[int], pad_id: int, overrides: dict | None, bar) -> tuple[list[str], int]:
    """(texts in the order of ``encoded``, generated tokens) from ``model.generate`` over
    right-padded batches, longest prompts first. Encoder-decoder models keep their own
    generation config (beams...); only the length limit (when given) and ``overrides``
    change it."""
    kwargs = {"pad_token_id": pad_id} | (
        {"max_new_tokens": settings.max_new_tokens} if settings.max_new_tokens else {}) | (overrides or {})
    order = sorted(range(len(encoded)), key=lambda r: -len(encoded[r]))
    texts, new_tokens = [""] * len(encoded), 0
    for b, first in enumerate(range(0, len(order), settings.batch_size)):
        batch = order[first:first + settings.batch_size]
        width = max(len(encoded[r]) for r in batch)
        # the encoder attends with a mask; pad on the right as trained
        input_ids = torch.tensor([encoded[r] + [pad_id] * (width - len(encoded[r])) for r in batch])
        mask = torch.tensor([[1] * len(encoded[r]) + [0] * (width - len(encoded[r])) for r in batch])
        criteria = None
        if settings.stop or settings.stop_after_fences:
            criteria = StoppingCriteriaList([StopPerSequence(tokenizer, 1, settings.stop,
                                                              settings.stop_after_fences)])
        torch.manual_seed(settings.seed + b)
        output = model.generate(input_ids=input_ids, attention_mask=mask, stopping_criteria=criteria, **kwargs)
        generated = output[:, 1:]
        new_tokens += count_new_tokens(generated, end_ids)
        for r, text in zip(batch, tokenizer.batch_decode(generated, skip_special_tokens=True)):
            texts[r] = text
        bar.update(len(batch))
    return texts, new_tokens


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings,
             progress: bool = True, desc: str = "generate", max_input_tokens: int | None = None,
             generation_overrides: dict | None = None) -> GenerationResult:
    """Generate ``settings.num_samples`` continuations of every prompt.

    Decoder-only models go through :func:`decode_batched`;
    encoder-decoder models get the prompt as encoder input and ``model.generate`` with
    their own generation config (beams, length penalty...) unless ``generation_overrides``
    says otherwise.
    """
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    end_ids = eos_ids(model, tokenizer)
    if tokenizer.pad_token_id is not None:
        end_ids.add(tokenizer.pad_token_id)
    encoded = [tokenizer(p, add_special_tokens=settings.add_special_tokens or encoder_decoder,
                         truncation=max_input_tokens is not None, max_length=max_input_tokens).input_ids
               for p in prompts]
    rows = [(i, s) for i in range(len(prompts)) for s in range(settings.num_samples)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(end_ids), 0)
    start = time.perf_counter()
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, leave=False)
    if encoder_decoder:
        outputs, new_tokens = _generate_seq2seq(model, tokenizer, [encoded[i] for i, _ in rows], settings,
                                                end_ids, pad_id, generation_overrides, bar)
    else:
        with few_row_linears(model):
            generated = decode_batched(model, tokenizer, [encoded[i] for i, _ in rows], settings, end_ids,
                                       pad_id, seed=settings.seed, on_finish=bar.update)
        new_tokens = sum(len(t) for t in generated)
        outputs = tokenizer.batch_decode([[t for t in row if t not in end_ids] for row in generated],
                                         skip_special_tokens=True)
    bar.close()
    texts: list[list[str]] = [[""] * settings.num_samples for _ in prompts]
    for (i, s), text in zip(rows, outputs):
        texts[i][s] = cut_at_stop(text, settings.stop, settings.stop_after_fences)
    return GenerationResult(texts, new_tokens, time.perf_counter() - start)
