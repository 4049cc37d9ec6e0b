"""Sweeps: a YAML grid of models x schemes x tasks, expanded into runs, sharded, resumed.

A sweep config (``configs/*.yaml``) is validated completely before any model loads:
unknown keys, unknown formats, bad group sizes, unknown tasks, missing calibration data
and schemes a kernel backend cannot run are one-line errors. The schema is documented
by ``CONFIG_KEYS`` (top level), the Scheme's fields, ``RUN_FIELD_KEYS`` and ``EXTRA_KEYS``.
It expands into a run list in a fixed order (model, then seed, then scheme, then the
config's task order); one run is one ``RunConfig`` (one model x one scheme x the tasks
that share a limit), so a model is loaded and quantized once per scheme.

Resume is per task: every record carries ``task_key`` (``RunConfig.task_key``, a hash of
the configuration restricted to that task plus the code version). A task whose key is in
the results store is skipped; a run with no task left is skipped; ``force`` redoes all.
A crash (even ``kill -9``) loses only the task being evaluated, because the runner
appends each task's records as soon as they exist.

``shard=(i, n)`` keeps runs i-1, i-1+n, i-1+2n, ... of the full list (round-robin, so
shards get a similar mix of cheap and expensive runs); the n shards cover the list
exactly once and can run on different machines into different results folders, merged
afterwards by ``fpbench report DIR1 DIR2 ... --out DIR``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from fpbench import __version__
from fpbench import runner as runner_module
from fpbench.errors import FpbenchError
from fpbench.records.environment import utc_now
from fpbench.records.store import SWEEPS_JSONL, ResultStore
from fpbench.options import default_act_granularity, default_granularity, run_field_keys, run_options, sweep_keys
from fpbench.runner import RunConfig, with_latency
from fpbench.quant.scheme import Granularity, Scheme
from fpbench.data.sources import check_tasks_data
from fpbench.eval.base import get_task

# Top-level keys of a sweep config, with what they hold (the documentation of the schema).
CONFIG_KEYS = {
    "name": "label of the sweep (default: the file name)",
    "description": "free text",
    "models": "list of models: 'default' (the embedded SmolLM2), hub ids, local dirs, .gguf files",
    "schemes": "list of schemes: a name (int4/g128/rtn) or a mapping of scheme keys",
    "tasks": "list of task names (fpbench/data/tasks/*.yaml)",
    "limit": "items per task: an integer, null (all), or a mapping task -> integer|null",
    "seqlen": "perplexity window length in tokens (null: the task default)",
    "seeds": "list of seeds (each one is a separate run); or 'seed: N'",
    "seed": "a single seed (default 0)",
    "include_head": "also quantize the output head (default false)",
    "data_dir": "folder of local dataset copies (default: FPBENCH_DATA_DIR)",
    "latency": "true: also run the 'latency' task (decode and prefill speed on this CPU) for every scheme "
               "that runs on a kernel; false: not even for backend: kernel runs, which measure it by default "
               "(a scheme mapping may say latency: true/false too)",
    "options": "stage options for every run (GPTQ, generation, zero-shot...): keys of fpbench.options",
}

# Keys of a scheme mapping or of ``options``: the stage options of the options table;
# scheme-mapping keys that set a field of the run (backend). Both come from fpbench.options.
EXTRA_KEYS = sweep_keys()
RUN_FIELD_KEYS = run_field_keys()


# Rough per-stage seconds for the dry-run estimate when the results store has no timing
# for a model/task yet: the default 135M model on 2 CPU cores (AMD EPYC, AVX2), measured
# for the quick tier (10 s per 2048-token perplexity window, 0.7 s per zero-shot item,
# about 15 s per generated summary, 2-3 s per RTN pass, GPTQ about 1 minute plus 3.5 s
# per 512-token calibration window). Other models and machines differ, and the dry run
# says when it is guessing; timings in the store replace these.
DEFAULT_LOAD_S = 5.0
DEFAULT_QUANTIZE_S = {"rtn": 3.0}
DEFAULT_GPTQ_S = (60.0, 3.5)  # fixed seconds, seconds per calibration window of 512 tokens
DEFAULT_ITEM_S = {"perplexity": 10.0, "zeroshot": 0.7, "codegen": 8.0, "summarization": 15.0}
DEFAULT_ITEM_S_OTHER = 5.0
DEFAULT_LATENCY_S = 25.0  # the latency task: warm-up, three decode passes, three prefills
DEFAULT_ITEMS = 100  # items assumed for a task without a limit and without history


@dataclass(frozen=True)
class SchemeSpec:
    """One entry of ``schemes``: the Scheme, its RunConfig fields and its extra options."""

    scheme: Scheme
    extra: tuple = ()  # sorted (key, value) pairs: stage options of this scheme
    run_fields: tuple = ()  # sorted (key, value) pairs for RunConfig fields (backend)

    @property
    def label(self) -> str:
        suffix = ",".join(f"{k}={v}" for k, v in self.run_fields + self.extra)
        return self.scheme.name + (f"[{suffix}]" if suffix else "")


@dataclass
class SweepConfig:
    name: str
    path: str
    models: list[str]
    schemes: list[SchemeSpec]
    tasks: list[str]
    limits: dict  # task -> int | None
    seqlen: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    include_head: bool = False
    data_dir: str | None = None
    options: dict = field(default_factory=dict)
    latency: bool | None = None  # None: latency for kernel runs only (as `fpbench run`)
    digest: str = ""  # hash of the file's content, for the sweep log


@dataclass
class PlannedRun:
    config: RunConfig
    label: str  # scheme label (with its extra options)
    done_tasks: list[str]
    pending_tasks: list[str]
    estimate_s: float
    estimate_from_history: bool = False  # False: rough defaults (see DEFAULT_*_S)

    @property
    def model(self) -> str:
        return self.config.model or "default"


def _fail(path, message: str) -> FpbenchError:
    return FpbenchError(f"{path}: {message}")


def _scheme_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(Scheme)}


def _check_options(options: dict, table: dict) -> None:
    for key, value in options.items():
        table[key].check(value)


def parse_scheme_entry(entry) -> SchemeSpec:
    """A scheme name, or a mapping of scheme keys (``name`` may give a base name). Keys go
    to the Scheme when it has such a field, else to RunConfig fields (RUN_FIELD_KEYS), else
    to the run's stage options (EXTRA_KEYS)."""
    if isinstance(entry, str):
        return _with_default_calib(SchemeSpec(Scheme.parse(entry)))
    if not isinstance(entry, dict) or not entry:
        raise FpbenchError(f"a scheme is a name such as int4/g128/rtn or a mapping "
                           f"such as {{format: int4, granularity: 'group:128'}}, not {entry!r}")
    scheme_keys = _scheme_fields()
    allowed = sorted(scheme_keys | set(RUN_FIELD_KEYS) | set(EXTRA_KEYS) | {"name"})
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        raise FpbenchError(f"unknown scheme key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")
    direct = {k: v for k, v in entry.items() if k in scheme_keys}
    run_fields = {k: v for k, v in entry.items() if k in RUN_FIELD_KEYS and k not in scheme_keys}
    extra = {k: v for k, v in entry.items() if k in EXTRA_KEYS and k not in scheme_keys}
    _check_options(run_fields, RUN_FIELD_KEYS)
    _check_options(extra, EXTRA_KEYS)
    if "format" in direct and "granularity" not in direct:
        direct["granularity"] = default_granularity(direct["format"])
    if direct.get("act_format") and not direct.get("act_granularity"):
        direct["act_granularity"] = default_act_granularity(direct["act_format"])
    if isinstance(direct.get("granularity"), str):
        direct["granularity"] = Granularity.parse(direct["granularity"])
    elif isinstance(direct.get("granularity"), int):
        raise FpbenchError(f"granularity {direct['granularity']!r} needs a kind: "
                           f"write 'group:{direct['granularity']}'")
    if "name" in entry:
        scheme = Scheme.parse(str(entry["name"]))
        if direct:
            scheme = scheme.with_(**direct)
    elif "format" not in direct:
        raise FpbenchError("a scheme mapping needs 'format' (or 'name')")
    else:
        scheme = Scheme(**direct)
    # A default (backend: simulate, damp: 0.01) is the same run (and key) as leaving it out.
    run_fields = {k: v for k, v in run_fields.items() if v != RUN_FIELD_KEYS[k].field_default}
    extra = run_options(extra)
    return _with_default_calib(SchemeSpec(scheme, tuple(sorted(extra.items())), tuple(sorted(run_fields.items()))))


