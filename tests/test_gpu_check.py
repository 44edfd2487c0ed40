"""experiments/gpu/check.sh --cpu-smoke: every section of the GPU check runs (tiny shapes, CPU) and the results
file has each section with its figures."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO

SECTIONS = ("## SFT MFU", "## DeepSpeed ZeRO (1 device)", "## hf backend generation", "## Privacy scoring")
NUMBER = re.compile(r"\d+\.\d+|\d{2,}")


def table_rows(text: str, header: str) -> list[list[str]]:
    """The data rows of the first table after `header` (cells stripped)."""
    body = text.split(header, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


@pytest.mark.slow  # ~1-2 min on 2 cores: five child processes, DeepSpeed on a CPU (its shm op compiles once)
def test_cpu_smoke_writes_every_section_with_numbers(tmp_path):
    out = tmp_path / "gpu_smoke.md"
    done = subprocess.run(["bash", "experiments/gpu/check.sh", "--cpu-smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# GPU check (CPU smoke run)") and "Sections that did not finish" not in text
    for header in SECTIONS:
        rows = table_rows(text, header)
        assert rows and all(any(NUMBER.search(cell) for cell in row) for row in rows), header
    sft = table_rows(text, "## SFT MFU")[0]
    assert float(sft[-2]) > 0 and sft[-1] == "≥ 0.4"             # an MFU against the measured CPU peak
    zero = table_rows(text, "## DeepSpeed ZeRO (1 device)")
    assert [r[0] for r in zero] == ["zero2", "zero3"] and all(r[5] == "True" for r in zero)
    assert [r[0] for r in table_rows(text, "## hf backend generation")] == ["1", "4"]
    assert [r[0] for r in table_rows(text, "## Privacy scoring")] == ["1", "8"]
    assert "6 × N" in text and "6·L·h·Σn(n+1)/Σn" in text


@pytest.mark.slow  # ~6 s: a child process importing torch
def test_without_a_gpu_the_default_run_refuses_and_writes_nothing(tmp_path):
    done = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "experiments/gpu/check.py", "--out",
                           str(tmp_path / "x.md")], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and "no CUDA device here" in done.stdout
    assert not (tmp_path / "x.md").exists()


def test_peak_table_and_flop_formula():
    import sys

    sys.path.insert(0, str(REPO))
    from experiments.gpu import check

    assert check.peak_for("NVIDIA H200") == check.peak_for("NVIDIA H100 80GB HBM3") == 989e12
    assert check.peak_for("NVIDIA GH200 480GB") == 989e12 and check.peak_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert check.peak_for("Some Other GPU") is None
    # two examples of 3 and 1 tokens, 2 layers, hidden 4: 6 * 2 * 4 * (3*4 + 1*2) / 4 tokens
    assert check.attention_flops_per_token([3, 1], layers=2, hidden=4) == 6 * 2 * 4 * 14 / 4
