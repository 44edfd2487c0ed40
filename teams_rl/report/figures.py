"""The report's PNG figures, drawn from the files the stages saved (no pyplot state: Figure + Agg canvas).

Each function returns the written path, or None when the runs hold no data for that figure.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from teams_rl.plotting import DPI, operator_probabilities, reward_curve, roc_panels
from teams_rl.plotting import figure as _figure
from teams_rl.plotting import save as _save
from teams_rl.report.collect import RunResults, benchmark_series, number
from teams_rl.report.paper import PAPER_MODEL_LABELS, PaperResults
from teams_rl.report.tables import ATTACK_LABELS, BENCHMARKS


def policy_curves(runs: list[RunResults], path: Path, dpi: int = DPI) -> Path | None:
    """Mean reward per update for every run with a policy; with one run, its operator probabilities below."""
    runs = [r for r in runs if r.policy_history()]
    if not runs:
        return None
    single = len(runs) == 1
    fig, axes = _figure(8, 6.5 if single else 4.2, nrows=2 if single else 1)
    ax = axes[0][0]
    for run in runs:
        hist = run.policy_history()
        updates = np.array([row["update"] for row in hist])
        rewards = np.array([row.get("mean_reward") or 0.0 for row in hist], dtype=float)
        reward_curve(ax, updates, rewards, f"{run.label} ({run.metrics('policy').get('algorithm', '?')})")
        base = run.policy_history("policy_baseline")
        if base:
            reward_curve(ax, np.array([row["update"] for row in base]),
                         np.array([row.get("mean_reward") or 0.0 for row in base], dtype=float),
                         f"{run.label}: random operators (same budget)")
            versus = run.policy_vs_baseline()
            if versus is not None and versus["baseline_se"] is not None:
                ax.axhspan(versus["baseline"] - 2 * versus["baseline_se"], versus["baseline"] + 2 * versus["baseline_se"],
                           color="grey", alpha=0.15, label="baseline mean ± 2 SE")
    ax.set(xlabel="update", ylabel="mean reward per step", title="Policy learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if single:
        hist = runs[0].policy_history()
        names = [k[len("op_prob/"):] for k in hist[-1] if k.startswith("op_prob/")]
        order = runs[0].operator_order()
        names.sort(key=lambda o: order.index(o) if o in order else len(order))
        if names:
            operator_probabilities(axes[1][0], hist, names)
        else:
            axes[1][0].set_visible(False)
    return _save(fig, path, dpi)


def operator_mix(runs: list[RunResults], path: Path, dpi: int = DPI) -> Path | None:
    """Per run: the trained policy's operator probabilities and the operators of the kept instructions."""
    series: list[tuple[str, dict[str, float]]] = []
    for run in runs:
        probs = {k[len("op_prob/"):]: number(v) or 0.0 for k, v in run.metrics("policy").items()
                 if k.startswith("op_prob/")}
        if probs:
            series.append((f"{run.label}: policy P(op)", probs))
        mix = run.generate_stats().get("operator_mix") or {}
        total = sum(mix.values())
        if total:
            series.append((f"{run.label}: dataset share", {k: v / total for k, v in mix.items()}))
    if not series:
        return None
    ops: list[str] = []
    for run in runs:
        ops += [o for o in run.operator_order() if o not in ops]
    for _, values in series:
        ops += [o for o in values if o not in ops]
    fig, axes = _figure(9, 0.5 * len(ops) * max(1, len(series) / 2) + 2)
    ax = axes[0][0]
    height = 0.8 / len(series)
    y = np.arange(len(ops))
    for i, (label, values) in enumerate(series):
        ax.barh(y + i * height - 0.4 + height / 2, [values.get(o, 0.0) for o in ops], height=height, label=label)
    ax.set_yticks(y, ops)
    ax.invert_yaxis()
    ax.set(xlabel="fraction", xlim=(0, 1), title="Operator mix")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path, dpi)


