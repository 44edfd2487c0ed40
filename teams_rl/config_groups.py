"""Config groups that Hydra builds from other groups: the LLM roles.

`instructor=X`, `reviewer=X` and `expert=X` are groups whose options are the backend presets in `conf/llm/`
(one file per backend), each followed by what belongs to the role whatever its backend (`conf/role/<role>.yaml`,
e.g. the reviewer's greedy 8-token answers). Registering them here means a new backend preset is one file in
`conf/llm/` and is at once an option of all three roles. Called before Hydra composes (`teams_rl.__main__`,
the tests); launchers that start other processes (joblib, submitit) carry the registration along.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ROLES = ("instructor", "reviewer", "expert")


def register_role_groups(conf_dir: Path = CONF_DIR) -> list[str]:
    """Register `<role>/<preset>` for every `conf/llm/<preset>.yaml`; returns the preset names."""
    store = ConfigStore.instance()
    presets = sorted(p.stem for p in (Path(conf_dir) / "llm").glob("*.yaml"))
    for role in ROLES:
        for preset in presets:
            store.store(group=role, name=preset, provider="teams_rl",
                        node={"defaults": [{"/llm@_here_": preset}, {"/role@_here_": role}, "_self_"]})
    return presets
