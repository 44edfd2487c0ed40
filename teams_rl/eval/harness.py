"""Drive lm-evaluation-harness from an `evaluate` config and flatten its results.

A *benchmark* is one entry of `evaluate.tasks`: a key from `evaluate.benchmarks` (which maps it to an
lm-eval task or group, its number of shots and its headline metric) or any lm-eval task/group/tag name.
Shots are set per task before `lm_eval.simple_evaluate` runs, so one call evaluates e.g. ARC 25-shot and
HellaSwag 10-shot together. Group benchmarks (MMLU) report the mean over their subjects (macro, the
Leaderboard v1 number) and the question-weighted mean (micro, lm-eval's group number).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from teams_rl.errors import TeamsRLError

log = logging.getLogger(__name__)

OFFLINE = "offline"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
RESULTS_FILE = "lm_eval_results.json"


@dataclass(frozen=True)
class Benchmark:
    key: str                      # the name used in metrics (arc_challenge, mmlu, ...)
    task: str                     # lm-eval task or group name
    num_fewshot: int | None       # None: the task's own default
    metric: str | None = None     # headline metric; None: no headline (all metrics are still reported)
    average: str = "macro"        # groups: headline = "macro" (mean over subtasks) or "micro" (by size)
    is_group: bool = False


def check_model_ref(value, key: str) -> None:
    """Fail at planning time (before any stage runs) on a model path that does not exist. Built-in names
    and hub ids pass; `teams_rl.models.resolve_model` checks them when the stage loads the model."""
    if value in (None, ""):
        return
    text = str(value)
    if text.startswith(("/", "./", "../", "~")) and not Path(text).expanduser().exists():
        raise TeamsRLError(f"{key}: model path {text} does not exist")


def requested_benchmarks(ecfg) -> list[Benchmark]:
    """`evaluate.tasks` turned into benchmarks (before checking them against lm-eval's task index)."""
    specs = ecfg.get("benchmarks") or {}
    shots_all = ecfg.get("num_fewshot")
    out = []
    for name in ecfg.get("tasks") or []:
        name = str(name)
        spec = specs.get(name)
        if spec is None:
            out.append(Benchmark(key=name, task=name, num_fewshot=shots_all))
            continue
        shots = shots_all if shots_all is not None else spec.get("num_fewshot")
        out.append(Benchmark(key=name, task=str(spec.task), num_fewshot=None if shots is None else int(shots),
                             metric=spec.get("metric"), average=str(spec.get("average", "macro"))))
    if not out:
        raise TeamsRLError("evaluate.tasks is empty: name at least one benchmark or lm-eval task")
    return out


def include_paths(ecfg) -> list[Path]:
    raw = ecfg.get("include_path")
    if raw in (None, ""):
        return []
    items = [raw] if isinstance(raw, str) else list(raw)
    paths = [TASKS_DIR if str(p) == OFFLINE else Path(str(p)).expanduser() for p in items]
    for p in paths:
        if not p.is_dir():
            raise TeamsRLError(f"evaluate.include_path {p} is not a folder of lm-eval task YAMLs")
    return paths


def task_manager(ecfg):
    """lm-eval's TaskManager over the configured task folders (the built-in index only when asked)."""
    from lm_eval.tasks import TaskManager

    paths = include_paths(ecfg)
    defaults = bool(ecfg.get("include_defaults", not paths))
    return TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=defaults)


def resolve_benchmarks(tm, benches: list[Benchmark]) -> list[Benchmark]:
    """Check every task name against the index; mark groups; expand tags into their tasks."""
    out = []
    for b in benches:
        if b.task not in tm.all_tasks:
            close = difflib.get_close_matches(b.task, tm.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            source = "evaluate.include_path=" + str(tm.include_path) if tm.include_path else "lm-eval's built-in tasks"
            raise TeamsRLError(f"unknown lm-eval task '{b.task}' for evaluate.tasks entry '{b.key}'{hint}; "
                               f"searched {source}")
        if b.task in tm.all_tags:
            out += [Benchmark(key=t, task=t, num_fewshot=b.num_fewshot, metric=b.metric)
                    for t in sorted(tm.task_index[b.task].tags)]
        else:
            out.append(Benchmark(b.key, b.task, b.num_fewshot, b.metric, b.average, b.task in tm.all_groups))
    return out


def load_tasks(tm, benches: list[Benchmark]) -> list:
    """Build lm-eval Task/Group objects with each leaf task's shots set (a task whose own config fixes
    0 shots, like TruthfulQA, keeps 0 — the rule lm-eval's CLI applies to `--num_fewshot`)."""
    objects = []
    for b in benches:
        loaded = tm.load([b.task])
        if b.task in loaded["groups"]:
            objects.append(loaded["groups"][b.task])
        else:
            objects += list(loaded["tasks"].values())
        if b.num_fewshot is None:
            continue
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=int(b.num_fewshot))
    return objects


