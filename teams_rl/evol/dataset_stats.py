"""Statistics and plots of a generated instruction dataset: lengths, operator mix, distinct-n, embedding
diversity (all-MiniLM-L6-v2, offline), compared with the seed instructions they were evolved from."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from teams_rl import config as C
from teams_rl.evol import quality
from teams_rl.evol.quality import distinct_n, word_lengths


def length_summary(lengths: Sequence[int]) -> dict:
    if not lengths:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "min": 0, "max": 0}
    arr = np.asarray(lengths, dtype=float)
    return {"mean": round(float(arr.mean()), 3), "median": float(np.median(arr)),
            "p90": float(np.percentile(arr, 90)), "min": int(arr.min()), "max": int(arr.max())}


def embedding_diversity(texts: Sequence[str], embed: Callable[[Sequence[str]], np.ndarray] | None = None) -> float | None:
    """Mean pairwise cosine distance, 1 - mean_{i!=j} cos(e_i, e_j), of L2-normalised sentence embeddings.

    Computed in O(n·d) from the sum vector: sum_{i!=j} cos = |sum e|^2 - n."""
    n = len(texts)
    if n < 2:
        return None
    if embed is None:
        from teams_rl.evol.embeddings import encode as embed
    vectors = np.asarray(embed(list(texts)), dtype=np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    total = vectors.sum(axis=0)
    mean_cos = (float(total @ total) - n) / (n * (n - 1))
    return round(1.0 - mean_cos, 4)


def dataset_stats(records: Sequence[dict], seed_texts: Sequence[str], *, embeddings: bool = True,
                  embed: Callable[[Sequence[str]], np.ndarray] | None = None) -> dict:
    """Statistics of the final records (`instruction`, `input`, `output`, `operator`, `step`) and of the seeds."""
    instructions = [r["instruction"] for r in records]
    outputs = [r.get("output") or "" for r in records]
    stats = {
        "records": len(records),
        "seeds_used": len({r["seed_id"] for r in records}),
        "instruction_words": length_summary(word_lengths(instructions)),
        "output_words": length_summary(word_lengths(outputs)),
        "seed_instruction_words": length_summary(word_lengths(seed_texts)),
        "operator_mix": dict(sorted(Counter(r["operator"] for r in records).items())),
        "step_mix": {str(k): v for k, v in sorted(Counter(int(r["step"]) for r in records).items())},
        "distinct_1": distinct_n(instructions, 1),
        "distinct_2": distinct_n(instructions, 2),
        "seed_distinct_1": distinct_n(seed_texts, 1),
        "seed_distinct_2": distinct_n(seed_texts, 2),
    }
    if embeddings:
        stats["embedding_diversity"] = embedding_diversity(instructions, embed)
        stats["seed_embedding_diversity"] = embedding_diversity(seed_texts, embed)
        stats["embedding_model"] = "sentence-transformers/all-MiniLM-L6-v2"
    return stats


def plot_stats(records: Sequence[dict], seed_texts: Sequence[str], out_dir: str | Path) -> list[Path]:
    """lengths.png (instruction and answer word counts, seeds for comparison) and operators.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    inst = word_lengths([r["instruction"] for r in records])
    seeds = word_lengths(seed_texts)
    bins = np.linspace(0, max(inst + seeds + [1]), 30)
    axes[0].hist(seeds, bins=bins, alpha=0.6, label=f"seeds (n={len(seeds)})")
    axes[0].hist(inst, bins=bins, alpha=0.6, label=f"generated (n={len(inst)})")
    axes[0].set(title="Instruction length", xlabel="words", ylabel="count")
    axes[0].legend()
    outs = word_lengths([r.get("output") or "" for r in records])
    axes[1].hist(outs, bins=30, color="tab:green")
    axes[1].set(title="Answer length", xlabel="words", ylabel="count")
    fig.tight_layout()
    paths.append(out_dir / "lengths.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.8))
    mix = Counter(r["operator"] for r in records)
    names = sorted(mix)
    ax.barh(names, [mix[n] for n in names], color="tab:purple")
    ax.set(title="Operator of each kept instruction", xlabel="records")
    fig.tight_layout()
    paths.append(out_dir / "operators.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _quality_card(section: dict | None) -> str:
    if not section or not section.get("enabled"):
        return quality.describe(section)
    return _md_table(*quality.table_rows(section)) + "\n\n" + quality.describe(section)


def write_card(out_dir: str | Path, cfg, metrics: dict, stats: dict, operators: Sequence[str],
               policy_manifest: dict | None, expert_model: str) -> Path:
    """The dataset card `README.md`: how the data was made, counts, filters, query accounting, config."""
    from omegaconf import OmegaConf

    gen = cfg.generate
    rules = C.plain(gen.get("rules")) or {}
    mode = metrics["mode"]
    policy = (policy_manifest or {}).get("config", {})
    how = {
        "teams_rl": "For each seed, the trained policy picked one operator per step; the expert LLM rewrote the "
                    "previous step's instruction with it (each step's output is the next step's input, as in "
                    "TeaMs-RL's `generate_data_alpaca.py`). Then the expert answered every evolved instruction.",
        "wizardlm": "WizardLM Evol-Instruct baseline: in each round the policy (a uniform random choice for "
                    "`rl=random`) picked an operator, the expert evolved the seed's current instruction, answered "
                    "it, and the evolution passed WizardLM's elimination rules or was dropped; a dropped evolution "
                    "was retried from its parent in the next round.",
        "none": "No evolution: the expert answered each seed instruction once (one record per seed, step 0).",
    }[mode]
    if "budget_capped" in metrics:  # generate.on_budget=cap
        how += (f" Expert query budget: {metrics['budget/max_expert_queries']:,} (`expert.budget.max_queries`); "
                f"{metrics['budget/expert_queries']:,} needed; "
                + (f"it ended the data after {metrics['seeds']} of {metrics['seeds_configured']} seeds (a refused "
                   "request is not data)." if metrics["budget_capped"] else "every seed fit."))
    calls = sorted((k, v) for k, v in metrics.items() if k.startswith(("calls/", "sent/", "truncated/")))
    drops = stats.get("dropped_by_reason", {})
    seeds_cfg = C.plain(cfg.get("seeds")) or {}
    filters_cfg = C.plain(cfg.get("filters")) or {}
    card = f"""---
language: [en]
task_categories: [text-generation]
tags: [instruction-tuning, evol-instruct, teams-rl, synthetic]
pretty_name: teams_rl generated instructions ({mode})
---

# Generated instruction dataset ({mode})

Made by the `generate` stage of `teams_rl`, a reproduction of TeaMs-RL (arXiv 2403.08694).

## How it was made
- Seeds: `{seeds_cfg.get('kind')}` ({metrics['seeds']} seed instructions; config below).
- {how}
- Steps per seed: {metrics['episode_length']}. Operators (action order): {', '.join(operators)}.
- Policy: `{policy.get('rl', {}).get('algorithm') if isinstance(policy.get('rl'), dict) else 'see the policy artifact'}`
  (policy artifact fingerprint `{(policy_manifest or {}).get('fingerprint', '-')}`). Generation rules on top of
  its scores: `{json.dumps(rules)}`.
- Expert LLM: `{expert_model}`; answers: one request per evolved instruction.
- Filters (in order; a record counts under the first it fails): failed evolution or answer, WizardLM rule 1
  (reviewer judge, {'on' if filters_cfg.get('elimination', {}).get('no_info_gain') else 'off'}), rules 2-4,
  Alpaca length/keyword filters, exact duplicates, ROUGE-L > {filters_cfg.get('rouge_l', {}).get('threshold')}
  near-duplicates ({'on' if filters_cfg.get('rouge_l', {}).get('enabled') else 'off'}).

## Counts
{_md_table(['quantity', 'records'], [['evolutions', metrics['evolutions']], ['final records', metrics['dataset/size']], ['train (members)', metrics['dataset/train']], ['heldout (non-members, by seed)', metrics['dataset/heldout']]] + [[f'dropped: {k}', v] for k, v in drops.items()])}

## LLM query accounting
`truncated` = answers cut off at `max_tokens` (kept; a long-answer model may need a larger limit).
`calls` = requests the generation needed (cache hits included, over all resumed runs); `sent` = requests
that reached a backend (cache misses).

{_md_table(['counter', 'requests'], calls) if calls else 'No LLM requests.'}

## Statistics
{_md_table(['statistic', 'generated', 'seeds'], [
        ['instruction words (mean)', stats['instruction_words']['mean'], stats['seed_instruction_words']['mean']],
        ['instruction words (p90)', stats['instruction_words']['p90'], stats['seed_instruction_words']['p90']],
        ['answer words (mean)', stats['output_words']['mean'], '-'],
        ['distinct-1', stats['distinct_1'], stats['seed_distinct_1']],
        ['distinct-2', stats['distinct_2'], stats['seed_distinct_2']],
        ['MiniLM embedding diversity (1 - mean cos)', stats.get('embedding_diversity', '-'), stats.get('seed_embedding_diversity', '-')],
    ])}

Operator mix: {json.dumps(stats['operator_mix'])}. Plots: `lengths.png`, `operators.png`.

## Quality per operator and step
{_quality_card(stats.get('quality'))}

## Files
- `dataset/`: `datasets.load_from_disk(...)` -> DatasetDict with `train` and `heldout` (columns: id, seed_id,
  step, operator, parent_id, parent_instruction, instruction, input, output).
- `alpaca.json` (train) and `heldout.json`: Alpaca format (`instruction`, `input`, `output`) for any SFT script.
- `journal.jsonl`: every evolution, answer and judgement (raw LLM text included); `dropped.jsonl`: dropped
  records with their reason; `stats.json`.

## Config
```yaml
{OmegaConf.to_yaml(OmegaConf.create({'generate': C.plain(gen), 'seeds': seeds_cfg, 'filters': filters_cfg})).strip()}
```
"""
    path = Path(out_dir) / "README.md"
    path.write_text(card)
    return path