def _with_default_calib(spec: SchemeSpec) -> SchemeSpec:
    """GPTQ always calibrates on something; name it, as ``fpbench run`` does."""
    if spec.scheme.algo == "gptq" and not spec.scheme.calib:
        return dataclasses.replace(spec, scheme=spec.scheme.with_(calib=spec.scheme.calib_source))
    return spec


def check_resources(config: SweepConfig) -> None:
    """What each scheme needs besides the model, checked before any model loads:
    calibration text (GPTQ, static activation scales) and kernel support."""
    from fpbench.quant.calibration import check_source

    checked = set()
    for spec in config.schemes:
        scheme = spec.scheme
        needs_calib = scheme.algo == "gptq" or getattr(scheme, "act_granularity", None) == "tensor-static"
        source = scheme.calib_source
        try:
            if needs_calib and source not in checked:
                check_source(source, config.data_dir)
                checked.add(source)
            if dict(spec.run_fields).get("backend") == "kernel":
                from fpbench.kernels.linear import check_kernel_scheme

                check_kernel_scheme(scheme)
        except FpbenchError as exc:
            raise _fail(config.path, f"scheme {spec.label}: {exc}") from exc


def _limit(value, where: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FpbenchError(f"{where} must be a positive integer or null, not {value!r}")
    return value


def load_config(path: str | Path, limit_override: str | None = None,
                data_dir_override: str | None = None) -> SweepConfig:
    """Read and validate a sweep config; loads no model and no data. ``limit_override``
    ('N' or 'none') replaces the config's limit for every task (e.g. for a full run);
    ``data_dir_override`` its data_dir."""
    path = Path(path)
    if not path.is_file():
        raise FpbenchError(f"sweep config {path} not found; see configs/ for examples")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _fail(path, f"not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise _fail(path, "a sweep config is a mapping with at least models, schemes and tasks")
    unknown = [k for k in raw if k not in CONFIG_KEYS]
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r}; allowed keys: {', '.join(CONFIG_KEYS)}")
    for required in ("schemes", "tasks"):
        if not raw.get(required):
            raise _fail(path, f"'{required}' is missing or empty")

    models = raw.get("models", ["default"])
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise _fail(path, f"models must be a list of model names, not {models!r}")
    for model in models:
        looks_local = model.endswith(".gguf") or model.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(model).expanduser().exists():
            raise _fail(path, f"model {model} not found; fix the path or use a hub id")

    schemes = raw["schemes"]
    if not isinstance(schemes, list):
        raise _fail(path, "schemes must be a list")
    specs = []
    for i, entry in enumerate(schemes):
        try:
            specs.append(parse_scheme_entry(entry))
        except FpbenchError as exc:
            raise _fail(path, f"schemes[{i}] {entry!r}: {exc}") from exc
    labels = [s.label for s in specs]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise _fail(path, f"scheme {duplicated[0]} is listed twice; remove one")

    tasks = raw["tasks"]
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise _fail(path, "tasks must be a list of task names")
    if len(set(tasks)) != len(tasks):
        raise _fail(path, "a task is listed twice; remove one")
    for task in tasks:
        try:
            get_task(task)
        except FpbenchError as exc:
            raise _fail(path, str(exc)) from exc

    limit = raw.get("limit")
    if limit_override is not None:
        text = str(limit_override).strip().lower()
        if text not in ("none", "null", "all") and not text.isdigit():
            raise FpbenchError(f"bad limit override {limit_override!r}; give a positive integer or 'none'")
        limit = None if not text.isdigit() else int(text)
    if isinstance(limit, dict):
        stray = [t for t in limit if t not in tasks]
        if stray:
            raise _fail(path, f"limit names task {stray[0]!r}, which is not in tasks")
        limits = {t: _limit(limit.get(t), f"{path}: limit.{t}") for t in tasks}
    else:
        one = _limit(limit, f"{path}: limit")
        limits = {t: one for t in tasks}

    seqlen = raw.get("seqlen")
    if seqlen is not None and (isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2):
        raise _fail(path, f"seqlen must be an integer >= 2 or null, not {seqlen!r}")
    if "seed" in raw and "seeds" in raw:
        raise _fail(path, "give either seed or seeds, not both")
    seeds = raw.get("seeds", [raw.get("seed", 0)])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                          for s in seeds):
        raise _fail(path, f"seeds must be a list of integers, not {seeds!r}")
    include_head = raw.get("include_head", False)
    if not isinstance(include_head, bool):
        raise _fail(path, f"include_head must be true or false, not {include_head!r}")
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise _fail(path, f"options must be a mapping, not {options!r}")
    unknown = [k for k in options if k not in EXTRA_KEYS]
    if unknown:
        raise _fail(path, f"unknown option {unknown[0]!r}; allowed options: {', '.join(EXTRA_KEYS)}")
    try:
        _check_options(options, EXTRA_KEYS)
    except FpbenchError as exc:
        raise _fail(path, f"options: {exc}") from exc
    latency = raw.get("latency")
    if not isinstance(latency, (bool, type(None))):
        raise _fail(path, f"latency must be true or false, not {latency!r}")
    data_dir = data_dir_override or raw.get("data_dir")
    if data_dir is not None and not Path(str(data_dir)).expanduser().is_dir():
        raise _fail(path, f"data_dir {data_dir} is not a folder")
    return SweepConfig(
        name=str(raw.get("name") or path.stem), path=str(path), models=models, schemes=specs,
        tasks=tasks, limits=limits, seqlen=seqlen, seeds=seeds, include_head=include_head,
        data_dir=str(data_dir) if data_dir else None, options=options, latency=latency,
        digest=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


def expand(config: SweepConfig, out_dir: str = "results", progress: bool = True) -> list[tuple[RunConfig, str]]:
    """The full run list, in a fixed order: (RunConfig, scheme label) pairs."""
    runs = []
    for model in config.models:
        for seed in config.seeds:
            for spec in config.schemes:
                # Tasks with the same limit share a run (one model load + one quantization).
                by_limit: dict = {}
                for task in config.tasks:
                    by_limit.setdefault(config.limits[task], []).append(task)
                run_fields = dict(spec.run_fields)
                scheme_latency = run_fields.pop("latency", None)
                latency = config.latency if scheme_latency is None else bool(scheme_latency)
                backend = run_fields.get("backend", RUN_FIELD_KEYS["backend"].field_default)
                for number, (limit, tasks) in enumerate(by_limit.items()):
                    # the latency task ignores limits: it joins the first run (one model load)
                    tasks = with_latency(tasks, spec.scheme, backend, latency) if number == 0 else tasks
                    runs.append((RunConfig(
                        scheme=spec.scheme, tasks=tasks, model=None if model == "default" else model,
                        limit=limit, seqlen=config.seqlen, data_dir=config.data_dir, seed=seed,
                        include_head=config.include_head, out_dir=str(out_dir), progress=progress,
                        options=run_options(dict(config.options) | dict(spec.extra)), **run_fields,
                    ), spec.label))
    return runs


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 1 <= int(index) <= int(count):
        raise FpbenchError(f"bad shard {text!r}; write I/N with 1 <= I <= N, e.g. --shard 2/4")
    return int(index), int(count)


def select_shard(runs: list, shard: tuple[int, int] | None) -> list:
    """Round-robin: shard i of n keeps runs i-1, i-1+n, ...; together they cover each run once."""
    if shard is None:
        return list(runs)
    index, count = shard
    return list(runs[index - 1::count])


class Estimator:
    """Seconds per run, from the store's history where it has some, else rough defaults."""

    def __init__(self, records: list[dict]):
        self.item_s: dict = {}  # (model, task) -> [seconds per item]
        self.task_s: dict = {}  # (model, task) -> [seconds per task], for tasks without items
        self.quantize_s: dict = {}  # (model, algo) -> [seconds]
        seen_tasks = set()
        for r in records:
            model, task = r.get("model"), r.get("task")
            if (r.get("task_key") or r.get("run_key"), task) in seen_tasks:
                continue  # one timing per task, not one per metric
            seen_tasks.add((r.get("task_key") or r.get("run_key"), task))
            if isinstance(r.get("task_s"), (int, float)):
                self.task_s.setdefault((model, task), []).append(r["task_s"])
            if isinstance(r.get("task_s"), (int, float)) and isinstance(r.get("n"), (int, float)) and r["n"] > 0:
                self.item_s.setdefault((model, task), []).append(r["task_s"] / r["n"])
            if isinstance(r.get("quantize_s"), (int, float)):
                self.quantize_s.setdefault((model, r.get("algo")), []).append(r["quantize_s"])

    @staticmethod
    def _model_name(spec: str | None) -> str:
        from fpbench.models import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME if spec in (None, "", "default") else spec

    @staticmethod
    def _default_quantize_s(config: RunConfig) -> float:
        if config.scheme.algo == "gptq":
            gptq = config.stage("gptq")
            fixed, per_window = DEFAULT_GPTQ_S
            return fixed + per_window * gptq.calib_samples * gptq.calib_seqlen / 512
        return DEFAULT_QUANTIZE_S.get(config.scheme.algo, 10.0)

    def run_seconds(self, config: RunConfig, tasks: list[str]) -> tuple[float, bool]:
        """(estimated seconds, whether every stage's estimate comes from history)."""
        if not tasks:
            return 0.0, True
        model = self._model_name(config.model)
        history = self.quantize_s.get((model, config.scheme.algo))
        from_history = bool(history)
        seconds = DEFAULT_LOAD_S + (statistics.median(history) if history else self._default_quantize_s(config))
        for task in tasks:
            if get_task(task).family == "latency":  # a fixed amount of work, whatever the limit
                history = self.task_s.get((model, task))
                from_history = from_history and bool(history)
                seconds += statistics.median(history) if history else DEFAULT_LATENCY_S
                continue
            per_item = self.item_s.get((model, task))
            if per_item:
                per_item = statistics.median(per_item)
            else:
                from_history = False
                per_item = DEFAULT_ITEM_S.get(get_task(task).family, DEFAULT_ITEM_S_OTHER)
            seconds += per_item * (config.limit or DEFAULT_ITEMS)
        return seconds, from_history


def plan(config: SweepConfig, out_dir: str = "results", shard: tuple[int, int] | None = None,
         force: bool = False, progress: bool = True) -> list[PlannedRun]:
    """The runs of this shard, each with its done and pending tasks and an estimate."""
    check_resources(config)
    records = ResultStore(out_dir).read()
    done_keys = {r.get("task_key") for r in records if r.get("task_key")}
    # Records written before task keys existed: a whole-run key covers all its tasks.
    done_runs = {(r.get("run_key"), r.get("task")) for r in records}
    estimator = Estimator(records)
    planned = []
    for run_config, label in select_shard(expand(config, out_dir, progress), shard):
        done = [] if force else [
            t for t in run_config.tasks
            if run_config.task_key(t) in done_keys or (run_config.key(), t) in done_runs
        ]
        pending = [t for t in run_config.tasks if t not in done]
        seconds, from_history = estimator.run_seconds(run_config, pending)
        planned.append(PlannedRun(run_config, label, done, pending, seconds, from_history))
    return planned


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def plan_table(planned: list[PlannedRun]) -> str:
    import pandas as pd

    rows = [{
        "#": i, "model": p.model, "scheme": p.label, "seed": p.config.seed, "limit": p.config.limit,
        "tasks to run": ",".join(p.pending_tasks) or "-", "done": ",".join(p.done_tasks) or "-",
        "estimate": _duration(p.estimate_s) if p.pending_tasks else "-",
    } for i, p in enumerate(planned, 1)]
    return pd.DataFrame(rows).to_markdown(index=False)


def estimate_text(planned: list[PlannedRun]) -> str:
    todo = [p for p in planned if p.pending_tasks]
    guessed = sum(not p.estimate_from_history for p in todo)
    source = ("from timings in the results store" if not guessed else
              f"{guessed} of {len(todo)} runs partly from rough defaults: no stored timings yet")
    return (f"{len(planned)} runs, {len(todo)} to run, {len(planned) - len(todo)} already done; "
            f"estimated time {_duration(sum(p.estimate_s for p in todo))} ({source})")


@dataclass
class SweepSummary:
    runs: int = 0
    ran: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # (label, message)
    records: int = 0
    wall_s: float = 0.0
    estimate_s: float = 0.0
    rows: list = field(default_factory=list)  # one per run: what happened


def run_sweep(config: SweepConfig, out_dir: str = "results", shard: tuple[int, int] | None = None,
              force: bool = False, progress: bool = True, echo=print) -> SweepSummary:
    """Run every pending task of this shard's runs; failures are reported, not fatal."""
    started_at = utc_now()
    started = time.perf_counter()
    planned = plan(config, out_dir, shard, force, progress)
    pending = [p for p in planned if p.pending_tasks]
    # The pending tasks' data before any model loads (else every run would fail after loading).
    check_tasks_data(sorted({t for p in pending for t in p.pending_tasks}), config.data_dir)
    summary = SweepSummary(runs=len(planned), skipped=len(planned) - len(pending),
                           estimate_s=sum(p.estimate_s for p in pending))
    echo(f"sweep {config.name}: {estimate_text(planned)}")
    remaining_estimate = summary.estimate_s
    spent_actual = spent_estimate = 0.0
    bar = tqdm(pending, desc=f"sweep {config.name}", unit="run", disable=not progress or not pending, position=0)
    for number, item in enumerate(bar, 1):
        # ETA: the remaining estimate, corrected by how fast the finished runs went.
        speed = spent_actual / spent_estimate if spent_estimate else 1.0
        bar.set_postfix_str(f"{item.label} | eta ~{_duration(remaining_estimate * speed)}")
        run_config = dataclasses.replace(item.config, tasks=item.pending_tasks)
        run_started = time.perf_counter()
        status = "ok"
        try:
            records = runner_module.run(run_config)
            summary.records += len(records)
            summary.ran += 1
        except KeyboardInterrupt:
            bar.close()
            raise
        except Exception as exc:  # noqa: BLE001 - one failed run must not stop the sweep
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not isinstance(exc, FpbenchError):
                message = f"{type(exc).__name__}: {message}"
            summary.failed.append((item.label, message))
            status = f"failed: {message}"
            (bar.write if progress else echo)(f"run {item.model} {item.label} failed: {message}")
        seconds = time.perf_counter() - run_started
        spent_actual += seconds
        spent_estimate += item.estimate_s
        remaining_estimate -= item.estimate_s
        (bar.write if progress else echo)(
            f"[{number}/{len(pending)}] {item.label} on {','.join(item.pending_tasks)}: {status} "
            f"in {_duration(seconds)} (estimated {_duration(item.estimate_s)})")
        summary.rows.append({"model": item.model, "scheme": item.label, "seed": item.config.seed,
                             "tasks": ",".join(item.pending_tasks), "seconds": round(seconds, 1),
                             "estimate": round(item.estimate_s, 1), "status": status})
    bar.close()
    summary.wall_s = time.perf_counter() - started
    ResultStore(out_dir).append_log(SWEEPS_JSONL, {
        "sweep": config.name, "config": config.path, "config_sha": config.digest,
        "shard": f"{shard[0]}/{shard[1]}" if shard else None, "force": force, "runs": summary.runs,
        "ran": summary.ran, "skipped": summary.skipped, "failed": len(summary.failed),
        "records": summary.records, "wall_s": round(summary.wall_s, 1),
        "estimate_s": round(summary.estimate_s, 1), "started": started_at,
        "finished": utc_now(),
        "fpbench_version": __version__,
    })
    return summary


def summary_text(summary: SweepSummary) -> str:
    import pandas as pd

    lines = []
    if summary.rows:
        lines += [pd.DataFrame(summary.rows).to_markdown(index=False), ""]
    lines.append(
        f"{summary.runs} runs: {summary.ran} ran, {summary.skipped} already done, "
        f"{len(summary.failed)} failed; {summary.records} records; wall time "
        f"{_duration(summary.wall_s)} (estimated {_duration(summary.estimate_s)})"
    )
    return "\n".join(lines)

