"""The wandb workspace (teams_rl/dashboard.py): the offline spec is written without the network and parses, and
every key a panel plots is one the stages log in a real smoke run (read back from its offline wandb files)."""

from __future__ import annotations

import json
import re
import socket
import struct
from pathlib import Path

import pytest

from teams_rl import dashboard

BLOCK = 32768   # the .wandb transaction log is a LevelDB-style log: 32 KiB blocks of (crc, length, type) chunks


def wandb_records(path: Path):
    """The protobuf Records of an offline run's `run-*.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, chunks = 7, []          # after ":W&B", the 2-byte magic and the 1-byte version
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):    # the rest of a block is zero padding
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):       # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def logged_runs(run_dir: Path) -> dict[str, dict]:
    """{job_type: {"group", "keys": {key: "scalar" | media/table type}}} over the offline runs of `run_dir`."""
    out = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"group": None, "keys": {}}
        job = None
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                job, run["group"] = record.run.job_type, record.run.run_group
            items = record.history.item if kind == "history" else record.summary.update if kind == "summary" else ()
            for item in items:
                parts = list(item.nested_key) or [item.key]    # [key], or [key, field] of a table or an image
                if len(parts) == 2 and parts[1] == "_type":
                    run["keys"][parts[0]] = json.loads(item.value_json)
                elif len(parts) == 1 and not parts[0].startswith("_"):
                    run["keys"].setdefault(parts[0], "scalar")
        out[job] = run
    return out


def panel_keys(spec: dict) -> list[tuple[str, str, str]]:
    """(section, kind, key or regex) for every key a panel of the saved spec plots, as wandb will read it."""
    def const_keys(node):
        if isinstance(node, dict):
            key = node.get("key")
            if isinstance(key, dict) and key.get("nodeType") == "const":
                yield key["val"]
            for value in node.values():
                yield from const_keys(value)
        elif isinstance(node, list):
            for value in node:
                yield from const_keys(value)

    out = []
    for section in spec["spec"]["section"]["panelBankConfig"]["sections"]:
        for panel in section["panels"]:
            view, config = panel["viewType"], panel["config"]
            if view == "Weave":
                out += [(section["name"], "table", k) for k in const_keys(config)]
                continue
            out += [(section["name"], "media" if view == "Media Browser" else "scalar", k)
                    for k in config.get("metrics", []) + config.get("mediaKeys", [])]
            if config.get("metricRegex"):
                out.append((section["name"], "regex", config["metricRegex"]))
    return out


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the offline dashboard opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_offline_spec_is_written_without_the_network_and_parses(tmp_path, monkeypatch, capsys):
    _no_network(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "dashboard" / "workspace.json"
    assert dashboard.main(["--out", str(out), "--tag", "rl=trpo", "--tag", "operators=teams_rl",
                           "--experiment", "smoke"]) == 0
    assert f"to {out}" in capsys.readouterr().out
    spec = json.loads(out.read_text())
    assert spec["project"] == "teams_rl" and spec["displayName"] == "teams_rl"
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == [s.name for s in dashboard.sections()]
    assert [len(s["panels"]) for s in sections] == [len(s.panels) for s in dashboard.sections()]
    names = [s["name"] for s in sections]
    for stage in ("Policy", "Generate", "quality", "Finetune", "Evaluate", "Privacy", "Cost"):
        assert any(stage in n for n in names), stage
    runset = spec["spec"]["section"]["runSets"][0]
    assert runset["grouping"] == [{"name": "group", "section": "run"}]     # runs grouped by experiment
    filters = runset["filters"]["filters"]
    assert [(f["key"]["name"], f["op"], f["value"]) for f in filters] == [
        ("tags", "IN", ["rl=trpo"]), ("tags", "IN", ["operators=teams_rl"]), ("group", "=", "smoke")]
    assert all(f.get("connector", "AND") == "AND" for f in filters)


def test_offline_unless_online_with_an_entity_and_a_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))            # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    assert dashboard.offline_reason(None) == "no --entity"
    assert "no wandb API key" in dashboard.offline_reason("me")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert dashboard.offline_reason("me") is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert dashboard.offline_reason("me") == "WANDB_MODE=disabled"


@pytest.mark.slow
def test_every_panel_key_is_logged_by_a_smoke_run(tmp_path, monkeypatch):
    """A real smoke pipeline (rule-based LLM roles, the tiny Llama as IFD scorer) logging to offline wandb."""
    from teams_rl.__main__ import execute
    from tests.conftest import compose_config
    from tests.fakes import rule_llm_overrides

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config(["+experiment=smoke", "logger=wandb", "experiment_name=dash",
                          "generate.quality.ifd_model=tiny_llama", *rule_llm_overrides()], tmp_path / "artifacts")
    assert execute(cfg, str(tmp_path / "run")) == 0
    runs = logged_runs(tmp_path / "run")
    assert set(runs) == {"policy", "generate", "finetune", "evaluate_base", "evaluate", "privacy", "report"}
    assert {r["group"] for r in runs.values()} == {"dash"}                  # the workspace groups by this
    logged = {}
    for run in runs.values():
        logged.update(run["keys"])

    out = tmp_path / "workspace.json"
    assert dashboard.main(["--out", str(out)]) == 0
    keys = panel_keys(json.loads(out.read_text()))
    assert len(keys) >= 60
    missing = [(s, k) for s, kind, k in keys if kind in ("scalar", "media", "table") and k not in logged]
    assert not missing, missing
    expected = {"media": "image-file", "table": "table-file", "scalar": "scalar"}
    wrong = [(s, k, logged[k]) for s, kind, k in keys if kind in expected and logged[k] != expected[kind]]
    assert not wrong, wrong
    unmatched = [(s, k) for s, kind, k in keys if kind == "regex" and not any(re.search(k, key) for key in logged)]
    assert not unmatched, unmatched
