"""Hydra callback: when a multirun ends, aggregate its jobs into `<sweep dir>/report/report.md`.

Enabled in `conf/config.yaml`:

    hydra:
      callbacks:
        sweep_report:
          _target_: teams_rl.report.callback.SweepReport

It reads `report.primary_attack`, `report.figures` and `report.dpi` from the sweep's config. A failure to
aggregate never fails the sweep: it is reported in one line (re-run with `python -m teams_rl.report DIR`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from teams_rl.errors import TeamsRLError

log = logging.getLogger(__name__)


class SweepReport(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.enabled:
            return
        from teams_rl.report.sweep import aggregate_sweep

        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        rep = config.get("report") or {}
        try:
            path = aggregate_sweep(sweep_dir, primary_attack=str(rep.get("primary_attack") or "loss"),
                                   figures=bool(rep.get("figures", True)), dpi=int(rep.get("dpi") or 110))
        except TeamsRLError as err:
            print(f"sweep report: {err} (re-run: python -m teams_rl.report {sweep_dir})", file=sys.stderr)
            return
        except Exception as err:  # the sweep's results are on disk whatever happens here
            log.exception("sweep report failed")
            print(f"sweep report failed: {type(err).__name__}: {err} (re-run: python -m teams_rl.report "
                  f"{sweep_dir})", file=sys.stderr)
            return
        print(f"sweep report: {path}")
