"""End-to-end decode speed: tokens/s at batch 1, torch's dense weights vs FP6 weights on
the kernel, and llama.cpp on the default model's own GGUF as a peer.

Two models: a randomly initialised Llama-shaped model of about 1.1B parameters
(TinyLlama's shape: weights far larger than the cache, so decoding is bandwidth-bound
as in real deployment; random weights do not change the speed), and the default model.
Each is timed in fp32 and bf16 (the faster of the two is torch's best dense decode on
this CPU: bf16 needs native bf16 instructions to win), then quantized (RTN, fp6_e3m2
per channel) with its linear layers swapped for ``LutLinear``, then once more with its
output head in FP6 as well (``fp6_kernel+head``: as llama.cpp's GGUF holds the head). Greedy decoding of
exactly ``new_tokens`` tokens after a short prompt, median of ``REPEATS`` timed runs after
a warm-up; the time covers generation only (prefill included, ~1 token's work). Every variant decodes in ``LeanDecoder`` with its
compiled step (the transformers forward's logits, bit for bit, without a Python call per
operation; loop "compiled"), and the FP6 kernel once more with the step's per-layer work
in Python (loop "lean") and in ``model.generate`` (loop "transformers"), so the table
shows what Python and the framework cost per token. When ``llama-cpp-python`` is installed (an optional
extra, ``pip install llama-cpp-python``: it compiles llama.cpp for about 10 minutes),
llama.cpp decodes the default model's GGUF in the same run, with as many threads, in a
child process: a crash inside llama.cpp (one build segfaulted in its decode on an AVX-512
Xeon) costs only its row, never the rows measured before it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from fpbench.errors import FpbenchError
from fpbench.eval.lean_decode import LeanDecoder, decode_loop
from fpbench.kernels.linear import use_kernel_linears
from fpbench.quant.model import quantize_model
from fpbench.records.environment import environment, utc_now
from fpbench.records.schema import E2E_BENCH
from fpbench.records.store import append_jsonl
from fpbench.quant.scheme import Scheme

FP6_SCHEME = "fp6_e3m2/channel/rtn"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)
PROMPT_TOKENS = 8
REPEATS = 3  # timed decodes per row; the median is reported


def random_llama(shape: dict | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: half the memory and time
    try:
        model = LlamaForCausalLM(LlamaConfig(**(shape or LLAMA_1B)))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _median_run(run, repeats: int) -> tuple[float, float]:
    """(tokens/s, seconds) of the median of ``repeats`` timed calls of ``run`` (returns tokens)."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        seconds = time.perf_counter() - start
        timings.append((tokens / seconds, seconds))
    return sorted(timings)[len(timings) // 2]


@torch.no_grad()
def decode_tokens_per_s(model, new_tokens: int, vocab_size: int, seed: int = 0, loop: str = "compiled",
                        repeats: int = REPEATS) -> tuple[float, float]:
    """(tokens/s, seconds) of greedy decoding of exactly ``new_tokens`` at batch 1 (median of
    ``repeats`` after a warm-up), in ``LeanDecoder`` (loop "compiled" or "lean": its step
    compiled or in Python) or ``model.generate`` (loop "transformers")."""
    prompt = torch.randint(0, vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed))
    if loop in ("compiled", "lean"):
        decoder = LeanDecoder(model, PROMPT_TOKENS + new_tokens, compiled=loop == "compiled")
        decoder.generate(prompt, 2)  # warm-up
        return _median_run(lambda: len(decoder.generate(prompt, new_tokens)), repeats)
    if loop != "transformers":
        raise FpbenchError(f"unknown decode loop {loop!r}; use compiled, lean or transformers")
    settings = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **settings)  # warm-up
    return _median_run(lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              **settings).shape[1] - PROMPT_TOKENS, repeats)


def _weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _record(model_name: str, variant: str, loop: str, tps: float, seconds: float, model_bytes: int) -> dict:
    return {"model": model_name, "variant": variant, "loop": loop, "tokens_per_s": round(tps, 3),
            "ms_per_token": round(1e3 / tps, 2), "decode_s": round(seconds, 2), "model_bytes": model_bytes}


def measure_model(name: str, model, new_tokens: int, progress: bool) -> list[dict]:
    vocab = model.config.vocab_size
    loop = decode_loop(model)
    records = []
    for dtype, variant in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        model = model.to(dtype)
        tps, seconds = decode_tokens_per_s(model, new_tokens, vocab, loop=loop)
        records.append(_record(name, variant, loop, tps, seconds, _weight_bytes(model)))
    quantized = quantize_model(model, Scheme.parse(FP6_SCHEME), progress=progress)
    use_kernel_linears(model, quantized.weights)
    for fp6_loop in dict.fromkeys((loop, "lean", "transformers")):
        tps, seconds = decode_tokens_per_s(model, new_tokens, vocab, loop=fp6_loop)
        records.append(_record(name, "fp6_kernel", fp6_loop, tps, seconds, _weight_bytes(model)))
    # As a GGUF holds it: the output head quantized too (the one nn.Linear left by now).
    head = quantize_model(model, Scheme.parse(FP6_SCHEME), include_head=True, progress=progress)
    use_kernel_linears(model, head.weights)
    tps, seconds = decode_tokens_per_s(model, new_tokens, vocab, loop=loop)
    records.append(_record(name, "fp6_kernel+head", loop, tps, seconds, _weight_bytes(model)))
    return records


RANDOM_MODEL = "random-llama"  # the random models' rows; llama.cpp decodes the default model only
LLAMA_CPP_MISSING = ("llama.cpp peer not timed: llama-cpp-python is not installed. To time it in the same run: "
                     "pip install llama-cpp-python (compiles llama.cpp, about 10 minutes; not part of make install)")
