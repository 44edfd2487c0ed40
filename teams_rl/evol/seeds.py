"""Seed instructions: the shipped tiny set, Stanford Alpaca (hub or local JSON), or any JSON/JSONL file.

`load_seeds(cfg.seeds)` returns a list of `Seed` with stable ids, so that generation can be resumed and a
chunk (`start`/`stop`) of a large seed set can be worked on independently.

Config keys (`conf/seeds/*.yaml`):
  kind: tiny | alpaca | local_json
  path: file to read (alpaca: optional local `alpaca_data.json`; local_json: required)
  hub_id, split: the `datasets` hub id used by `alpaca` when no path is given (default tatsu-lab/alpaca, train)
  start, stop: index range [start, stop) over the file's records (stop null = to the end)
  limit: keep at most this many seeds after the range (null = all)
  fields: {id, instruction, input, output} field names (local_json; id null = the record index)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from teams_rl import config as C
from teams_rl.errors import TeamsRLError
from teams_rl.records import read_records, text_field

TINY_SEEDS = "seeds_tiny.jsonl"
DEFAULT_FIELDS = {"id": None, "instruction": "instruction", "input": "input", "output": "output"}


@dataclass(frozen=True)
class Seed:
    id: str
    instruction: str
    input: str = ""
    output: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def seeds_from_records(records: Iterable[tuple[str, dict]], fields: Mapping[str, str | None],
                       start: int = 0, stop: int | None = None, id_prefix: str = "") -> list[Seed]:
    """Turn (where, record) pairs into seeds over the index range [start, stop); ids default to the index."""
    seeds = []
    seen: dict[str, str] = {}
    for index, (where, record) in enumerate(records):
        if index < start or (stop is not None and index >= stop):
            continue
        instruction = text_field(record, fields["instruction"], where, required=True).strip()
        if not instruction:
            raise TeamsRLError(f"{where}: field '{fields['instruction']}' is empty")
        raw_id = text_field(record, fields.get("id"), where, required=True) if fields.get("id") else str(index)
        seed_id = f"{id_prefix}{raw_id}"
        if seed_id in seen:
            raise TeamsRLError(f"{where}: duplicate seed id '{seed_id}' (first at {seen[seed_id]})")
        seen[seed_id] = where
        seeds.append(Seed(id=seed_id,
                          instruction=instruction,
                          input=text_field(record, fields.get("input"), where, required=False).strip(),
                          output=text_field(record, fields.get("output"), where, required=False).strip()))
    return seeds


def _int(cfg: Any, key: str) -> int | None:
    """`seeds.<key>` as an optional non-negative int (errors name the full key)."""
    return C.integer({"seeds": cfg}, f"seeds.{key}", minimum=0, optional=True)


def _range(cfg: Any) -> tuple[int, int | None]:
    start = _int(cfg, "start") or 0
    stop = _int(cfg, "stop")
    if stop is not None and stop < start:
        raise TeamsRLError(f"seeds: invalid index range start={start} stop={stop}")
    return start, stop


def _fields(cfg: Any) -> dict[str, str | None]:
    fields = dict(DEFAULT_FIELDS)
    given = C.get(cfg, "fields", None)
    if given is not None:
        for key in given:
            if key not in DEFAULT_FIELDS:
                raise TeamsRLError(f"seeds.fields: unknown key '{key}' (known: {', '.join(DEFAULT_FIELDS)})")
            fields[key] = given[key]
    if not fields["instruction"]:
        raise TeamsRLError("seeds.fields.instruction must name a field")
    return fields


def _load_tiny(cfg: Any) -> list[Seed]:
    start, stop = _range(cfg)
    ref = resources.files("teams_rl.assets").joinpath(TINY_SEEDS)
    with resources.as_file(ref) as path:
        return seeds_from_records(read_records(Path(path), what="seed file"), {**DEFAULT_FIELDS, "id": "id"},
                                  start, stop)


def _load_alpaca(cfg: Any) -> list[Seed]:
    start, stop = _range(cfg)
    path = C.get(cfg, "path", None)
    if path:
        path = Path(str(path)).expanduser()
        return seeds_from_records(read_records(path, what="seed file"), DEFAULT_FIELDS, start, stop,
                                  id_prefix="alpaca-")
    hub_id = str(C.get(cfg, "hub_id", "tatsu-lab/alpaca"))
    split = str(C.get(cfg, "split", "train"))
    import datasets  # heavy; only when the hub is used

    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # offline, missing, or gated: one clear line
        raise TeamsRLError(f"seeds: cannot load '{hub_id}' ({split}) from the hub: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''} (set seeds.path to a local "
                           "alpaca_data.json)") from None
    missing = {"instruction", "input", "output"} - set(ds.column_names)
    if missing:
        raise TeamsRLError(f"seeds: '{hub_id}' lacks columns {sorted(missing)}")
    stop_at = len(ds) if stop is None else min(stop, len(ds))
    rows = ds.select(range(min(start, stop_at), stop_at))
    records = [(f"{hub_id}[{split}] row {start + i}", row) for i, row in enumerate(rows)]
    # records already start at `start`; the index range is applied, ids keep the global Alpaca index
    seeds = seeds_from_records(records, DEFAULT_FIELDS, 0, None)
    return [Seed(id=f"alpaca-{start + i}", instruction=s.instruction, input=s.input, output=s.output)
            for i, s in enumerate(seeds)]


def _load_local_json(cfg: Any) -> list[Seed]:
    path = C.get(cfg, "path", None)
    if not path:
        raise TeamsRLError("seeds.kind=local_json needs seeds.path")
    path = Path(str(path)).expanduser()
    start, stop = _range(cfg)
    prefix = str(C.get(cfg, "id_prefix", ""))
    return seeds_from_records(read_records(path, what="seed file"), _fields(cfg), start, stop, id_prefix=prefix)


LOADERS = {"tiny": _load_tiny, "alpaca": _load_alpaca, "local_json": _load_local_json}


def load_seeds(seeds_cfg: Any) -> list[Seed]:
    """The seeds described by `cfg.seeds` (see the module docstring), after the index range and `limit`."""
    kind = str(C.get(seeds_cfg, "kind", "tiny"))
    if kind not in LOADERS:
        raise TeamsRLError(f"seeds.kind '{kind}' is unknown (choose one of: {', '.join(LOADERS)})")
    limit = _int(seeds_cfg, "limit")
    seeds = LOADERS[kind](seeds_cfg)
    if limit is not None:
        seeds = seeds[:limit]
    if not seeds:
        raise TeamsRLError(f"seeds: no seed instructions selected (kind={kind})")
    return seeds


def heldout_seeds_config(seeds_cfg: Any, n: int) -> dict:
    """The seeds config selecting the `n` seeds right after the training selection, from the same source: the
    membership-inference non-members of a run that trains on every seed it evolves (the training range must be
    bounded by `stop` or `limit`)."""
    start, stop = _range(seeds_cfg)
    limit = _int(seeds_cfg, "limit")
    if stop is None and limit is None:
        raise TeamsRLError("generate.heldout_seeds needs a bounded training range: set seeds.stop or seeds.limit")
    end = stop if limit is None else start + (limit if stop is None else min(limit, stop - start))
    out = dict(C.plain(seeds_cfg) or {})
    out.update(start=end, stop=end + int(n), limit=None)
    return out


def load_heldout_seeds(seeds_cfg: Any, n: int) -> list[Seed]:
    """The `n` seeds after the training selection (see `heldout_seeds_config`); fewer is an error."""
    cfg = heldout_seeds_config(seeds_cfg, n)
    try:
        seeds = load_seeds(cfg)
    except TeamsRLError as err:
        if "no seed instructions selected" not in str(err):
            raise
        seeds = []
    if len(seeds) < n:
        raise TeamsRLError(f"generate.heldout_seeds={n}: only {len(seeds)} seeds after the training range "
                           f"(index {cfg['start']} on)")
    return seeds


def check_heldout_seeds(seeds_cfg: Any, n: int) -> None:
    """What `load_heldout_seeds` would reject, reading only local seed files (like `check_seeds`)."""
    cfg = heldout_seeds_config(seeds_cfg, n)
    check_seeds({**cfg, "stop": None, "start": 0})  # types and the file
    if str(C.get(cfg, "kind", "tiny")) == "tiny" or C.get(cfg, "path"):
        load_heldout_seeds(seeds_cfg, n)


ALPACA_SIZE = 52_002


def check_seeds(seeds_cfg: Any) -> None:
    """The seed settings a run would reject, without reading a hub dataset: kind, index range and limit
    types, and that a given file exists (read: its records are checked too)."""
    kind = str(C.get(seeds_cfg, "kind", "tiny"))
    if kind not in LOADERS:
        raise TeamsRLError(f"seeds.kind '{kind}' is unknown (choose one of: {', '.join(LOADERS)})")
    _range(seeds_cfg)
    _int(seeds_cfg, "limit")
    if kind == "local_json":
        _fields(seeds_cfg)
    if kind == "tiny" or C.get(seeds_cfg, "path") or kind == "local_json":
        load_seeds(seeds_cfg)


def seed_sample(seeds_cfg: Any, n: int = 16) -> tuple[int, list[Seed], str]:
    """(how many seeds the config selects, up to `n` of them, a note) for estimates. When the Alpaca hub set
    cannot be read (offline), the count comes from the index range over its 52,002 records and the sample
    from the shipped tiny seeds, and the note says so."""
    try:
        seeds = load_seeds(seeds_cfg)
        return len(seeds), seeds[:n], ""
    except TeamsRLError:
        if str(C.get(seeds_cfg, "kind", "tiny")) != "alpaca" or C.get(seeds_cfg, "path"):
            raise
        start, stop = _range(seeds_cfg)
        count = (ALPACA_SIZE if stop is None else min(stop, ALPACA_SIZE)) - start
        limit = _int(seeds_cfg, "limit")
        count = min(count, limit) if limit is not None else count
        note = f"Alpaca not readable offline: {count:,} seeds by index range, prompt lengths from the tiny seeds"
        return count, load_seeds({"kind": "tiny"})[:n], note