def dataset_diversity(runs: list[RunResults], path: Path, dpi: int = DPI) -> Path | None:
    """distinct-1/2 and embedding diversity of the generated instructions vs their seeds."""
    metrics = (("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("embedding_diversity", "embedding div."))
    series: list[tuple[str, list[float | None]]] = []
    seeds_seen = set()
    for run in runs:
        s = run.generate_stats()
        if not s:
            continue
        seed_key = str((run.manifests["generate"].get("config") or {}).get("seeds"))
        if seed_key not in seeds_seen:
            seeds_seen.add(seed_key)
            series.append((f"seeds ({run.label})", [number(s.get(f"seed_{k}")) for k, _ in metrics]))
        series.append((f"generated: {run.label}", [number(s.get(k)) for k, _ in metrics]))
    if not series:
        return None
    fig, axes = _figure(8, 4.2)
    ax = axes[0][0]
    width = 0.8 / len(series)
    x = np.arange(len(metrics))
    for i, (label, values) in enumerate(series):
        heights = [0.0 if v is None else v for v in values]
        bars = ax.bar(x + i * width - 0.4 + width / 2, heights, width=width, label=label)
        for bar, v in zip(bars, values, strict=True):
            if v is None:
                ax.annotate("n/a", (bar.get_x() + bar.get_width() / 2, 0.01), ha="center", fontsize=7)
    ax.set_xticks(x, [label for _, label in metrics])
    ax.set(ylim=(0, 1.05), ylabel="higher = more diverse", title="Instruction diversity: seeds vs generated")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path, dpi)


def benchmark_bars(runs: list[RunResults], paper: PaperResults, path: Path, dpi: int = DPI) -> Path | None:
    """Benchmark scores (%): base, fine-tuned runs, and the paper's reported numbers where it gives them."""
    keys = [k for k, _ in BENCHMARKS] + ["average"]
    series: list[tuple[str, list[float | None], dict]] = [
        (label, [number(scores.get(k)) for k in keys], {"hatch": "//", "alpha": 0.6} if is_base else {})
        for label, scores, is_base in benchmark_series(runs)
    ]
    if not series:
        return None
    for model in paper.openllm_models():
        values = [paper.openllm(model, k).value for k, _ in BENCHMARKS]
        if any(v is not None for v in values):
            avg = sum(values) / len(values) if all(v is not None for v in values) else None
            series.append((PAPER_MODEL_LABELS.get(model, model),
                           [None if v is None else v / 100 for v in values] + [None if avg is None else avg / 100],
                           {"edgecolor": "black", "alpha": 0.5}))
    fig, axes = _figure(9, 4.5)
    ax = axes[0][0]
    width = 0.8 / len(series)
    x = np.arange(len(keys))
    for i, (label, values, style) in enumerate(series):
        pos = x + i * width - 0.4 + width / 2
        present = [j for j, v in enumerate(values) if v is not None]
        ax.bar(pos[present], [100 * values[j] for j in present], width=width, label=label, **style)
    ax.set_xticks(x, [label for _, label in BENCHMARKS] + ["average"])
    ax.set(ylabel="score (%)", ylim=(0, 100), title="Open LLM v1 benchmarks (paper bars only where it reports one)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path, dpi)


def _roc(labels: np.ndarray, scores: np.ndarray):
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return fpr, tpr, float(roc_auc_score(labels, scores))


def roc_curves(runs: list[RunResults], paper: PaperResults, path: Path, primary: str = "loss",
               all_attacks_first: bool = True, dpi: int = DPI) -> Path | None:
    """ROC of every attack of the first run with privacy scores (unless `all_attacks_first` is false); the
    other runs add their `primary` attack."""
    curves = []
    for i, run in enumerate(r for r in runs if r.privacy_scores()):
        rows = run.privacy_scores()
        labels = np.array([int(r["member"]) for r in rows])
        if len(set(labels.tolist())) < 2:
            continue
        attacks = [a for a in ATTACK_LABELS if a in rows[0]] + sorted(
            k for k in rows[0] if k not in ATTACK_LABELS and k not in {"member", "instruction", "n_tokens", "nll",
                                                                      "nll_reference"}
            and isinstance(rows[0][k], (int, float)))
        if i > 0 or not all_attacks_first:
            attacks = [a for a in attacks if a == primary][:1]
        for attack in attacks:
            scores = np.array([float(r[attack]) for r in rows])
            fpr, tpr, auc = _roc(labels, scores)
            curves.append((f"{run.label}: {ATTACK_LABELS.get(attack, attack)}", fpr, tpr, auc))
    if not curves:
        return None
    notes = [f"{name} {paper.value(f'privacy.{key}'):.2f}" for key, name in (("teams_rl", "TeaMs-RL"),
                                                                              ("baseline", "baseline"))
             if paper.value(f"privacy.{key}") is not None]
    return roc_panels(curves, path, title="ROC" + (f" (paper AUC: {', '.join(notes)})" if notes else ""),
                      chance_label="chance (AUC 0.5)", fontsize=7, dpi=dpi)


def ablation_bars(groups: list[str], panels: list[tuple[str, list[float | None], list[float | None]]], path: Path,
                  title: str, dpi: int = DPI) -> Path | None:
    """One panel per metric: mean per swept group with a +-std error bar. `panels` = [(metric, means, stds)]."""
    panels = [p for p in panels if any(v is not None for v in p[1])]
    if not panels or not groups:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(4.2 * ncols, 3.2 * nrows + 0.4 * max(len(g) for g in groups) / 10, ncols=ncols, nrows=nrows)
    x = np.arange(len(groups))
    for n, (metric, means, stds) in enumerate(panels):
        ax = axes[n // ncols][n % ncols]
        heights = [0.0 if m is None else m for m in means]
        errs = None if all(s is None for s in stds) else [0.0 if s is None else s for s in stds]
        ax.bar(x, heights, yerr=errs, capsize=3, color=[f"C{i % 10}" for i in range(len(groups))])
        ax.set_xticks(x, groups, rotation=20, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for n in range(len(panels), nrows * ncols):
        axes[n // ncols][n % ncols].set_visible(False)
    fig.suptitle(title)
    return _save(fig, path, dpi, top=1 - 0.35 / fig.get_figheight())
