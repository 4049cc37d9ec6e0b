"""The record schema: which fields each kind of record holds, and their JSON types.

A record is a flat JSON object (one line of a JSONL file). Each kind lists the fields it
must hold and the optional fields it may hold, with the types they take. Fields not
listed are allowed (task families add their own details: stderr, confidence bounds,
token counts), but a listed field must have its type. The store checks records twice:
writers before appending (a writer's bug is an error, never a silent bad line) and
readers line by line (a line that is not a record of the file's kind, such as ``{}`` or
some other program's JSON, is skipped with the warning a truncated line gets).

Files and kinds: ``results.jsonl`` holds ``result`` records (``accuracy`` rows from
``fpbench run``/``sweep``, ``analyze`` rows whose task starts with ``analyze-``),
``sweeps.jsonl`` holds ``sweep`` rows, and ``fpbench bench`` writes ``kernel_bench``,
``e2e_bench`` and ``generation_bench`` rows to its own files.
"""

from __future__ import annotations

from dataclasses import dataclass

from fpbench.errors import FpbenchError

NONE = type(None)
STR, INT, NUM, BOOL, OBJECT = (str,), (int,), (int, float), (bool,), (dict,)


def nullable(types: tuple) -> tuple:
    return types + (NONE,)


@dataclass(frozen=True)
class RecordKind:
    name: str
    required: dict  # field -> accepted types
    optional: dict

    @property
    def fields(self) -> dict:
        return {**self.optional, **self.required}


# Where and when: the fields of ``records.environment.environment()``. Optional on every
# kind, since records written before a field existed must stay readable.
ENVIRONMENT = {
    "fpbench_version": STR, "torch_version": STR, "transformers_version": nullable(STR),
    "python_version": STR, "git_rev": nullable(STR), "cpu": STR, "cpu_flags": STR, "threads": INT,
}

# Latency of the scheme on a compiled kernel, measured where it runs (DESIGN.md, "Accuracy
# beside latency"): reserved on accuracy rows; a simulated-only scheme has none.
LATENCY = {
    "decode_ms_per_token": NUM, "decode_tokens_per_s": NUM, "prefill_tokens_per_s": NUM,
    "weight_bytes": INT, "kernel_isa": STR, "cpu": STR,
}

# Every field of ``quant.scheme.Scheme.fields()``, the scheme's name included.
SCHEME_FIELDS = {
    "scheme": STR, "format": STR, "granularity": nullable(STR), "algo": STR, "clip": STR,
    "calib": nullable(STR), "act_format": nullable(STR), "act_granularity": nullable(STR), "act_clip": STR,
}

ACCURACY = RecordKind(
    "accuracy",
    required={"model": STR, "scheme": STR, "format": STR, "task": STR, "metric": STR, "value": NUM,
              "n": INT, "seed": INT, "time": STR},
    optional={**ENVIRONMENT, **LATENCY, **SCHEME_FIELDS,
              "model_source": nullable(STR), "caveat": nullable(STR), "include_head": BOOL,
              "limit": nullable(INT), "seqlen": nullable(INT), "backend": STR, "run_key": STR, "task_key": STR,
              "family": STR, "options": OBJECT, "bits_per_weight": NUM,
              # timings, seconds and rates
              "quantize_s": NUM, "task_s": NUM, "eval_s": NUM, "tokens_per_s": NUM, "items_per_s": NUM},
)

ANALYZE = RecordKind(
    "analyze",
    required={"model": STR, "scheme": STR, "format": STR, "task": STR, "metric": STR, "value": NUM, "time": STR},
    optional={"model_source": nullable(STR), "caveat": nullable(STR), "n": nullable(INT), "limit": nullable(INT),
              "bits_per_weight": nullable(NUM), "quantize_s": nullable(NUM),
              "distribution": STR, "bits": INT, "best_clip_std": NUM, "mse": NUM,  # synthetic
              "kind": STR, "calib": nullable(STR), "calib_samples": INT, "calib_seqlen": INT},  # layers
)

