"""The figures more than one part draws: ROC panels and policy learning curves (Figure + Agg canvas, no
pyplot state, so plotting is safe in threads and sweeps)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DPI = 110


def figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save(fig, path: str | Path, dpi: int = DPI, top: float = 1.0) -> Path:
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(str(path), dpi=dpi)
    return Path(path)


def moving_average(values: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(window, smoothed values) over ~a tenth of the series, or None for fewer than 5 points."""
    if len(values) < 5:
        return None
    k = max(2, len(values) // 10)
    return k, np.convolve(values, np.ones(k) / k, mode="valid")


def roc_panels(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]], path: str | Path,
               title: str = "ROC (linear)", suptitle: str = "", chance_label: str = "chance",
               fontsize: int = 8, dpi: int = DPI) -> Path:
    """ROC curves `(label, fpr, tpr, auc)` side by side on linear and log-log axes (the log-log panel shows
    the low-FPR regime that TPR at 0.1%/1% FPR reads)."""
    fig, axes = figure(11, 4.8, ncols=2)
    lin, log = axes[0]
    floor = 1.0
    for label, fpr, tpr, auc in curves:
        lin.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
        positive = fpr > 0
        if positive.any():
            floor = min(floor, float(fpr[positive].min()))
            log.plot(fpr[positive], np.maximum(tpr[positive], 1e-4), label=label)
    lin.plot([0, 1], [0, 1], "k--", lw=0.8, label=chance_label)
    lin.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    lo = 10 ** math.floor(math.log10(max(floor, 1e-5)))
    grid = np.logspace(math.log10(lo), 0, 50)
    log.plot(grid, grid, "k--", lw=0.8, label="chance")
    log.set(xscale="log", yscale="log", xlim=(lo, 1), ylim=(lo, 1.05), xlabel="false positive rate",
            ylabel="true positive rate", title="ROC (log-log: the low-FPR regime)")
    for ax in (lin, log):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=fontsize, loc="lower right")
    if suptitle:
        fig.suptitle(suptitle)
    return save(fig, path, dpi)


def reward_curve(ax, updates: np.ndarray, rewards: np.ndarray, label: str, **style):
    """One mean-reward-per-update series with its moving average in the same colour; returns the line."""
    line = ax.plot(updates, rewards, marker="o", ms=3, lw=1, alpha=0.8, label=label, **style)[0]
    smooth = moving_average(rewards)
    if smooth is not None:
        k, values = smooth
        ax.plot(updates[k - 1:], values, lw=2.2, color=line.get_color())
    return line


def operator_probabilities(ax, history: list[dict], names: list[str]) -> None:
    """Stacked P(operator) per update from `op_prob/<name>` metrics."""
    updates = [row["update"] for row in history]
    probs = np.array([[row.get(f"op_prob/{n}") or 0.0 for n in names] for row in history], dtype=float)
    ax.stackplot(updates, probs.T, labels=names, alpha=0.85)
    ax.set(xlabel="update", ylabel="P(operator)", ylim=(0, 1), title="Operator probabilities")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


def learning_curve(history: list[dict], names: list[str], path: str | Path, title: str, dpi: int = DPI) -> Path:
    """One policy run: mean reward per update (and a moving average) above its operator probabilities."""
    fig, axes = figure(8, 7, nrows=2)
    ax1, ax2 = axes[0][0], axes[1][0]
    updates = np.array([row["update"] for row in history])
    rewards = np.array([row["mean_reward"] for row in history], dtype=float)
    reward_curve(ax1, updates, rewards, "mean reward per step")
    ax1.set(ylabel="reward", title=title)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="best", fontsize=8)
    operator_probabilities(ax2, history, names)
    return save(fig, path, dpi)


def method_comparison(labels: Sequence[str], expert_queries: Sequence[float | None], budget: float | None,
                      pairs: Sequence[float | None], average: Sequence[tuple[float | None, float | None]],
                      auc: Sequence[tuple[float | None, float | None, float | None]], path: str | Path,
                      title: str = "Methods at an equal expert budget", dpi: int = DPI) -> Path:
    """Three panels per method: what the budget bought (expert queries and pairs), the benchmark average with
    its error bar, and the membership-inference AUC with its interval (0.5 = chance)."""
    fig, axes = figure(13, 4.2, ncols=3)
    spend, bench, mia = axes[0]
    x = np.arange(len(labels))
    as_float = [np.nan if v is None else float(v) for v in expert_queries]
    spend.bar(x - 0.2, as_float, 0.4, label="expert queries")
    spend.bar(x + 0.2, [np.nan if v is None else float(v) for v in pairs], 0.4, label="pairs")
    if budget is not None:
        spend.axhline(float(budget), color="k", ls="--", lw=0.8, label=f"budget {budget:,.0f}")
    spend.set(title="What the budget bought", ylabel="count")
    values = [np.nan if v is None else 100 * v for v, _ in average]
    errors = [0.0 if e is None else 100 * e for _, e in average]
    bench.bar(x, values, 0.6, yerr=errors, capsize=4, color="tab:green")
    bench.set(title="Benchmark average (%)", ylabel="score (%)")
    centres = [np.nan if a is None else a for a, _, _ in auc]
    low = [0.0 if a is None or lo is None else a - lo for a, lo, _ in auc]
    high = [0.0 if a is None or hi is None else hi - a for a, _, hi in auc]
    mia.errorbar(x, centres, yerr=[low, high], fmt="o", capsize=4, color="tab:red")
    mia.axhline(0.5, color="k", ls="--", lw=0.8, label="chance")
    mia.set(title="Membership-inference AUC", ylabel="AUC", ylim=(0, 1.05))
    for ax in (spend, bench, mia):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    spend.legend(fontsize=8)
    mia.legend(fontsize=8)
    fig.suptitle(title)
    return save(fig, path, dpi, top=0.92)
