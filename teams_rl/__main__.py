"""`python -m teams_rl [+experiment=NAME] [overrides]`: compose the config and run the pipeline."""

from __future__ import annotations

import json
import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from teams_rl.errors import TeamsRLError

log = logging.getLogger("teams_rl")


def _env_defaults() -> None:
    # Offline-friendly defaults; an explicit environment always wins.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def run(cfg: DictConfig) -> None:
    _env_defaults()
    from teams_rl.pipeline import run_pipeline

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        results = run_pipeline(cfg, run_dir)
    except TeamsRLError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    if "dry_run" in results:  # the table is printed; the figures are in the run dir
        return
    print(json.dumps(results, indent=2, default=str))
    print(f"outputs: {run_dir} (config.resolved.yaml, run_manifest.json, metrics.json); "
          f"artifacts: {cfg.paths.artifacts}")


def main() -> None:
    from teams_rl.config_groups import register_role_groups

    register_role_groups()
    run()


if __name__ == "__main__":
    main()
