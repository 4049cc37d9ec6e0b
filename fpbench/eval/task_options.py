"""Typed options of the task families that have any (generative, zero-shot).

A field's default is the option's default (``fpbench.options`` reads it from here for
``--help`` and the sweep); ``None`` means "the task declaration's value"."""

from __future__ import annotations

from dataclasses import dataclass

# lm-eval bootstraps the stderr of corpus-level metrics (LAMBADA perplexity) with 100k
# resamples by default, minutes of pure Python on the full set; with 1000 the estimate's
# own relative error is about 1/sqrt(2 * 1000) ~ 2%. acc/acc_norm stderr is closed form.
DEFAULT_BOOTSTRAP_ITERS = 1000
ZEROSHOT_SOURCES = ("auto", "hub", "local")
PROMPT_MODES = ("auto", "completion", "chat")


@dataclass(frozen=True)
class GenerationOptions:
    """Generative tasks (code, summaries)."""

    samples: int | None = None  # code: completions per problem; None = 1 (greedy)
    temperature: float | None = None  # None = 0 (greedy), or 0.8 with samples > 1
    max_new_tokens: int | None = None  # None = the task's
    prompt_mode: str | None = None  # None = auto: chat when the tokenizer has a template
    timeout_s: float | None = None  # code: seconds per program; None = the task's


@dataclass(frozen=True)
class ZeroShotOptions:
    """Zero-shot tasks through lm-eval."""

    zeroshot_source: str = "auto"  # auto: local copy when the data folder has one, else the hub
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS
