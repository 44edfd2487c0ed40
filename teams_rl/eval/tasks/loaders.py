"""`custom_dataset` for the offline tasks: read the JSONL files shipped in `data/` next to this module.

lm-eval calls it with the task's `metadata` and `dataset_kwargs` as keyword arguments; only `data_files`
(split -> file name inside `data/`) matters here. Paths resolve against this folder, not the working
directory, so the YAMLs work from any CWD, from the Python API and from the lm-eval CLI alike.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_jsonl(data_files: dict[str, str], **_metadata):
    import datasets

    files = {split: str(DATA_DIR / name) for split, name in data_files.items()}
    missing = [f for f in files.values() if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"offline task data missing: {', '.join(missing)}")
    return datasets.load_dataset("json", data_files=files)
