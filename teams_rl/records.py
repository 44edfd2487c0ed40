"""One reader for record files: a JSON array (Alpaca's `alpaca_data.json`), JSONL, or a `datasets`
`save_to_disk` folder (a Dataset, or a DatasetDict and a split).

Seeds, the SFT data, the membership-inference sets and the report read their records here, so a file one
stage accepts no other stage rejects, and every complaint names the file and the line (or row) it is about.
"""

from __future__ import annotations

import json
from pathlib import Path

from teams_rl.errors import TeamsRLError

Located = tuple[str, dict]  # (where: "path:line" or "folder[split] row N", the record)


def read_records(path: str | Path, split: str | None = None, what: str = "record file",
                 torn_tail_ok: bool = False) -> list[Located]:
    """Every record of `path` with where it is. `what` names the file in errors ("seed file", "finetune
    dataset", ...). `torn_tail_ok`: a JSONL file's last line may be cut off (our own append-only logs, read
    while or after their writer was killed); it is skipped instead of being an error."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TeamsRLError(f"{what} {path} does not exist")
    if path.is_dir():
        return _read_saved(path, split, what)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TeamsRLError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TeamsRLError(f"{what} {path} cannot be read ({exc.strerror})") from None
    stripped = text.lstrip()
    if not stripped:
        raise TeamsRLError(f"{path}: file is empty")
    if stripped[0] == "[":
        return _read_json_array(path, text)
    return _read_jsonl(path, text, torn_tail_ok)


def _read_jsonl(path: Path, text: str, torn_tail_ok: bool) -> list[Located]:
    records = []
    lines = text.splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if torn_tail_ok and lineno == len(lines) and not text.endswith("\n"):
                break
            raise TeamsRLError(f"{path}:{lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
        records.append((f"{path}:{lineno}", _object(record, f"{path}:{lineno}", len(records))))
    return records


def _read_json_array(path: Path, text: str) -> list[Located]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TeamsRLError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    # Recover the line each element starts on by walking the array with raw_decode.
    decoder = json.JSONDecoder()
    records = []
    pos = text.index("[") + 1
    for i, item in enumerate(data):
        while text[pos] in " \t\r\n,":
            pos += 1
        where = f"{path}:{text.count(chr(10), 0, pos) + 1}"
        _, pos = decoder.raw_decode(text, pos)
        records.append((where, _object(item, where, i)))
    return records


def _object(record, where: str, index: int) -> dict:
    if not isinstance(record, dict):
        raise TeamsRLError(f"{where}: record {index} is a {type(record).__name__}, expected a JSON object")
    return record


def _read_saved(path: Path, split: str | None, what: str) -> list[Located]:
    folder, label = path, str(path)
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise TeamsRLError(f"{what} {path} has no split '{split}' (splits: {', '.join(splits)})")
        folder, label = path / split, f"{path}[{split}]"
    if not (folder / "state.json").is_file():
        raise TeamsRLError(f"{what} {folder} is a folder but not a `datasets` save_to_disk folder")
    if not json.loads((folder / "state.json").read_text()).get("_data_files"):
        return []
    from datasets import load_from_disk

    return [(f"{label} row {i}", row) for i, row in enumerate(load_from_disk(str(folder)).to_list())]


def text_field(record: dict, name: str | None, where: str, required: bool) -> str:
    """`record[name]` as text: a string or a number; missing/null is "" unless `required`."""
    if name is None:
        return ""
    if name not in record or record[name] is None:
        if required:
            raise TeamsRLError(f"{where}: missing field '{name}'")
        return ""
    value = record[name]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise TeamsRLError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return str(value)


def alpaca_rows(records: list[Located], what: str, source: str | Path) -> list[dict]:
    """{instruction, input, output} per record (instruction and output required, input optional)."""
    if not records:
        raise TeamsRLError(f"{what} {source} is empty")
    return [{"instruction": text_field(rec, "instruction", where, True), "input": text_field(rec, "input", where, False),
             "output": text_field(rec, "output", where, True)} for where, rec in records]
