"""Reading config nodes: plain containers, defaults for unset keys, and typed checks with one-line errors.

Every module reads the composed config through these helpers, so that "unset", "null" and "missing" mean the
same everywhere and a wrong value (`seeds.limit=abc`, `policy.updates=1.5`) is reported as one line naming
the key and what it expects, before any stage runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from teams_rl.errors import TeamsRLError


def plain(node: Any) -> Any:
    """A DictConfig/ListConfig as resolved plain dicts and lists; anything else unchanged (None stays None)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def get(node: Any, key: str, default: Any = None) -> Any:
    """`node[key]` for a DictConfig, a mapping or an object, with `default` when it is unset, missing or null.
    `key` may be dotted (`a.b.c`)."""
    for part in key.split("."):
        if node is None:
            return default
        if isinstance(node, DictConfig):
            node = None if part not in node or OmegaConf.is_missing(node, part) else node[part]
        elif isinstance(node, Mapping):
            node = node.get(part)
        else:
            node = getattr(node, part, None)
    return default if node is None else node


def _value(cfg: Any, key: str) -> Any:
    try:
        return get(cfg, key)
    except OmegaConfBaseException as err:  # e.g. an interpolation that cannot be resolved
        raise TeamsRLError(f"{key}: {str(err).splitlines()[0]}") from None


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def integer(cfg: Any, key: str, *, minimum: int | None = None, maximum: int | None = None,
            optional: bool = False) -> int | None:
    """`key` as an int (a float like 2.0 is not accepted: configs say what they mean)."""
    value = _value(cfg, key)
    if value is None:
        if optional:
            return None
        raise TeamsRLError(f"{key} must be set to an integer")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TeamsRLError(f"{key} must be an integer, got {_describe(value)}")
    _check_range(key, value, minimum, maximum)
    return value


def number(cfg: Any, key: str, *, minimum: float | None = None, maximum: float | None = None,
           below: float | None = None, optional: bool = False) -> float | None:
    """`key` as a finite float; `below` is an exclusive upper bound (fractions in [0, 1): below=1)."""
    value = _value(cfg, key)
    if value is None:
        if optional:
            return None
        raise TeamsRLError(f"{key} must be set to a number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TeamsRLError(f"{key} must be a number, got {_describe(value)}")
    _check_range(key, value, minimum, maximum)
    if below is not None and value >= below:
        low = "" if minimum is None else f"{minimum} <= "
        raise TeamsRLError(f"{key} must be {low}{key.rsplit('.', 1)[-1]} < {below}, got {value}")
    return float(value)


def fraction(cfg: Any, key: str, *, optional: bool = False) -> float | None:
    """A fraction in [0, 1)."""
    return number(cfg, key, minimum=0.0, below=1.0, optional=optional)


def boolean(cfg: Any, key: str, *, default: bool | None = None) -> bool:
    value = _value(cfg, key)
    if value is None and default is not None:
        return default
    if not isinstance(value, bool):
        raise TeamsRLError(f"{key} must be true or false, got {_describe(value)}")
    return value


def choice(cfg: Any, key: str, choices: Sequence[str], *, default: str | None = None) -> str:
    value = _value(cfg, key)
    if value is None and default is not None:
        return default
    if not isinstance(value, str) or value not in choices:
        raise TeamsRLError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def string_list(cfg: Any, key: str, *, optional: bool = True) -> list[str]:
    value = _value(cfg, key)
    if value is None:
        if optional:
            return []
        raise TeamsRLError(f"{key} must be a list")
    if isinstance(value, str) or not isinstance(value, (ListConfig, Sequence)):
        raise TeamsRLError(f"{key} must be a list, got {_describe(value)}")
    return [str(v) for v in value]


def integer_list(cfg: Any, key: str, *, minimum: int | None = None, maximum: int | None = None) -> list[int]:
    """`key` as a list of ints (null = []); each in [minimum, maximum]."""
    value = _value(cfg, key)
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (ListConfig, Sequence)):
        raise TeamsRLError(f"{key} must be a list of integers, got {_describe(value)}")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TeamsRLError(f"{key} must be a list of integers, got {_describe(item)} in it")
        _check_range(key, item, minimum, maximum)
        out.append(int(item))
    return out


def _check_range(key: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise TeamsRLError(f"{key} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise TeamsRLError(f"{key} must be <= {maximum}, got {value}")


def check_required(cfg: Any) -> None:
    """`required: {dotted key: what to give}` (set by an experiment): each key must be set, else one line
    naming the experiment, the key and what it expects, before any stage runs."""
    needed = plain(get(cfg, "required")) or {}
    if not isinstance(needed, Mapping):
        raise TeamsRLError(f"required must map config keys to what they need, got {_describe(needed)}")
    for key, what in needed.items():
        try:
            value = OmegaConf.select(cfg, str(key), default=None)
        except OmegaConfBaseException as err:
            raise TeamsRLError(f"{key}: {str(err).splitlines()[0]}") from None
        if value is None or (isinstance(value, str) and not value.strip()):
            name = get(cfg, "experiment_name", "this experiment")
            raise TeamsRLError(f"+experiment={name} needs {key}=...: {what}")
