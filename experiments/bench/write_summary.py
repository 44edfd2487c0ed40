"""Write experiments/benchmarks.md: the date, this machine's probe figures and every benchmark's latest result.

`make bench` runs every `experiments/bench/bench_*.py` (each writes `results/<name>.json`) and then this script.
The machine figures come from `../shared/tools/cpu_probe.py` (fp32/bf16 matmul GFLOPS with torch's threads), run
now; where the checkout has no `../shared` the file says so. Each benchmark's row gives the ratio it printed,
read back from its JSON, its target, and whether it was met; a benchmark with no JSON (e.g. the GPU one on a CPU
machine) says so. `notes.md` beside this script is appended as the notes section.

    python experiments/bench/write_summary.py [--results DIR] [--out FILE] [--probe PATH]
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from datetime import date, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROBE = REPO.parent / "shared" / "tools" / "cpu_probe.py"
PROBE_COLUMNS = [("cpu", "cpu"), ("cores", "cores"), ("torch threads", "torch_threads"), ("flags", "flags"),
                 ("fp32 GFLOPS", "fp32_gflops"), ("bf16 GFLOPS", "bf16_gflops"),
                 ("fp32 vs slowest seen (58.6)", "slowdown_vs_this_for_slowest_seen_fp32")]


def probe(path: Path) -> tuple[dict | None, str]:
    """(figures, how they were got): the probe's one JSON line, or None and why not."""
    if not path.is_file():
        return None, f"`{path.name}` not found at `{path}`: this checkout has no `../shared`, so no probe figures"
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith("{")]
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return None, f"`{path.name}` failed: {why}"
    return json.loads(lines[-1]), "`python ../shared/tools/cpu_probe.py`, run when this file was written"


def _x(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}×"


# -- one line per benchmark: (result, target, met) from its JSON ---------------------------------------------
def _request_engine(d):
    e = d["engine"]
    result = (f"{e['requests_per_s']} req/s = **{e['fraction_of_ideal']}** of the ideal "
              f"{d['ideal_requests_per_s']:.0f}/s; {d['speedup_vs_baseline']}× the official sequential loop")
    return result, f"≥ {d.get('target_fraction_of_ideal', 0.9)} of ideal", d.get("target_met")


def _local_generation(d):
    result = (f"batch {d['batch_size']}: {d['batched']['tokens_per_s']} vs {d['sequential']['tokens_per_s']} tok/s "
              f"one at a time = **{_x(d['speedup'])}**")
    auto = d.get("auto")
    if auto:
        result += (f"; `dtype: auto` → {auto['dtype']}: {auto['batched']['tokens_per_s']} tok/s batched = "
                   f"**{_x(auto['vs_float32_batched'])}** float32")
    return result, f"≥ {d['target_speedup']}×", d.get("meets_target")


def _shared_prefix(d):
    result = (f"{d['rows']} rewrites, {d['shared_tokens']} of {d['prompt_tokens_mean']} prompt tokens shared: "
              f"{d['plain_s']} s vs {d['shared_s']} s = **{_x(d['speedup'])}**; identical answers "
              f"{d['identical_answers']}/{d['rows']}")
    return result, f"≥ {d['target_speedup']}×", d.get("meets_target")


def _length_chunks(d):
    pad = d["tail_tokens_padded"]
    result = (f"{d['rows']} rewrites, padded prompt tails {pad['plain']} → {pad['chunked']} tokens in {d['chunks']} "
              f"chunks: {d['plain_s']} s vs {d['chunked_s']} s = **{_x(d['speedup'])}**; identical answers "
              f"{d['identical_answers']}/{d['rows']}")
    return result, f"≥ {d['target_speedup']}×", d.get("meets_target")


def _sft_shared_prefix(d):
    result = (f"{d['steps']} SFT steps of {d['examples_per_step']} (~{d['tokens_per_example']} tokens, "
              f"{d['shared_columns_first_step']} shared): Trainer {d['plain_s']} s vs SharedPrefixTrainer "
              f"{d['shared_s']} s = **{_x(d['speedup'])}**; losses differ by ≤ {d['max_loss_difference']:.1e}")
    return result, f"≥ {d['target_speedup']}×", d.get("meets_target")


def _vecenv(d):
    result = (f"{d['batched_env_steps_per_s']} vs {d['one_at_a_time_env_steps_per_s']} env-steps/s = "
              f"**{_x(d['ratio'])}**; identical instructions {d.get('identical_instructions')}")
    return result, f"≥ {d['target_ratio']}×", d["ratio"] >= d["target_ratio"]


def _dedup(d):
    result = (f"{d['subset']:,} subset: {d['fast_subset_s']} s vs {d['naive_subset_s']} s (**{d['speedup_subset']}×**, "
              f"identical output: {d['equal_output_on_subset']}); {d['n']:,}: {d['speedup_full_by_pairs']}× "
              "extrapolated by pair count")
    return result, f"≥ {d['target_speedup']}×", d["speedup_subset"] >= d["target_speedup"]


def _packing(d):
    modes = d["modes"]
    parts = [f"{name} {m['real_token_fraction']:.2f} real / {m['tokens_per_s']:.0f} tok/s ({_x(m['speedup_vs_padded'])})"
             for name, m in modes.items()]
    best = max(m["speedup_vs_padded"] for m in modes.values())
    return "; ".join(parts), f"≥ {d['target_speedup']}×", best >= d["target_speedup"]


def _privacy_scoring(d):
    rows = d["results"]
    parts = [f"{r['model']} {r['torch_threads']} thr: **{_x(r['speedup'])}** ({r['batched_seq_per_s']:.1f} vs "
             f"{r['one_at_a_time_seq_per_s']:.1f} seq/s)" for r in rows]
    parts += [f"{name} skipped" for name in d.get("skipped") or {}]
    return "; ".join(parts), f"≥ {d['target_speedup']}×", bool(rows) and all(
        r["speedup"] >= d["target_speedup"] for r in rows)


def _generate_stage(d):
    s, b = d["stream"], d["barrier"]
    result = (f"stream **{s['efficiency']}** of the bound ({s['llm_wall_s']} s vs {s['bound_s']} s), barrier "
              f"{b['efficiency']}; same records: {d['same_records']}")
    return result, "stream ≥ 0.85 of bound", s["efficiency"] >= 0.85 and d["same_records"]


def _finetune_gpu(d):
    parts = [f"{name}: {r['tokens_per_s']:.0f} tok/s, MFU **{r['mfu']}**" for name, r in d["runs"].items()]
    target = d.get("target_mfu", 0.4)
    return f"{d['device']}: " + "; ".join(parts), f"MFU ≥ {target}", all(
        r["mfu"] >= target for r in d["runs"].values())


SUMMARIES = {"request_engine": _request_engine, "local_generation": _local_generation, "vecenv": _vecenv,
             "shared_prefix": _shared_prefix, "length_chunks": _length_chunks,
             "sft_shared_prefix": _sft_shared_prefix,
             "dedup": _dedup, "packing": _packing, "privacy_scoring": _privacy_scoring,
             "generate_stage": _generate_stage, "finetune_gpu": _finetune_gpu}
RATIO_WORDS = ("speedup", "ratio", "fraction", "efficiency", "mfu")


def _generic(d):
    """A result without a summary of its own: its top-level figures named like ratios."""
    found = [f"{k} {v}" for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and any(w in k for w in RATIO_WORDS) and not k.startswith("target")]
    target = next((f"{v}" for k, v in d.items() if k.startswith("target") and not isinstance(v, bool)), "—")
    met = next((v for k, v in d.items() if isinstance(v, bool) and ("met" in k or "meets" in k)), None)
    return "; ".join(found) or "(no ratio in its JSON)", target, met


def summarise(name: str, data: dict) -> tuple[str, str, bool | None]:
    try:
        return SUMMARIES[name](data) if name in SUMMARIES else _generic(data)
    except (KeyError, TypeError, ValueError):  # the JSON's layout changed: fall back to its ratios
        return _generic(data)


def recorded(data: dict, path: Path) -> str:
    """When the result was measured: the date its machine figures carry, else the file's time."""
    for key in ("machine", "machine_figures"):
        node = data.get(key)
        if isinstance(node, dict) and node.get("date"):
            load = node.get("load_average_1m")
            return node["date"] + (f", load {load}" if load is not None else "")
    return datetime.fromtimestamp(path.stat().st_mtime).date().isoformat() + " (file time)"


def what(script: Path, limit: int = 160) -> str:
    """The first sentence of a benchmark script's docstring (its first paragraph may wrap over lines)."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    sentence = " ".join(doc.split("\n\n", 1)[0].split()).split(". ", 1)[0].rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0]
        sentence += ("`" if sentence.count("`") % 2 else "") + " …"  # never leave a code span open
    return sentence.replace("|", "/")


def render(bench_dir: Path, results: Path, figures: dict | None, source: str, notes: str) -> str:
    out = ["# Benchmarks", "",
           f"Written {date.today().isoformat()} by `experiments/bench/write_summary.py`. `make bench` runs every "
           "`experiments/bench/bench_*.py` — each measures its baseline in the same run, prints the ratio and writes "
           "`experiments/bench/results/<name>.json` — and then writes this file from those results.", "",
           "## Machine", ""]
    if figures is None:
        out += [f"No probe figures: {source}.", ""]
    else:
        out += ["| " + " | ".join(c for c, _ in PROBE_COLUMNS) + " |", "|" + "---|" * len(PROBE_COLUMNS),
                "| " + " | ".join(str(figures.get(k, "—")) for _, k in PROBE_COLUMNS) + " |", "",
                f"From {source}. Benchmarks that record their own machine figures keep them in their JSON.", ""]
    out += ["## Results", "", "| benchmark | what is measured | result | target | met | recorded |",
            "|---|---|---|---|---|---|"]
    for script in sorted(bench_dir.glob("bench_*.py")):
        name = script.stem.removeprefix("bench_")
        path = results / f"{name}.json"
        if not path.is_file():
            out.append(f"| `{script.stem}` | {what(script)} | not recorded (no `results/{name}.json`) | | | |")
            continue
        data = json.loads(path.read_text())
        result, target, met = summarise(name, data)
        mark = {True: "yes", False: "**no**", None: "—"}[met if isinstance(met, bool) else None]
        out.append(f"| `{script.stem}` | {what(script)} | {result} | {target} | {mark} | {recorded(data, path)} |")
    if notes.strip():
        out += ["", "## Notes", "", notes.strip()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-dir", type=Path, default=HERE)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "benchmarks.md")
    parser.add_argument("--probe", type=Path, default=PROBE, help="cpu_probe.py (default: ../shared/tools/)")
    parser.add_argument("--notes", type=Path, default=HERE / "notes.md")
    args = parser.parse_args(argv)
    figures, source = probe(args.probe)
    notes = args.notes.read_text() if args.notes.is_file() else ""
    args.out.write_text(render(args.bench_dir, args.results, figures, source, notes))
    print(f"wrote {args.out}" + ("" if figures else f" ({source})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