def model_spec(model_path: str, ecfg) -> tuple[str, dict]:
    """lm-eval model type and model_args for `evaluate.backend` (hf, or vllm on a GPU machine)."""
    backend = str(ecfg.get("backend", "hf"))
    dtype = str(ecfg.get("dtype", "float32"))
    if backend == "hf":
        from teams_rl.models import adapter_base, is_adapter

        args = {"pretrained": model_path, "dtype": dtype}
        if is_adapter(model_path):  # a LoRA adapter: lm-eval applies it to its base model
            args = {"pretrained": adapter_base(model_path), "peft": model_path, "dtype": dtype}
        if ecfg.get("max_length"):
            args["max_length"] = int(ecfg.max_length)
        if ecfg.get("shared_prefix", True):
            from teams_rl.eval.shared_prefix_lm import MODEL_TYPE  # registers the model type with lm-eval

            return MODEL_TYPE, args
        return "hf", args
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise TeamsRLError("evaluate.backend=vllm needs vLLM on a GPU machine: pip install 'teams_rl[gpu]'")
        vcfg = ecfg.get("vllm") or {}
        args = {"pretrained": model_path, "dtype": dtype,
                "tensor_parallel_size": int(vcfg.get("tensor_parallel_size", 1)),
                "gpu_memory_utilization": float(vcfg.get("gpu_memory_utilization", 0.9)),
                "seed": int(ecfg.get("seed", 1234))}
        if vcfg.get("max_model_len"):
            args["max_model_len"] = int(vcfg.max_model_len)
        if vcfg.get("data_parallel_size", 1) != 1:
            args["data_parallel_size"] = int(vcfg.data_parallel_size)
        return "vllm", args
    raise TeamsRLError(f"evaluate.backend must be 'hf' or 'vllm', got '{backend}'")