LLAMA_CPP_FAILED = "llama.cpp peer not timed: it failed in this run (the reason is printed above the table)"


def llama_cpp_decode(gguf_path: Path, new_tokens: int, threads: int, seed: int = 0) -> tuple[float, float]:
    """(tokens/s, seconds) of llama.cpp's greedy decoding of exactly ``new_tokens`` at
    batch 1 after a ``PROMPT_TOKENS``-token prompt, as ``decode_tokens_per_s`` times torch."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=PROMPT_TOKENS + new_tokens + 16, n_threads=threads,
                n_threads_batch=threads, n_batch=PROMPT_TOKENS, verbose=False)
    prompt = torch.randint(0, llm.n_vocab(), (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(seed)).tolist()

    def generate(count: int) -> int:
        llm.reset()
        for produced, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), start=1):
            if produced == count:  # the generator never stops on its own at end-of-sequence
                return produced
        return produced

    generate(2)  # warm-up
    return _median_run(lambda: generate(new_tokens), REPEATS)


def _peer_command(gguf_path: Path, new_tokens: int, threads: int) -> list[str]:
    code = "import sys; from fpbench.bench.e2e import _peer_main; _peer_main(sys.argv[1:])"
    return [sys.executable, "-c", code, str(gguf_path), str(new_tokens), str(threads)]


def _peer_main(argv: list[str]) -> None:
    """The child's side of ``llama_cpp_peer``: one JSON line with the timing."""
    tps, seconds = llama_cpp_decode(Path(argv[0]), int(argv[1]), int(argv[2]))
    print(json.dumps({"tokens_per_s": tps, "seconds": seconds}))


def llama_cpp_peer(gguf_path: Path, new_tokens: int, threads: int) -> tuple[float, float]:
    """``llama_cpp_decode`` in a child process; a one-line FpbenchError if it fails or dies."""
    done = subprocess.run(_peer_command(gguf_path, new_tokens, threads), capture_output=True, text=True)
    if done.returncode != 0:
        if done.returncode < 0:
            why = f"killed by {signal.Signals(-done.returncode).name}"
        else:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            why = f"exit status {done.returncode}: {last}"
        raise FpbenchError(f"llama.cpp peer failed in its own process ({why}); the other rows are kept. "
                           "Rebuild llama-cpp-python (on a CPU with AMX, without llama.cpp's AMX code: see "
                           "the README's CMAKE_ARGS) or uninstall it to skip the peer")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["tokens_per_s"], result["seconds"]


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def run_e2e(new_tokens: int = 128, out_dir: str | None = None, progress: bool = True,
            shape: dict | None = None, include_default: bool = True) -> list[dict]:
    records = measure_model(f"{RANDOM_MODEL}-1.1b" if shape is None else RANDOM_MODEL, random_llama(shape),
                            new_tokens, progress)
    if include_default:
        from fpbench.models import default_gguf_path, load_model

        loaded = load_model(None)
        records += measure_model(loaded.name, loaded.model, new_tokens, progress)
        if llama_cpp_available():
            gguf = default_gguf_path()
            try:
                tps, seconds = llama_cpp_peer(gguf, new_tokens, torch.get_num_threads())
                records.append(_record(loaded.name, "llama.cpp (Q4_1 GGUF)", "llama.cpp", tps, seconds,
                                       gguf.stat().st_size))
            except FpbenchError as exc:
                print(exc, file=sys.stderr)
    env = environment() | {"new_tokens": new_tokens, "batch": 1, "repeats": REPEATS, "time": utc_now()}
    for model_name in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model_name]
        # ratios within the loop the model's dense rows ran in (the compiled one where it applies)
        by_variant = {r["variant"]: r["tokens_per_s"] for r in rows if r["loop"] == rows[0]["loop"]}
        best_dense = max(by_variant["fp32"], by_variant["bf16"])
        for record in rows:
            record.update(env, speedup_vs_bf16=round(record["tokens_per_s"] / by_variant["bf16"], 3),
                          speedup_vs_best_dense=round(record["tokens_per_s"] / best_dense, 3))
    if out_dir:
        append_jsonl(Path(out_dir) / "e2e.jsonl", records, E2E_BENCH.name)
    return records


def e2e_table(records: list[dict]) -> str:
    """The records as a table, then the FP6 kernel's ratio to llama.cpp, or how to add it."""
    import pandas as pd

    columns = ["model", "variant", "loop", "tokens_per_s", "ms_per_token", "speedup_vs_bf16",
               "speedup_vs_best_dense", "model_bytes"]
    text = pd.DataFrame(records)[columns].to_markdown(index=False)
    main_loop: dict = {}  # per model, the loop its dense rows ran in
    for r in records:
        main_loop.setdefault(r["model"], r.get("loop"))
    peers = {(r["model"], r["variant"]): r["tokens_per_s"] for r in records
             if r.get("loop") in (main_loop[r["model"]], "llama.cpp")}
    llama = [(model, tps) for (model, variant), tps in peers.items() if variant.startswith("llama.cpp")]
    for model, tps in llama:
        for variant, label in (("fp6_kernel", "FP6 kernel"), ("fp6_kernel+head", "FP6 kernel with FP6 head")):
            if (model, variant) in peers:
                text += (f"\n{model}: {label} {peers[(model, variant)]:.1f} tokens/s = "
                         f"{peers[(model, variant)] / tps:.2f}x llama.cpp's {tps:.1f} (same run, same threads)")
    if not llama and not llama_cpp_available():
        text += "\n" + LLAMA_CPP_MISSING
    elif not llama and any(not r["model"].startswith(RANDOM_MODEL) for r in records):  # the peer ran for these
        text += "\n" + LLAMA_CPP_FAILED
    return text