SWEEP = RecordKind(
    "sweep",
    required={"sweep": STR, "runs": INT, "ran": INT, "skipped": INT, "failed": INT, "records": INT,
              "finished": STR},
    optional={"config": nullable(STR), "config_sha": STR, "shard": nullable(STR), "force": BOOL,
              "wall_s": NUM, "estimate_s": NUM, "started": STR, "fpbench_version": STR},
)

KERNEL_BENCH = RecordKind(
    "kernel_bench",
    required={"kernel": STR, "M": INT, "N": INT, "K": INT, "median_ms": NUM, "time": STR},
    optional={**ENVIRONMENT, "min_ms": NUM, "gbps": NUM, "roofline_fraction": NUM, "weight_bytes": INT,
              "copies": INT, "activation_dtype": STR, "kernel_isa": STR, "bandwidth_gbps": NUM, "vs_bf16": NUM,
              "stream_gbps": NUM, "stream_fraction": NUM, "cache_gbps": NUM},
)

E2E_BENCH = RecordKind(
    "e2e_bench",
    required={"model": STR, "variant": STR, "tokens_per_s": NUM, "time": STR},
    optional={**ENVIRONMENT, "loop": STR, "ms_per_token": NUM, "decode_s": NUM, "model_bytes": INT,
              "new_tokens": INT, "batch": INT, "repeats": INT, "speedup_vs_bf16": NUM, "speedup_vs_best_dense": NUM},
)

GENERATION_BENCH = RecordKind(
    "generation_bench",
    required={"bench": STR, "model": STR, "task": STR, "problems": INT, "naive_seconds": NUM,
              "fpbench_seconds": NUM, "time": STR},
    optional={"prompt_mode": STR, "max_new_tokens": INT, "naive_batch_size": INT, "batch_size": INT,
              "speedup": NUM, "naive_new_tokens": INT, "fpbench_new_tokens": INT, "naive_tokens_per_s": NUM,
              "fpbench_tokens_per_s": NUM, "identical_answers": INT, "decode_step_ms": OBJECT,
              "decode_step_context": INT, "dtype": STR, "environment": OBJECT},
)

KINDS = {kind.name: kind for kind in (ACCURACY, ANALYZE, SWEEP, KERNEL_BENCH, E2E_BENCH, GENERATION_BENCH)}
# ``result``: the kinds that share results.jsonl (the report reads both).
RESULT = "result"
FILE_KINDS = (RESULT, *KINDS)


def _type_names(types: tuple) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "true/false", dict: "object", NONE: "null"}
    if int in types and float in types:
        types = tuple(t for t in types if t is not int)
    return " or ".join(names[t] for t in types)


def _is(value, types: tuple) -> bool:
    # bool is an int to Python but not a count or a measurement to a reader.
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def kind_of(record: dict, kind: str) -> RecordKind:
    """The schema a record of a file of ``kind`` follows."""
    if kind not in FILE_KINDS:
        raise FpbenchError(f"record kind {kind!r} is unknown; use one of {', '.join(FILE_KINDS)}")
    if kind == RESULT:
        task = record.get("task")
        return ANALYZE if isinstance(task, str) and task.startswith("analyze-") else ACCURACY
    return KINDS[kind]


def validate(record, kind: str = RESULT) -> str | None:
    """What is wrong with ``record`` as a record of ``kind`` (one short phrase), or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    schema = kind_of(record, kind)
    missing = [name for name in schema.required if name not in record]
    if missing:
        names = ", ".join(map(repr, missing[:3])) + (", ..." if len(missing) > 3 else "")
        return f"{schema.name} field(s) {names} missing"
    for name, types in schema.fields.items():
        if name in record and not _is(record[name], types):
            value = record[name]
            return f"{schema.name} field {name!r} is {type(value).__name__} {str(value)[:20]!r}, " \
                   f"not {_type_names(types)}"
    return None


def check(record, kind: str = RESULT) -> None:
    """Raise if ``record`` is not a valid record of ``kind``: for writers, whose records
    must be right before they reach a file."""
    problem = validate(record, kind)
    if problem:
        raise FpbenchError(f"refusing to write an invalid {kind} record ({problem}); the code that built "
                           "it must produce the schema of fpbench/records/schema.py")
