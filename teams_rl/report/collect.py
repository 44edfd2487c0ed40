"""What a finished run left behind, read back from its artifact folders.

A `RunResults` is built from
- a stage context (the report stage: its input folders and manifests),
- a run dir (`run_manifest.json` names every stage's artifact folder; `config.resolved.yaml`), or
- any artifact folder (its `manifest.json` names its inputs by fingerprint, found next to it in the store).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from teams_rl.errors import TeamsRLError

MANIFEST = "manifest.json"
RESULT_STAGES = ("policy", "policy_baseline", "generate", "finetune", "evaluate_base", "evaluate", "privacy")


def read_json(path: Path, default=None):
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as err:
        raise TeamsRLError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a stage's JSONL file ([] when it is absent or empty; a torn last line is skipped)."""
    from teams_rl.records import read_records

    if not path.is_file() or not path.read_text().strip():
        return []
    return [row for _, row in read_records(path, what="result file", torn_tail_ok=True)]


def benchmark_series(runs: list[RunResults]) -> list[tuple[str, dict, bool]]:
    """(label, benchmark metrics, is_base) for every distinct base model and every fine-tuned run, in order."""
    out, seen = [], set()
    for run in runs:
        base, model = run.base_scores(), run.target_model() or "base"
        if base and model not in seen:
            seen.add(model)
            out.append((f"base: {model}", base, True))
        if run.has("evaluate"):
            tuned = {k[len("finetuned/"):]: v for k, v in run.metrics("evaluate").items() if k.startswith("finetuned/")}
            out.append((f"fine-tuned: {run.label}", tuned, False))
    return out


HEADLINE_METRICS = ("acc_norm", "acc", "exact_match", "mc2")


def benchmark_stderr(scores: dict, key: str) -> float | None:
    """lm-eval's standard error of the headline score `scores[key]` (the metric whose value it is), from one
    series of `benchmark_series` (prefix stripped); for a macro average over subjects (MMLU), the standard error
    of that mean from each subject's binomial one."""
    head = number(scores.get(key))
    if head is None:
        return None
    for name in HEADLINE_METRICS:
        value = number(scores.get(f"{key}/{name}"))
        if value is not None and math.isclose(value, head):
            return number(scores.get(f"{key}/{name}_stderr"))
        macro = number(scores.get(f"{key}/{name}_macro"))
        if macro is not None and math.isclose(macro, head):
            return _macro_stderr(scores, key, name)
    return None


def _macro_stderr(scores: dict, key: str, name: str) -> float | None:
    """sqrt(sum of p(1-p)/(n-1) over the k subjects) / k: the subjects' sample standard errors, as lm-eval's."""
    terms = []
    for subject, v in _per_subject(scores, key, name).items():
        p, n = number(v), number(scores.get(f"{subject}/n"))
        if p is None or n is None or n < 2:
            return None
        terms.append(p * (1 - p) / (n - 1))
    return math.sqrt(sum(terms)) / len(terms) if terms else None


def _per_subject(scores: dict, key: str, leaf: str) -> dict:
    """`{"<key>/<subject>": value}` of the keys `<key>/<subject>/<leaf>` of a group's subjects (MMLU's)."""
    return {k[: -len(leaf) - 1]: v for k, v in scores.items()
            if k.startswith(f"{key}/") and k.endswith(f"/{leaf}") and k.count("/") == 2}


def benchmark_documents(scores: dict, key: str) -> str | None:
    """How many documents benchmark `key` scored, as the report prints it: `n` of a plain task; for a group of
    subjects (MMLU) the sum over them and how it splits ("32 (4 subjects x 8)"); None when not recorded."""
    n = number(scores.get(f"{key}/n"))
    if n is not None:
        return f"{int(n)}"
    subjects = [int(v) for v in _per_subject(scores, key, "n").values() if number(v) is not None]
    if not subjects:
        return None
    split = f"{len(subjects)} subjects x {subjects[0]}" if len(set(subjects)) == 1 else f"{len(subjects)} subjects"
    return f"{sum(subjects)} ({split})"


