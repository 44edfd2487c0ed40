"""What a generation run reads besides its config: the policy update that generates and the non-member seeds.

- `policy_update(cfg)`: `generate.policy_update`, the saved update whose policy generates (None = the final agent;
  it must be in `policy.keep_updates`, checked before any stage runs); `generating_agent` loads it.
- Non-members for membership inference: either a fraction of the generated records held out by seed
  (`privacy.holdout_fraction` or `generate.holdout_fraction`), or `generate.heldout_seeds=N`, the N seeds right
  after the training range evolved the same way (the paper preset), so that every training seed is trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from teams_rl import config as C
from teams_rl.errors import TeamsRLError
from teams_rl.evol.generation import split_holdout

log = logging.getLogger(__name__)


def heldout_seeds(cfg: DictConfig) -> int | None:
    """`generate.heldout_seeds`: extra non-member seeds after the training range (None: hold out a fraction)."""
    n = C.integer(cfg, "generate.heldout_seeds", minimum=1, optional=True)
    if n is not None and OmegaConf.select(cfg, "privacy.holdout_fraction", default=None):
        raise TeamsRLError("generate.heldout_seeds and privacy.holdout_fraction both choose the non-members; "
                           "set one of them")
    return n


def holdout_fraction(cfg: DictConfig) -> float:
    """`privacy.holdout_fraction`, else `generate.holdout_fraction`: a fraction in [0, 1); 0 with heldout seeds."""
    if heldout_seeds(cfg) is not None:
        return 0.0
    if OmegaConf.select(cfg, "privacy.holdout_fraction", default=None) is not None:
        return C.fraction(cfg, "privacy.holdout_fraction")
    return C.fraction(cfg, "generate.holdout_fraction", optional=True) or 0.0


def policy_update(cfg: DictConfig) -> int | None:
    """`generate.policy_update`: the saved policy update that generates (None = the final agent). It must be one
    the policy stage keeps for good (`policy.keep_updates`), or the last update."""
    update = C.integer(cfg, "generate.policy_update", minimum=1, optional=True)
    if update is None or OmegaConf.select(cfg, "policy.updates", default=None) is None:
        return update
    last = C.integer(cfg, "policy.updates", minimum=1)
    if update == last:
        return None
    if update > last:
        raise TeamsRLError(f"generate.policy_update={update} but the policy trains {last} updates")
    if update not in C.integer_list(cfg, "policy.keep_updates", minimum=1):
        raise TeamsRLError(f"generate.policy_update={update} is not kept by the policy stage: add it to "
                           f"policy.keep_updates (e.g. policy.keep_updates=[{update}])")
    return update


def generating_agent(cfg: DictConfig, policy_dir: Path):
    from teams_rl.evol.agents import load_agent
    from teams_rl.evol.training import CHECKPOINTS

    update = policy_update(cfg)
    if update is None:
        return load_agent(policy_dir)
    folder = Path(policy_dir) / CHECKPOINTS / f"update_{update:06d}"
    if not folder.is_dir():
        raise TeamsRLError(f"generate.policy_update={update}: {folder} is missing (was the policy artifact made "
                           "with that update in policy.keep_updates?)")
    log.info("generate: the policy of update %d generates (%s)", update, folder)
    return load_agent(folder)


def heldout_seed_list(cfg: DictConfig, seeds: list) -> list:
    """The extra non-member seeds (`generate.heldout_seeds`; [] when a fraction is held out instead)."""
    from teams_rl.evol.seeds import load_heldout_seeds

    n = heldout_seeds(cfg)
    if n is None:
        return []
    extra = load_heldout_seeds(cfg.get("seeds"), n)
    clash = {s.id for s in seeds} & {s.id for s in extra}
    if clash:
        raise TeamsRLError(f"generate.heldout_seeds: {len(clash)} held-out seed ids are also training seeds")
    return extra


def split_records(cfg: DictConfig, kept: list[dict], extra: list) -> tuple[list[dict], list[dict]]:
    """(train, heldout): the extra seeds' records are the non-members, else a seeded fraction held out by seed."""
    if extra:
        extra_ids = {s.id for s in extra}
        return [r for r in kept if r["seed_id"] not in extra_ids], [r for r in kept if r["seed_id"] in extra_ids]
    return split_holdout(kept, holdout_fraction(cfg), int(cfg.seed))