class _QuietCustomDataset(logging.Filter):
    """lm-eval warns once per task that uses `custom_dataset` (how the offline tasks find their files)
    that `--metadata` exists; that advice does not apply here, so only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _quiet_offline_loader_notice() -> None:
    task_log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _QuietCustomDataset) for f in task_log.filters):
        task_log.addFilter(_QuietCustomDataset())


def run_lm_eval(model_path: str, ecfg, device: str = "cpu") -> tuple[dict, list[Benchmark]]:
    """Evaluate one model on the configured benchmarks; returns (lm-eval results dict, benchmarks)."""
    import lm_eval

    _quiet_offline_loader_notice()
    tm = task_manager(ecfg)
    benches = resolve_benchmarks(tm, requested_benchmarks(ecfg))
    objects = load_tasks(tm, benches)
    model_type, model_args = model_spec(model_path, ecfg)
    log.info("lm-eval: %s (%s) on %s", model_path, model_type,
             ", ".join(f"{b.task} {b.num_fewshot if b.num_fewshot is not None else 'default'}-shot" for b in benches))
    batch_size = ecfg.get("batch_size", 1)
    seed = int(ecfg.get("seed", 1234))
    try:
        results = lm_eval.simple_evaluate(
            model=model_type,
            model_args=model_args,
            tasks=objects,
            num_fewshot=None,
            batch_size="auto" if model_type == "vllm" else batch_size,   # vLLM schedules its own batches
            device=device,
            limit=ecfg.get("limit"),
            bootstrap_iters=int(ecfg.get("bootstrap_iters", 100000)),
            log_samples=bool(ecfg.get("log_samples", False)),
            apply_chat_template=bool(ecfg.get("apply_chat_template", False)),
            task_manager=tm,
            random_seed=0, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except OSError as err:  # transformers' "not a valid model identifier / no such file" family
        raise TeamsRLError(f"cannot load model '{model_path}' for evaluation: {str(err).splitlines()[0]}") from err
    return results, benches


def save_results(results: dict, out_dir: Path) -> Path:
    """lm-eval's results JSON (serialised the way its own tracker does); samples go to a JSONL per task."""
    from lm_eval.utils import handle_non_serializable

    out_dir = Path(out_dir)
    samples = results.pop("samples", None)
    path = out_dir / RESULTS_FILE
    with open(path, "w") as fh:
        json.dump(results, fh, indent=2, default=handle_non_serializable, ensure_ascii=False)
    if samples:
        for task, rows in samples.items():
            with open(out_dir / f"samples_{task}.jsonl", "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
        results["samples"] = samples
    return path


def leaf_subtasks(group_subtasks: dict[str, list[str]], name: str) -> list[str]:
    """The leaf tasks under a (possibly nested) group, in lm-eval's order."""
    leaves = []
    for child in group_subtasks.get(name, []):
        leaves += leaf_subtasks(group_subtasks, child) if child in group_subtasks else [child]
    return leaves


def subtask_averages(results: dict, group: str, metric: str = "acc", filter_name: str = "none") -> dict:
    """Macro (mean over subtasks) and micro (weighted by each subtask's evaluated size) averages of
    `metric` over the leaves of `group`, plus the per-subtask scores and sizes."""
    leaves = leaf_subtasks(results.get("group_subtasks", {}), group)
    if not leaves:
        raise TeamsRLError(f"'{group}' has no subtasks in the lm-eval results")
    key = f"{metric},{filter_name}"
    scores = {leaf: float(results["results"][leaf][key]) for leaf in leaves}
    sizes = {leaf: int(results["n-samples"][leaf]["effective"]) for leaf in leaves}
    total = sum(sizes.values())
    return {
        "macro": sum(scores.values()) / len(scores),
        "micro": sum(scores[t] * sizes[t] for t in leaves) / total if total else float("nan"),
        "scores": scores,
        "sizes": sizes,
    }


def _task_metrics(entry: dict) -> dict[str, float]:
    """lm-eval's `metric,filter` keys -> `metric` (filter none) or `metric_filter`; numbers only."""
    out = {}
    for name, value in entry.items():
        if "," not in name or isinstance(value, str) or isinstance(value, dict):
            continue
        metric, filter_name = name.split(",", 1)
        out[metric if filter_name == "none" else f"{metric}_{filter_name}"] = float(value)
    return out


def flatten(results: dict, benches: list[Benchmark]) -> dict[str, float]:
    """Flat `{benchmark/metric: value}` plus one headline number per benchmark and their `average`."""
    flat: dict[str, float] = {}
    headlines = []
    res = results["results"]
    for b in benches:
        for metric, value in _task_metrics(res.get(b.task, {})).items():
            flat[f"{b.key}/{metric}"] = value
        headline = None
        if b.is_group:
            metric = b.metric or "acc"
            avg = subtask_averages(results, b.task, metric)
            flat[f"{b.key}/{metric}_macro"] = avg["macro"]
            flat[f"{b.key}/{metric}_micro"] = avg["micro"]
            flat[f"{b.key}/n_subtasks"] = float(len(avg["scores"]))
            for leaf, score in avg["scores"].items():
                alias = res[leaf].get("alias", leaf).strip(" -")
                flat[f"{b.key}/{alias}/{metric}"] = score
                flat[f"{b.key}/{alias}/n"] = float(avg["sizes"][leaf])
            headline = avg["micro"] if b.average == "micro" else avg["macro"]
        elif b.metric:
            headline = flat.get(f"{b.key}/{b.metric}")
            if headline is None:
                raise TeamsRLError(f"task '{b.task}' reported no '{b.metric}' metric "
                                   f"(it has: {', '.join(_task_metrics(res.get(b.task, {}))) or 'none'})")
        if headline is not None:
            flat[b.key] = headline
            headlines.append(headline)
        n = results.get("n-samples", {}).get(b.task, {}).get("effective")
        if n is not None:
            flat[f"{b.key}/n"] = float(n)
    if headlines:
        flat["average"] = sum(headlines) / len(headlines)
    return flat


def settings(ecfg, benches: list[Benchmark], model_path: str) -> dict:
    """What a reader needs to reproduce the numbers: harness version, model, shots, limit, batch, dtype."""
    from importlib import metadata

    return {
        "harness": "lm-evaluation-harness",
        "lm_eval_version": metadata.version("lm_eval"),
        "model": model_path,
        "backend": str(ecfg.get("backend", "hf")),
        "dtype": str(ecfg.get("dtype", "float32")),
        "batch_size": ecfg.get("batch_size", 1),
        "limit": ecfg.get("limit"),
        "include_path": [str(p) for p in include_paths(ecfg)],
        "benchmarks": [asdict(b) for b in benches],
        "seed": int(ecfg.get("seed", 1234)),
    }


def evaluate_model(model_path: str, ecfg, out_dir: Path, device: str = "cpu") -> tuple[dict, dict]:
    """Run lm-eval on one model and write its results JSON and `eval_settings.json` into `out_dir`.
    Returns (flat metrics, settings)."""
    results, benches = run_lm_eval(model_path, ecfg, device=device)
    save_results(results, out_dir)
    flat = flatten(results, benches)
    info = settings(ecfg, benches, model_path)
    with open(Path(out_dir) / "eval_settings.json", "w") as fh:
        json.dump(info, fh, indent=2)
    return flat, info


def benchmark_rows(flat: dict[str, float], keys: list[str]) -> dict[str, list[tuple[str, float]]]:
    """Group flat metrics by benchmark key for per-task tables: {benchmark: [(metric, value), ...]}."""
    rows: dict[str, list[tuple[str, float]]] = {k: [] for k in keys}
    for name, value in flat.items():
        head, _, rest = name.partition("/")
        if head in rows:
            rows[head].append((rest or head, value))
    return rows
