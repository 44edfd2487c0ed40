"""Seed loaders: the shipped tiny set, Alpaca (local file or the hub through `datasets`), any JSON/JSONL file."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from teams_rl.errors import TeamsRLError
from teams_rl.evol.seeds import Seed, load_seeds
from tests.conftest import CONF_DIR

ALPACA = [{"instruction": f"Give tip number {i}.", "input": "" if i % 2 else f"context {i}", "output": f"Tip {i}."}
          for i in range(6)]


def _cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF_DIR / "seeds" / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_tiny_seeds_are_varied_and_the_default_takes_a_prefix():
    seeds = load_seeds({"kind": "tiny"})
    assert len(seeds) == 58 and len({s.id for s in seeds}) == 58
    assert len({s.instruction for s in seeds}) == 58
    assert sum(1 for s in seeds if s.input) >= 10
    text = " ".join(s.instruction.lower() for s in seeds)
    for topic in ("python", "classify", "poem", "solve", "translate", "explain"):
        assert topic in text
    default = load_seeds(_cfg("tiny"))
    assert default == seeds[: len(default)] and len(default) == 36  # the next 22 are the default non-members
    assert load_seeds({"kind": "tiny", "start": 56}) == seeds[56:]


def test_alpaca_local_file_with_index_range(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(ALPACA, indent=4))
    seeds = load_seeds(_cfg("alpaca", path=str(path), start=2, stop=5))
    assert [s.id for s in seeds] == ["alpaca-2", "alpaca-3", "alpaca-4"]
    assert seeds[0] == Seed("alpaca-2", "Give tip number 2.", "context 2", "Tip 2.")


def test_alpaca_from_the_hub_uses_datasets(monkeypatch):
    import datasets

    asked = {}

    def fake_load_dataset(name, split):
        asked.update(name=name, split=split)
        return datasets.Dataset.from_list(ALPACA)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    seeds = load_seeds(_cfg("alpaca", start=4))
    assert asked == {"name": "tatsu-lab/alpaca", "split": "train"}
    assert [s.id for s in seeds] == ["alpaca-4", "alpaca-5"] and seeds[1].output == "Tip 5."

    def offline(name, split):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TeamsRLError, match="cannot load 'tatsu-lab/alpaca'.*seeds.path"):
        load_seeds(_cfg("alpaca"))


def test_local_jsonl_with_field_mapping(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"uid": "q1", "prompt": "What is entropy?", "ctx": ""}, {"uid": "q2", "prompt": "Define a monad.", "ctx": "Haskell"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cfg = _cfg("local_json", path=str(path), fields={"id": "uid", "instruction": "prompt", "input": "ctx", "output": None})
    assert load_seeds(cfg) == [Seed("q1", "What is entropy?"), Seed("q2", "Define a monad.", "Haskell")]
    assert [s.id for s in load_seeds(_cfg("local_json", path=str(path), fields={"instruction": "prompt"}, limit=1))] == ["0"]


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "ok"}\n{"instruction": "broken"\n', r"bad\.jsonl:2: invalid JSON"),
    ('{"instruction": "ok"}\n["not", "an", "object"]\n', r"bad\.jsonl:2: record 1 is a list, expected a JSON object"),
    ('{"instruction": "ok"}\n{"output": "no instruction"}\n', r"bad\.jsonl:2: missing field 'instruction'"),
    ('{"instruction": "   "}\n', r"bad\.jsonl:1: field 'instruction' is empty"),
    ('{"instruction": ["a"]}\n', r"bad\.jsonl:1: field 'instruction' must be a string"),
    ('{"id": "x", "instruction": "a b"}\n{"id": "x", "instruction": "c d"}\n', r"bad\.jsonl:2: duplicate seed id 'x'"),
    ("", r"bad\.jsonl: file is empty"),
])
def test_malformed_files_name_file_line_and_reason(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    fields = {"id": "id"} if '"id"' in content else {}
    with pytest.raises(TeamsRLError, match=message):
        load_seeds(_cfg("local_json", path=str(path), fields=fields))


def test_malformed_json_array_reports_the_record_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a b c"},\n  {"instruction": "d e f"},\n  "oops"\n]')
    with pytest.raises(TeamsRLError, match=r"bad\.json:4: record 2 is a str"):
        load_seeds(_cfg("alpaca", path=str(path)))
    path.write_text('[\n  {"instruction": "a b c"},\n  {"instruction": "d e f",}\n]')
    with pytest.raises(TeamsRLError, match=r"bad\.json:3: invalid JSON"):
        load_seeds(_cfg("alpaca", path=str(path)))


def test_config_errors():
    with pytest.raises(TeamsRLError, match="needs seeds.path"):
        load_seeds(_cfg("local_json"))
    with pytest.raises(TeamsRLError, match="unknown"):
        load_seeds({"kind": "sharegpt"})
    with pytest.raises(TeamsRLError, match="no seed instructions"):
        load_seeds({"kind": "tiny", "start": 58})
    with pytest.raises(TeamsRLError, match="invalid index range"):
        load_seeds({"kind": "tiny", "start": 5, "stop": 2})
    with pytest.raises(TeamsRLError, match="seed file /nonexistent/seeds.jsonl does not exist"):
        load_seeds({"kind": "local_json", "path": "/nonexistent/seeds.jsonl"})
