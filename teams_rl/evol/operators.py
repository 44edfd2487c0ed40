"""Textual operators (the policy's actions) as data (the cleanup of their replies: `teams_rl.evol.cleaning`).

An operator is a name, a kind ("breadth": a new instruction on a rarer topic, "depth": a harder version of
the same one) and a prompt template with an `{instruction}` slot. Templates live in
`conf/operators/library.yaml`; a set file (`conf/operators/<set>.yaml`) pulls the library in and lists the
operators it uses, in action-index order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from teams_rl import config as C
from teams_rl.errors import TeamsRLError
from teams_rl.evol.cleaning import Cleaned, clean_rewrite, clean_rewrite_counted  # re-exported for callers

__all__ = ["Cleaned", "Operator", "OperatorSet", "clean_rewrite", "clean_rewrite_counted", "load_operator_set"]

SLOT = "{instruction}"
KINDS = ("breadth", "depth")


@dataclass(frozen=True)
class Operator:
    """One textual operation: `template` is the whole user prompt, with `{instruction}` where the
    current instruction goes (plain substitution; other braces in the template are kept as they are)."""

    name: str
    kind: str
    template: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TeamsRLError(f"operator '{self.name}': kind must be one of {', '.join(KINDS)}, got '{self.kind}'")
        if SLOT not in self.template:
            raise TeamsRLError(f"operator '{self.name}': its template has no {SLOT} slot")

    def render(self, instruction: str) -> str:
        return self.template.replace(SLOT, instruction.strip())


@dataclass(frozen=True)
class OperatorSet:
    """An ordered list of operators; the position of an operator is its action index."""

    name: str
    operators: tuple[Operator, ...]

    def __post_init__(self):
        if not self.operators:
            raise TeamsRLError(f"operator set '{self.name}' is empty")
        names = [op.name for op in self.operators]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise TeamsRLError(f"operator set '{self.name}' lists {', '.join(dupes)} more than once")

    def __len__(self) -> int:
        return len(self.operators)

    def __getitem__(self, index: int) -> Operator:
        return self.operators[index]

    @property
    def names(self) -> list[str]:
        """Operator names in action-index order."""
        return [op.name for op in self.operators]

    def index(self, name: str) -> int:
        """Action index of the operator called `name` (TeamsRLError if the set has none)."""
        for i, op in enumerate(self.operators):
            if op.name == name:
                return i
        raise TeamsRLError(f"operator '{name}' is not in set '{self.name}' ({', '.join(self.names)})")

    @property
    def breadth_indices(self) -> list[int]:
        """Action indices of the in-breadth operators."""
        return [i for i, op in enumerate(self.operators) if op.kind == "breadth"]

    @property
    def depth_indices(self) -> list[int]:
        return [i for i, op in enumerate(self.operators) if op.kind == "depth"]

    def render(self, op_index: int, instruction: str) -> str:
        """The full user prompt that applies operator `op_index` to `instruction`."""
        if not 0 <= int(op_index) < len(self.operators):
            raise IndexError(f"operator index {op_index} out of range for set '{self.name}' ({len(self)} ops)")
        return self.operators[int(op_index)].render(instruction)


def load_operator_set(cfg_operators) -> OperatorSet:
    """Build the set from the `operators` config node: `{name, ops: [names], library: {name: {kind,
    template}}}`. Unknown names, templates without the slot, or a missing list fail with one line."""
    if cfg_operators is None:
        raise TeamsRLError("no operator set configured (choose one with operators=<set>, e.g. operators=teams_rl)")
    node = dict(C.plain(cfg_operators))
    set_name = str(node.get("name") or "custom")
    ops = node.get("ops")
    library = node.get("library") or {}
    if not ops:
        raise TeamsRLError(f"operator set '{set_name}' lists no operators (set `ops: [names...]` in its YAML)")
    if isinstance(ops, str) or not isinstance(ops, Sequence):
        raise TeamsRLError(f"operator set '{set_name}': `ops` must be a list of operator names")
    if not isinstance(library, Mapping):
        raise TeamsRLError(f"operator set '{set_name}': `library` must map operator names to {{kind, template}}")
    operators = []
    for name in ops:
        spec = library.get(name)
        if spec is None:
            known = ", ".join(sorted(library)) or "none"
            raise TeamsRLError(f"unknown operator '{name}' in set '{set_name}' (library has: {known})")
        if not isinstance(spec, Mapping) or "template" not in spec:
            raise TeamsRLError(f"operator '{name}' in the library needs a `template`")
        operators.append(Operator(name=str(name), kind=str(spec.get("kind", "depth")), template=str(spec["template"])))
    return OperatorSet(name=set_name, operators=tuple(operators))

