"""The shape of the package: stage declarations are checked at load, imports go down the floors only and
never in a circle, stage files stay orchestration-sized."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.stages import available_stages, load_stage
from tests.conftest import REPO

PACKAGE = REPO / "teams_rl"
# The import floors of docs/architecture.md, lowest first; anything else is the ground floor.
FLOORS = {"teams_rl.llm": 1, "teams_rl.evol": 2, "teams_rl.sft": 2, "teams_rl.eval": 2, "teams_rl.report": 3,
          "teams_rl.stages": 4, "teams_rl.pipeline": 5, "teams_rl.dry_run": 5, "teams_rl.__main__": 6}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports() -> dict[str, set[str]]:
    """Every teams_rl module each module imports, at the top or inside a function."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("teams_rl"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    graph[name].add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    return graph


def _floor(module: str) -> int:
    for prefix, floor in sorted(FLOORS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return floor
    return 0


def test_no_import_circle_in_the_package():
    graph = _imports()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(dep):] + [node, dep]))
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_imports_only_go_down_the_floors():
    upward = [f"{m} -> {d}" for m, deps in _imports().items() for d in deps
              if _floor(d) > _floor(m) and not (d == "teams_rl.stages" and m.startswith("teams_rl.stages."))]
    assert not upward, upward


def test_stage_files_are_orchestration_sized():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "stages").glob("*.py")}
    assert max(sizes.values()) <= 250, sizes


def test_every_stage_declares_itself():
    for name in available_stages():
        stage = load_stage(name)
        assert stage.name == name and stage.version >= 1 and callable(stage.run)


@pytest.fixture
def stage_package(tmp_path, monkeypatch):
    """A throw-away stage package `fake_stages` whose modules the test writes."""
    root = tmp_path / "fake_stages"
    root.mkdir()
    (root / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [m for m in sys.modules if m == "fake_stages" or m.startswith("fake_stages.")]:
        del sys.modules[name]


def _write(root: Path, name: str, body: str) -> None:
    (root / f"{name}.py").write_text("from teams_rl.stages import Stage\n\n\ndef run(cfg, ctx):\n    return {}\n\n\n"
                                     + textwrap.dedent(body))


@pytest.mark.parametrize("body, message", [
    ('STAGE = Stage(name="x", version=1, run=run, confg_keys=["a"])\n', "unexpected keyword argument 'confg_keys'"),
    ('STAGE = Stage(name="x", version=1, run=run)\n', "missing 1 required positional argument: 'config_keys'"),
    ('STAGE = Stage(name="y", version=1, run=run, config_keys=["a"])\n', "name is 'y', the module is 'x'"),
    ('STAGE = Stage(name="x", version="2", run=run, config_keys=["a"])\n', "version must be a positive int"),
    ('STAGE = Stage(name="x", version=1, run=run, config_keys="a")\n', "config_keys must be a list"),
    ('VERSION = 2\nSTAGE = Stage(name="x", version=1, run=run, config_keys=["a"])\n', "defines VERSION outside"),
    ('CONFIG_KEYS = ["a"]\n', "declares no `STAGE = Stage(...)`"),
])
def test_a_bad_stage_declaration_fails_at_load_with_one_line(stage_package, body, message):
    _write(stage_package, "x", body)
    with pytest.raises(TeamsRLError) as err:
        load_stage("x", package="fake_stages")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_misspelt_config_key_fails_instead_of_slicing_nothing(compose):
    stage = load_stage("privacy")
    cfg = compose([])
    assert stage.fingerprint_keys(cfg) == ["privacy"]
    broken = stage.__class__(**{**stage.__dict__, "config_keys": ["privcy"]})
    with pytest.raises(TeamsRLError, match="stage 'privacy': config key 'privcy' is not in the config"):
        broken.fingerprint_keys(cfg)


def test_run_only_keys_are_left_out_of_the_fingerprint_keys(compose):
    keys = load_stage("policy").fingerprint_keys(compose([]))
    assert "policy.updates" in keys and "policy.checkpoint_every" not in keys and "policy.progress" not in keys
    assert "policy" not in keys and "rl" in keys
