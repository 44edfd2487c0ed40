"""Member / non-member sets for membership inference: loading, validation and equal-size sampling.
(The prompts are formatted with the SFT stage's Alpaca template, `teams_rl.sft.data.format_prompt`.)"""

from __future__ import annotations

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


def load_examples(path: str | Path, split: str | None = None, what: str = "examples") -> list[Example]:
    """Records from a .json/.jsonl file or a `save_to_disk` folder (a Dataset, or a DatasetDict + `split`)."""
    from teams_rl.records import alpaca_rows, read_records

    rows = read_records(path, split, what=f"privacy: the {what} file")
    if not rows:
        return []
    return [Example(r["instruction"], r["input"], r["output"]) for r in alpaca_rows(rows, what, path)]


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
