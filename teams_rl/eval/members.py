"""Member / non-member sets for membership inference: loading, validation and equal-size sampling.
(The prompts are formatted with the SFT stage's Alpaca template, `teams_rl.sft.data.format_prompt`.)"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from teams_rl.errors import TeamsRLError


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.instruction.strip(), self.input.strip(), self.output.strip())


def _rows_from_file(path: Path) -> list[dict]:
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TeamsRLError(f"privacy: {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if isinstance(data, dict):  # {"data": [...]} style
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise TeamsRLError(f"privacy: {path} must hold a JSON list of {{instruction, input, output}} records")
    return data


def load_examples(path: str | Path, split: str | None = None, what: str = "examples") -> list[Example]:
    """Records from a .json/.jsonl file or a `save_to_disk` folder (a Dataset, or a DatasetDict + `split`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TeamsRLError(f"privacy: the {what} file {path} does not exist")
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise TeamsRLError(f"privacy: {path} has splits {sorted(data)}; the {what} split '{split}' is not one")
            data = data[split]
        rows = data.to_list()
    else:
        rows = _rows_from_file(path)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "instruction" not in row or "output" not in row:
            raise TeamsRLError(f"privacy: record {i} of {path} has no instruction/output fields")
        out.append(Example(str(row["instruction"]), str(row.get("input") or ""), str(row["output"])))
    return out


def validate(members: list[Example], nonmembers: list[Example]) -> None:
    if not members:
        raise TeamsRLError("privacy: the member set is empty; there is nothing to attack")
    if not nonmembers:
        raise TeamsRLError("privacy: the non-member set is empty; membership inference needs held-out examples")
    shared = {e.key for e in members} & {e.key for e in nonmembers}
    if shared:
        sample = next(iter(shared))[0][:60]
        raise TeamsRLError(f"privacy: {len(shared)} example(s) are both members and non-members "
                           f"(e.g. '{sample}'); the two sets must be disjoint")


def sample_equal(members: list[Example], nonmembers: list[Example], max_samples: int | None, seed: int,
                 match_size: bool = False) -> tuple[list[Example], list[Example]]:
    """The same number of members and non-members: min(both sizes, max_samples), drawn with `seed`.
    With `match_size`, fewer than `max_samples` on either side is an error, so that two datasets are
    compared at exactly the same count."""
    n = min(len(members), len(nonmembers))
    if max_samples:
        if match_size and n < int(max_samples):
            raise TeamsRLError(f"privacy.match_size: need {max_samples} members and non-members, have "
                               f"{len(members)} and {len(nonmembers)}")
        n = min(n, int(max_samples))
    rng = random.Random(seed)
    return _draw(members, n, rng), _draw(nonmembers, n, rng)


def _draw(items: list[Example], n: int, rng: random.Random) -> list[Example]:
    return [items[i] for i in sorted(rng.sample(range(len(items)), n))]
