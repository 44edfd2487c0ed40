"""experiments/bench/write_summary.py: benchmarks.md from the results JSONs and the machine probe."""

from __future__ import annotations

import json
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO))

from experiments.bench import write_summary  # noqa: E402


def _bench(folder, name, doc):
    (folder / f"bench_{name}.py").write_text(f'"""{doc}\n\nMore words.\n"""\n')


def test_summary_has_every_benchmark_the_probe_and_the_notes(tmp_path):
    bench, results = tmp_path / "bench", tmp_path / "results"
    bench.mkdir()
    results.mkdir()
    _bench(bench, "local_generation", "Local generation throughput: batched vs one at a time.")
    _bench(bench, "finetune_gpu", "bf16 fine-tuning MFU on one GPU.")
    _bench(bench, "new_thing", "Something new.")
    (results / "local_generation.json").write_text(json.dumps({
        "batch_size": 8, "batched": {"tokens_per_s": 7.72}, "sequential": {"tokens_per_s": 2.0}, "speedup": 3.86,
        "target_speedup": 3.5, "meets_target": True,
        "auto": {"dtype": "float32", "batched": {"tokens_per_s": 7.7}, "vs_float32_batched": 1.0},
        "machine_figures": {"date": "2026-12-01", "load_average_1m": 1.5}}))
    (results / "new_thing.json").write_text(json.dumps({"speedup": 2.5, "target_speedup": 2.0, "meets_target": True}))
    probe = tmp_path / "cpu_probe.py"
    probe.write_text('import json\nprint("warming up")\nprint(json.dumps({"cpu": "x86_64", "cores": 2, '
                     '"torch_threads": 2, "flags": "avx2", "fp32_gflops": 146.7, "bf16_gflops": 0.8, '
                     '"slowdown_vs_this_for_slowest_seen_fp32": 2.5}))\n')
    notes = tmp_path / "notes.md"
    notes.write_text("**A note.** Words.\n")
    out = tmp_path / "benchmarks.md"
    assert write_summary.main(["--bench-dir", str(bench), "--results", str(results), "--out", str(out),
                               "--probe", str(probe), "--notes", str(notes)]) == 0
    text = out.read_text()
    assert "| x86_64 | 2 | 2 | avx2 | 146.7 | 0.8 | 2.5 |" in text
    assert ("| `bench_local_generation` | Local generation throughput: batched vs one at a time | batch 8: 7.72 vs "
            "2.0 tok/s one at a time = **3.86×**; `dtype: auto` → float32: 7.7 tok/s batched = **1.00×** float32 | "
            "≥ 3.5× | yes | 2026-12-01, load 1.5 |") in text
    assert "| `bench_finetune_gpu` | bf16 fine-tuning MFU on one GPU | not recorded (no `results/finetune_gpu.json`)" in text
    assert "| `bench_new_thing` | Something new | speedup 2.5 | 2.0 | yes |" in text
    assert text.rstrip().endswith("**A note.** Words.")


def test_without_shared_the_file_says_so(tmp_path):
    out = tmp_path / "benchmarks.md"
    write_summary.main(["--bench-dir", str(tmp_path), "--results", str(tmp_path), "--out", str(out),
                        "--probe", str(tmp_path / "absent" / "cpu_probe.py"), "--notes", str(tmp_path / "none.md")])
    text = out.read_text()
    assert "No probe figures: `cpu_probe.py` not found" in text and "this checkout has no `../shared`" in text
    assert "## Results" in text and "## Notes" not in text
