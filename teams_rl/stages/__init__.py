"""Pipeline stages: each module `teams_rl.stages.<name>` declares one stage as `STAGE = Stage(...)`.

The declaration is the whole contract between a stage and the pipeline; `load_stage` checks it when the
module is loaded, so a misspelt or missing field fails there with one line instead of silently giving an
empty config slice (and one cached artifact shared by every config). `plan` orders the stages a run needs.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

from omegaconf import DictConfig

from teams_rl.errors import TeamsRLError

PACKAGE = __name__
# Names of the implicit protocol that came before `Stage`: a module still defining one of them is an error,
# so that a stage half-moved to the declaration cannot silently keep a default.
LEGACY_NAMES = ("VERSION", "CONFIG_KEYS", "INPUTS", "RESUMABLE", "config_keys", "inputs", "fingerprint_extra",
                "on_cached")

KeysOrFn = Sequence[str] | Callable[[DictConfig], Sequence[str]]


@dataclass(frozen=True)
class Stage:
    """What the pipeline needs to know about a stage.

    name            the module's name (`teams_rl.stages.<name>`), also the artifact folder `artifacts/<name>/`
    version         bump when the stage's output for the same config changes (new fingerprints)
    run(cfg, ctx)   does the work into `ctx.out_dir` and returns flat metrics
    config_keys     dotted config keys the output depends on (a list, or a function of the config)
    inputs          stages whose artifacts it reads (a list, or a function of the config)
    run_only_keys   dotted keys under `config_keys` that do not change this stage's result (how it runs, or
                    settings only other stages read); the node holding one is fingerprinted child by child
                    without it. Keys that are run-only everywhere (budgets, concurrency, ...) are listed once
                    in `teams_rl.artifacts.RUN_ONLY_NAMES`.
    resumable       keep an unfinished folder so the stage continues from it (else it is emptied)
    always_run      never reuse a finished artifact (a check of the world, e.g. whether the LLM servers answer)
    roles           the LLM roles the stage calls (a list or a function of the config); their clients are built
                    (key variables, model paths checked) before any stage runs, and a dry run prices them
    validate(cfg)   raise TeamsRLError for any setting this stage would reject; called for every planned
                    stage before the first one runs
    fingerprint_extra(cfg)  more values the output depends on (e.g. the content hash of a user-given file)
    on_cached(cfg, folder, run_dir)  called when the artifact is reused instead of run
    estimate(cfg)   for `dry_run`: the LLM requests the stage would send (see `teams_rl.dry_run`)
    """

    name: str
    version: int
    run: Callable[[DictConfig, Any], dict]
    config_keys: KeysOrFn
    inputs: KeysOrFn = ()
    run_only_keys: Sequence[str] = ()
    resumable: bool = False
    always_run: bool = False
    roles: KeysOrFn = ()
    validate: Callable[[DictConfig], None] | None = None
    fingerprint_extra: Callable[[DictConfig], dict] | None = None
    on_cached: Callable[..., None] | None = None
    estimate: Callable[[DictConfig], list] | None = None

    def inputs_for(self, cfg: DictConfig) -> list[str]:
        return [str(x) for x in (self.inputs(cfg) if callable(self.inputs) else self.inputs)]

    def roles_for(self, cfg: DictConfig) -> list[str]:
        return [str(x) for x in (self.roles(cfg) if callable(self.roles) else self.roles)]

    def config_keys_for(self, cfg: DictConfig) -> list[str]:
        return [str(x) for x in (self.config_keys(cfg) if callable(self.config_keys) else self.config_keys)]

    def fingerprint_keys(self, cfg: DictConfig) -> list[str]:
        """The dotted keys whose values make up the fingerprint: `config_keys` with run-only keys taken out."""
        from teams_rl.artifacts import expand_keys

        return expand_keys(cfg, self.config_keys_for(cfg), self.run_only_keys, stage=self.name)


def available_stages(package: str = PACKAGE) -> list[str]:
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def load_stage(name: str, package: str = PACKAGE) -> Stage:
    """The checked `STAGE` declaration of `package.<name>`; one-line TeamsRLError when it is missing or wrong."""
    known = available_stages(package)
    if name not in known:
        raise TeamsRLError(f"unknown stage '{name}' (available: {', '.join(known)})")
    try:
        module = importlib.import_module(f"{package}.{name}")
    except TypeError as err:  # Stage(...) with a misspelt or missing field raises here, at import
        raise TeamsRLError(f"stage '{name}': bad STAGE declaration ({_one_line(err)}; fields: "
                           f"{', '.join(f.name for f in fields(Stage))})") from None
    return check_declaration(name, module)


def check_declaration(name: str, module: ModuleType) -> Stage:
    stage = getattr(module, "STAGE", None)
    if not isinstance(stage, Stage):
        raise TeamsRLError(f"stage '{name}': {module.__name__} declares no `STAGE = Stage(...)`")
    legacy = [n for n in LEGACY_NAMES if hasattr(module, n)]
    if legacy:
        raise TeamsRLError(f"stage '{name}': {module.__name__} defines {', '.join(legacy)} outside its STAGE "
                           "declaration; put them in Stage(...)")
    problems = []
    if stage.name != name:
        problems.append(f"name is '{stage.name}', the module is '{name}'")
    if not isinstance(stage.version, int) or isinstance(stage.version, bool) or stage.version < 1:
        problems.append(f"version must be a positive int, got {stage.version!r}")
    for attr in ("run", "validate", "fingerprint_extra", "on_cached", "estimate"):
        value = getattr(stage, attr)
        if value is not None and not callable(value):
            problems.append(f"{attr} must be callable")
    if not callable(stage.run):
        problems.append("run is required")
    for attr in ("config_keys", "inputs", "roles"):
        value = getattr(stage, attr)
        if isinstance(value, str) or not (callable(value) or all(isinstance(k, str) for k in value)):
            problems.append(f"{attr} must be a list of strings or a function of the config")
    if isinstance(stage.run_only_keys, str) or not all(isinstance(k, str) for k in stage.run_only_keys):
        problems.append("run_only_keys must be a list of dotted keys")
    if problems:
        raise TeamsRLError(f"stage '{name}': bad STAGE declaration: {'; '.join(problems)}")
    return stage


def plan(cfg: DictConfig, requested: Sequence[str] | None = None) -> list[str]:
    """The requested stages (default `cfg.stages`) in order, with the inputs they need put first."""
    order: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in trail:
            raise TeamsRLError(f"stage dependency cycle: {' -> '.join(trail + (name,))}")
        if name in order:
            return
        for dep in load_stage(name).inputs_for(cfg):
            visit(dep, trail + (name,))
        order.append(name)

    for name in (cfg.stages if requested is None else requested):
        visit(str(name), ())
    return order


def _one_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]
