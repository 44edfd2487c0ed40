"""Multi-process fine-tuning: the stage starts a launcher on this module, waits for it and forwards its logs.

    python -m teams_rl.sft.train <artifact>/job.yaml      # what each rank runs (not Hydra: no run-dir race)

Launchers, chosen from `finetune.*` (`launcher: auto` picks the first that applies):
- `hostfile` set            -> `deepspeed --hostfile F --no_local_rank --module teams_rl.sft.train JOB`
                               (DeepSpeed's runner; pdsh/ssh to the hosts, or a local launch for `localhost` only)
- `nnodes > 1` (in SLURM)   -> `srun --nodes N --ntasks-per-node 1 torchrun --nnodes N --rdzv-backend c10d ...`
                               (one torchrun per allocated node; this process runs on the first node)
- `nproc_per_node > 1`      -> `torchrun --nproc_per_node P -m teams_rl.sft.train JOB` on this node
                               (`launcher: deepspeed` -> `deepspeed --num_gpus P --no_local_rank ...`)
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from teams_rl.errors import TeamsRLError
from teams_rl.ports import free_port

log = logging.getLogger(__name__)

LAUNCHERS = ("auto", "torchrun", "deepspeed")
RANK_ENTRY = "teams_rl.sft.train"  # the module every rank runs (`python -m teams_rl.sft.train JOB`)
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


@dataclass
class LaunchSettings:
    nproc_per_node: int = 1
    nnodes: int = 1
    hostfile: str | None = None
    launcher: str = "auto"
    master_port: int | None = None

    @classmethod
    def from_config(cls, node) -> LaunchSettings:
        settings = cls(nproc_per_node=int(node.get("nproc_per_node") or 1), nnodes=int(node.get("nnodes") or 1),
                       hostfile=node.get("hostfile") or None, launcher=str(node.get("launcher") or "auto"),
                       master_port=node.get("master_port"))
        if settings.launcher not in LAUNCHERS:
            raise TeamsRLError(f"finetune.launcher={settings.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if settings.nproc_per_node < 1 or settings.nnodes < 1:
            raise TeamsRLError("finetune.nproc_per_node and finetune.nnodes must be >= 1")
        return settings

    @property
    def kind(self) -> str:
        """in_process | deepspeed | srun | torchrun"""
        if self.hostfile:
            return "deepspeed"
        if self.nnodes > 1:
            return "srun"
        if self.nproc_per_node > 1:
            return "deepspeed" if self.launcher == "deepspeed" else "torchrun"
        return "in_process"

    def world_size(self) -> int:
        if self.hostfile:
            return sum(read_hostfile(self.hostfile).values())
        return self.nproc_per_node * self.nnodes


def read_hostfile(path: str | Path) -> dict[str, int]:
    """DeepSpeed hostfile lines `host slots=N` (comments and blank lines allowed) -> {host: slots}."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TeamsRLError(f"finetune.hostfile {path} does not exist")
    hosts: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(line)
        if match is None or match.group(1) in hosts:
            raise TeamsRLError(f"finetune.hostfile {path}: line {lineno} is not a new 'host slots=N' entry: {line!r}")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise TeamsRLError(f"finetune.hostfile {path} lists no hosts")
    return hosts


def build_command(settings: LaunchSettings, job_path: str | Path, port: int) -> list[str]:
    """The launcher command line that runs `python -m teams_rl.sft.train JOB` on every rank."""
    entry = [RANK_ENTRY, str(job_path)]
    kind = settings.kind
    if kind == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port)]
        if settings.hostfile:
            cmd += ["--hostfile", str(Path(settings.hostfile).expanduser())]
        else:
            cmd += ["--num_gpus", str(settings.nproc_per_node)]
        return cmd + ["--no_local_rank", "--module", *entry]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(settings.nproc_per_node)]
    if kind == "srun":
        if "SLURM_JOB_ID" not in os.environ:
            raise TeamsRLError(f"finetune.nnodes={settings.nnodes} needs a SLURM allocation (run inside sbatch/salloc, "
                               "or use hydra/launcher=submitit_slurm) or a finetune.hostfile for the deepspeed launcher")
        head = socket.gethostname()
        return ["srun", f"--nodes={settings.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *torchrun,
                "--nnodes", str(settings.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{head}:{port}",
                "--rdzv_id", os.environ["SLURM_JOB_ID"], "-m", *entry]
    return torchrun + ["--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", *entry]


def _die_with_parent() -> None:
    """In the launcher's process (Linux): receive SIGTERM when the stage's process dies, even by SIGKILL, so
    that no orphaned ranks keep writing into the artifact folder."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _LogTail:
    """Forwards the rows that rank 0 appends to `train_log.jsonl` while the job runs."""

    def __init__(self, path: Path, on_row: Callable[[dict, int], None] | None):
        self.path, self.on_row = path, on_row
        self.offset = path.stat().st_size if path.exists() else 0

    def poll(self) -> None:
        if self.on_row is None or not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            row = json.loads(line)
            step = row.pop("step")
            self.on_row(row, step)


def run_launched(job_path: str | Path, settings: LaunchSettings, env: dict | None = None,
                 on_log: Callable[[dict, int], None] | None = None) -> None:
    """Run the job on `settings.world_size()` processes and wait. The launcher's output goes to
    `<artifact>/launch.log` and to this process's stderr; rank 0's log rows go to `on_log` as they come."""
    job_path = Path(job_path)
    out = job_path.parent
    port = int(settings.master_port or free_port())
    cmd = build_command(settings, job_path, port)
    log_path = out / "launch.log"
    log.info("finetune: starting %d processes: %s", settings.world_size(), " ".join(cmd))
    tail = _LogTail(out / "train_log.jsonl", on_log)
    with open(log_path, "ab") as log_fh:
        log_fh.write(f"$ {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        pump = threading.Thread(target=_pump, args=(proc.stdout, log_fh), daemon=True)
        pump.start()
        try:
            while proc.poll() is None:
                tail.poll()
                time.sleep(0.5)
        except BaseException:
            _stop(proc)
            raise
        pump.join(timeout=30)
        tail.poll()
    if proc.returncode != 0:
        raise TeamsRLError(f"finetune: {settings.kind} exited with code {proc.returncode}: "
                           f"{_last_error(log_path)} (full log: {log_path})")


def _pump(stream, log_fh) -> None:
    for line in iter(stream.readline, b""):
        log_fh.write(line)
        log_fh.flush()
        sys.stderr.write(line.decode(errors="replace"))


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the launcher's whole process group (the launcher and every rank)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _last_error(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|Exception)\b", line) and "Traceback" not in line]
    return (errors or lines or ["no output"])[-1][:300]