def number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(float(value)) else float(value)


@dataclass
class RunResults:
    """One run's finished stage artifacts: folders, manifests and the files the stages saved."""

    label: str
    folders: dict[str, Path] = field(default_factory=dict)
    manifests: dict[str, dict] = field(default_factory=dict)
    config: dict = field(default_factory=dict)          # the resolved run config, when known
    run_dir: Path | None = None
    statuses: dict[str, str] = field(default_factory=dict)  # stage -> ran | cached (from a run manifest)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_context(cls, label: str, folders: dict[str, Path], manifests: dict[str, dict],
                     config: dict | None = None) -> RunResults:
        keep = {s: Path(f) for s, f in folders.items() if s in RESULT_STAGES}
        return cls(label, keep, {s: manifests[s] for s in keep if s in manifests}, config or {})

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, label: str | None = None) -> RunResults:
        run_dir = Path(run_dir)
        run_manifest = read_json(run_dir / "run_manifest.json")
        if run_manifest is None:
            raise TeamsRLError(f"{run_dir}: no run_manifest.json (not a teams_rl run dir)")
        config = {}
        if (run_dir / "config.resolved.yaml").is_file():
            config = yaml.safe_load((run_dir / "config.resolved.yaml").read_text()) or {}
        results = cls(label or str(run_manifest.get("experiment") or run_dir.name), config=config, run_dir=run_dir)
        for stage, entry in (run_manifest.get("stages") or {}).items():
            if stage not in RESULT_STAGES:
                continue
            folder = _locate(Path(entry["folder"]), run_dir)
            manifest = read_json(folder / MANIFEST) if folder is not None else None
            if manifest is None:
                continue  # the stage did not finish in this run
            results.folders[stage] = folder
            results.manifests[stage] = manifest
            if entry.get("status"):
                results.statuses[stage] = entry["status"]
        return results

    @classmethod
    def from_artifact(cls, folder: str | Path, label: str | None = None) -> RunResults:
        """An artifact folder and, recursively, the input artifacts its manifest names."""
        folder = Path(folder)
        manifest = read_json(folder / MANIFEST)
        if manifest is None:
            raise TeamsRLError(f"{folder}: no manifest.json (not a finished artifact folder)")
        store = folder.parent.parent
        results = cls(label or f"{manifest.get('stage', folder.parent.name)}:{folder.name}")
        todo = [(manifest.get("stage", folder.parent.name), folder, manifest)]
        while todo:
            stage, path, man = todo.pop()
            if stage in results.folders:
                continue
            if stage in RESULT_STAGES:
                results.folders[stage], results.manifests[stage] = path, man
            for dep, fp in (man.get("inputs") or {}).items():
                dep_folder = store / dep / fp
                dep_manifest = read_json(dep_folder / MANIFEST)
                if dep_manifest is not None:
                    todo.append((dep, dep_folder, dep_manifest))
        return results

    @classmethod
    def load(cls, path: str | Path, label: str | None = None) -> RunResults:
        """A run dir (has run_manifest.json) or an artifact folder (has manifest.json)."""
        path = Path(path).expanduser()
        if (path / "run_manifest.json").is_file():
            return cls.from_run_dir(path, label)
        if (path / MANIFEST).is_file():
            return cls.from_artifact(path, label)
        raise TeamsRLError(f"{path}: neither a run dir (run_manifest.json) nor a finished artifact folder "
                           "(manifest.json)")

    # -- access ---------------------------------------------------------------------------------------
    def has(self, stage: str) -> bool:
        return stage in self.manifests

    def base_scores(self) -> dict:
        """The base model's benchmark metrics: from the evaluate stage (`base/*`) or the evaluate_base stage."""
        metrics = self.metrics("evaluate")
        return {k[len("base/"):]: v for k, v in metrics.items() if k.startswith("base/")} or self.metrics("evaluate_base")

    def metrics(self, stage: str) -> dict:
        return dict((self.manifests.get(stage) or {}).get("metrics") or {})

    def metric(self, stage: str, key: str) -> float | None:
        return number(self.metrics(stage).get(key))

    def file(self, stage: str, name: str) -> Path | None:
        folder = self.folders.get(stage)
        return folder / name if folder is not None and (folder / name).exists() else None

    def policy_history(self, stage: str = "policy") -> list[dict]:
        path = self.file(stage, "metrics.jsonl")
        return read_jsonl(path) if path else []

    def policy_vs_baseline(self) -> dict | None:
        """The trained policy's final reward (its last updates) minus the random baseline's mean reward over the
        same budget, with the standard error of the difference (two independent runs, each SE clustered by its
        `se_unit`: the episode, or the env where episodes carry over), both n, their clusters and the ratio of
        the clustered to the independent-transition SE."""
        p, b = self.metrics("policy"), self.metrics("policy_baseline")
        final, base = number(p.get("final_window/mean_reward")), number(b.get("baseline/mean_reward"))
        if final is None or base is None:
            return None
        se_f, se_b = number(p.get("final_window/reward_se")), number(b.get("baseline/reward_se"))
        iid_f, iid_b = number(p.get("final_window/reward_se_iid")), number(b.get("baseline/reward_se_iid"))
        if se_f is None or se_b is None:  # no SE (fewer than two episodes): no difference to judge
            se = iid = None
        else:
            se = math.sqrt(se_f ** 2 + se_b ** 2)
            iid = math.sqrt(iid_f ** 2 + iid_b ** 2) if iid_f is not None and iid_b is not None else None
        diff = final - base
        return {"final": final, "final_se": se_f, "final_n": int(p.get("final_window/transitions") or 0),
                "final_episodes": int(p.get("final_window/episodes") or 0),
                "final_updates": int(p.get("final_window/updates") or 0), "baseline": base, "baseline_se": se_b,
                "baseline_n": int(b.get("baseline/transitions") or 0),
                "baseline_episodes": int(b.get("baseline/episodes") or 0), "difference": diff, "se": se,
                "se_ratio": se / iid if se and iid else None, "z": diff / se if se else None,
                # artifacts from before the per-transition records hold the independent-transition SE only
                "se_unit": p.get("final_window/se_unit") or ("episode" if iid is not None else None)}

    def generate_stats(self) -> dict:
        path = self.file("generate", "stats.json")
        return read_json(path, {}) if path else {}

    def privacy_scores(self) -> list[dict]:
        path = self.file("privacy", "scores.jsonl")
        return read_jsonl(path) if path else []

    def eval_settings(self) -> dict:
        path = self.file("evaluate", "eval_settings.json") or self.file("evaluate_base", "eval_settings.json")
        return read_json(path, {}) if path else {}

    def config_value(self, dotted: str, default=None):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def target_model(self) -> str | None:
        for stage in ("finetune",):
            config = (self.manifests.get(stage) or {}).get("config") or {}
            target = config.get("target")
            if isinstance(target, dict) and target.get("model"):
                return str(target["model"])
        model = self.config_value("target.model")
        return str(model) if model else self.metrics("finetune").get("base_model")

    def operator_order(self) -> list[str]:
        """The run's operators in action order (from the policy's or generation's config), [] if unknown."""
        for stage in ("policy", "generate"):
            ops = (((self.manifests.get(stage) or {}).get("config") or {}).get("operators") or {})
            if isinstance(ops, dict) and ops.get("ops"):
                return [str(o) for o in ops["ops"]]
        return []

    def llm_accounting(self) -> dict[str, dict]:
        """stage -> role -> counters, from each stage manifest's `llm` (what that stage sent when it ran)."""
        return {stage: man.get("llm") or {} for stage, man in self.manifests.items() if man.get("llm")}


def _locate(folder: Path, run_dir: Path) -> Path | None:
    """A run manifest's artifact folder: absolute, relative to the working directory of the run (usually the
    repository root), or relative to one of the run dir's ancestors."""
    if folder.is_absolute() or (folder / MANIFEST).is_file():
        return folder
    for parent in run_dir.resolve().parents:
        candidate = parent / folder
        if (candidate / MANIFEST).is_file():
            return candidate
    return None
