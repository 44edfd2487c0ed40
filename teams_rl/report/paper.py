"""The numbers TeaMs-RL reports, read from one data file (`teams_rl/assets/paper_results.yaml`) with their sources.

Every entry is `{value, source}`; `value: null` means the available text of the paper gives no number, and a
report cell then says "not reported".
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from teams_rl.errors import TeamsRLError

NOT_REPORTED = "not reported"
PAPER_FILE = "paper_results.yaml"
# Target config name -> the paper's model entry in `openllm_v1` (the paper reports only its Llama-1-7b numbers).
TARGET_TO_PAPER_MODEL = {"llama1_7b": "teams_rl_llama1_7b", "huggyllama/llama-7b": "teams_rl_llama1_7b"}
PAPER_MODEL_LABELS = {"teams_rl_llama1_7b": "TeaMs-RL Llama-1-7b (paper)", "wizardlm_7b": "WizardLM-7b (paper)"}


@dataclass(frozen=True)
class PaperScale:
    """The one set of WizardLM constants (`queries.*` in paper_results.yaml): its seeds, rounds and calls per
    round, the total they make, its evolved instructions, and the paper's two ratios against them."""

    seeds: int
    rounds: int
    calls_per_round: int
    wizard_queries: int
    wizard_instructions: int
    query_ratio: float
    size_ratio: float


@dataclass(frozen=True)
class Reported:
    value: float | None
    source: str

    @property
    def reported(self) -> bool:
        return self.value is not None


class PaperResults:
    """Look-ups into the paper's numbers by dotted path, e.g. `queries.teams_rl_fraction_of_wizardlm`."""

    def __init__(self, data: dict, path: str = PAPER_FILE):
        self.data = data
        self.path = path

    @classmethod
    def load(cls, path: str | Path | None = None) -> PaperResults:
        if path:
            path = Path(path).expanduser()
            if not path.is_file():
                raise TeamsRLError(f"report.paper_results: {path} does not exist")
            text = path.read_text()
        else:
            text = resources.files("teams_rl.assets").joinpath(PAPER_FILE).read_text()
            path = f"teams_rl/assets/{PAPER_FILE}"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise TeamsRLError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
        if not isinstance(data, dict):
            raise TeamsRLError(f"{path}: expected a mapping of sections")
        return cls(data, str(path))

    def get(self, dotted: str) -> Reported:
        node = self.data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"{self.path}: no entry '{dotted}'")
            node = node[part]
        if not isinstance(node, dict) or "value" not in node:
            raise KeyError(f"{self.path}: '{dotted}' is not a {{value, source}} entry")
        value = node.get("value")
        return Reported(None if value is None else float(value), str(node.get("source", "")))

    def value(self, dotted: str, default: float | None = None) -> float | None:
        value = self.get(dotted).value
        return default if value is None else value

    def cell(self, dotted: str, fmt: str = "{:.2f}") -> str:
        """The number formatted, or "not reported"."""
        entry = self.get(dotted)
        return NOT_REPORTED if entry.value is None else fmt.format(entry.value)

    def scale(self) -> PaperScale:
        """WizardLM's scale; its total must equal seeds x rounds x calls per round (one set of constants)."""
        def whole(key: str) -> int:
            value = self.value(f"queries.{key}")
            if value is None or not float(value).is_integer():
                raise TeamsRLError(f"{self.path}: queries.{key} must be a whole number, got {value!r}")
            return int(value)

        s = PaperScale(whole("wizardlm_seeds"), whole("wizardlm_rounds"), whole("wizardlm_calls_per_instruction_round"),
                       whole("wizardlm_total_queries"), whole("wizardlm_instructions"),
                       float(self.value("queries.teams_rl_fraction_of_wizardlm")),
                       float(self.value("queries.dataset_size_fraction_of_wizardlm")))
        if s.wizard_queries != s.seeds * s.rounds * s.calls_per_round:
            raise TeamsRLError(f"{self.path}: queries.wizardlm_total_queries={s.wizard_queries:,} is not "
                               f"{s.seeds:,} seeds x {s.rounds} rounds x {s.calls_per_round} calls")
        return s

    def openllm_models(self) -> list[str]:
        return list((self.data.get("openllm_v1") or {}).keys())

    def openllm(self, model: str, benchmark: str) -> Reported:
        try:
            return self.get(f"openllm_v1.{model}.{benchmark}")
        except KeyError:
            return Reported(None, "not stated")

    def sources(self, section: str) -> list[tuple[str, str]]:
        """(dotted key, source) of every entry under `section`, in file order."""
        out: list[tuple[str, str]] = []

        def walk(node, prefix):
            if isinstance(node, dict) and "value" in node and "source" in node:
                out.append((prefix, str(node["source"])))
            elif isinstance(node, dict):
                for key, child in node.items():
                    walk(child, f"{prefix}.{key}" if prefix else str(key))

        walk(self.data.get(section) or {}, section)
        return out


def paper_model_for_target(target_name: str | None, target_model: str | None) -> str | None:
    """The paper's Open LLM entry that corresponds to our fine-tuning target (None: the paper has none)."""
    for key in (target_name, target_model):
        if key and key in TARGET_TO_PAPER_MODEL:
            return TARGET_TO_PAPER_MODEL[key]
    return None
