"""`python -m teams_rl [+experiment=NAME] [overrides]`: compose the config and run the pipeline.

Exit codes: 0 done; 1 Hydra could not compose the config (its own message, e.g. an unknown group option);
2 a bad config value, input file, model path or missing API key (one `error:` line, nothing started);
3 a role's query or USD budget ran out (finished work kept, rerun with a larger budget to resume);
4 LLM requests kept failing past the stage's failure budget, or llm_check found a role unreachable
(finished work kept, no manifest committed, a rerun sends only what is missing).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

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
    code = execute(cfg, HydraConfig.get().runtime.output_dir)
    if code:
        sys.exit(code)


def execute(cfg: DictConfig, run_dir: str) -> int:
    """Run the pipeline; a user-facing error becomes one `error:` line on stderr and its exit code."""
    from teams_rl.pipeline import run_pipeline

    try:
        results = run_pipeline(cfg, run_dir)
    except TeamsRLError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return err.exit_code
    if "dry_run" in results:  # the table is printed; the figures are in the run dir
        return 0
    report = Path(run_dir) / "report" / "report.md"
    print(f"\ndone: {', '.join(results)}. outputs: {run_dir} (config.resolved.yaml, run_manifest.json, "
          f"metrics.json); artifacts: {cfg.paths.artifacts}")
    if report.is_file():
        print(f"report: {report}")
    return 0


def main() -> None:
    from teams_rl.config_groups import register_role_groups

    register_role_groups()
    run()


if __name__ == "__main__":
    main()
