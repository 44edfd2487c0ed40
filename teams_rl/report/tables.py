"""The report's tables, each built from finished runs beside the paper's numbers.

A `Table` renders to markdown (report.md), CSV (one file per table) and a wandb table (`report/<key>`).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

from teams_rl.report.collect import RunResults, benchmark_series, number
from teams_rl.report.paper import NOT_REPORTED, PAPER_MODEL_LABELS, PaperResults, paper_model_for_target

BENCHMARKS = (("arc_challenge", "ARC"), ("hellaswag", "HellaSwag"), ("mmlu", "MMLU"), ("truthfulqa_mc2", "TruthfulQA"))
ATTACK_LABELS = {"loss": "LOSS", "zlib": "zlib", "min_k": "min-k%", "min_k_pp": "min-k%++", "ref": "reference"}
NOT_RUN = "-"


@dataclass
class Table:
    key: str                      # file stem and wandb key (`report/<key>`)
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        lines = [f"| {' | '.join(self.columns)} |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
        out = "\n".join(lines) + "\n"
        if self.notes:
            out += "\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        return out

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if v is None else v for v in row])
        return buf.getvalue()

    def column(self, name: str) -> list:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]

    def find(self, first_cell: str) -> list:
        for row in self.rows:
            if row[0] == first_cell:
                return row
        raise KeyError(first_cell)


def _cell(value) -> str:
    if value is None:
        return NOT_RUN
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def fmt(value, digits: int = 4) -> str:
    """Integers with thousands separators, floats with `digits` decimals, anything else as "-"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    value = number(value)
    return NOT_RUN if value is None else f"{value:.{digits}f}"


def pct(value, digits: int = 2) -> str:
    value = number(value)
    return NOT_RUN if value is None else f"{100 * value:.{digits}f}"


def ratio_pct(value) -> str:
    value = number(value)
    return NOT_RUN if value is None else f"{100 * value:.2f}%"


# ------------------------------------------------------------------------------------------- query costs

def generate_mode(run: RunResults) -> str | None:
    return run.metrics("generate").get("mode") if run.has("generate") else None


def find_query_pair(runs: list[RunResults]) -> tuple[RunResults, RunResults] | None:
    """A TeaMs-RL and a WizardLM-baseline generation among `runs` (same seeds preferred; first run first)."""
    teams = [r for r in runs if generate_mode(r) == "teams_rl"]
    wizard = [r for r in runs if generate_mode(r) == "wizardlm"]

    def seeds(r):
        return (r.manifests["generate"].get("config") or {}).get("seeds")

    for t in teams:
        for w in wizard:
            if seeds(t) == seeds(w):
                return t, w
    return (teams[0], wizard[0]) if teams and wizard else None


def query_cost_table(runs: list[RunResults], paper: PaperResults) -> Table:
    """Expert queries and dataset size: TeaMs-RL vs the WizardLM baseline when both generations are among
    `runs` (the generate helper's table, `teams_rl.report.costs`), else this run's own generation costs."""
    from teams_rl.report import costs

    kwargs = dict(
        paper_seeds=int(paper.value("queries.wizardlm_seeds", costs.PAPER_SEEDS)),
        paper_wizard_queries=int(paper.value("queries.wizardlm_total_queries", costs.PAPER_WIZARD_QUERIES)),
        paper_wizard_instructions=int(paper.value("queries.wizardlm_instructions", costs.PAPER_WIZARD_INSTRUCTIONS)),
        paper_query_ratio=paper.value("queries.teams_rl_fraction_of_wizardlm", costs.PAPER_QUERY_RATIO),
        paper_size_ratio=paper.value("queries.dataset_size_fraction_of_wizardlm", costs.PAPER_SIZE_RATIO),
    )
    pair = find_query_pair(runs)
    if pair is not None:
        teams, wizard = pair
        cost = costs.query_cost_table(teams.manifests["generate"], wizard.manifests["generate"], **kwargs)
        table = Table("query_costs", "Expert queries and dataset size: TeaMs-RL vs WizardLM",
                      ["quantity", f"TeaMs-RL ({teams.label})", f"WizardLM baseline ({wizard.label})",
                       "TeaMs-RL / WizardLM", "paper"])
        for r in cost.rows:
            table.rows.append([r.quantity, _num(r.teams), _num(r.wizard), ratio_pct(r.ratio), r.paper])
        table.notes.append(f"Seeds: {cost.meta.get('seeds_teams')} (TeaMs-RL) and {cost.meta.get('seeds_wizard')} "
                           "(WizardLM). Calls = requests the generation needed (cache hits included); "
                           f"extrapolation = per-seed cost x {kwargs['paper_seeds']:,} Alpaca seeds.")
        if not cost.meta.get("same_seeds"):
            table.notes.append("WARNING: the two generations used different seed settings; the ratios compare "
                               "unlike inputs.")
        return table

    gen_runs = [r for r in runs if r.has("generate")]
    table = Table("query_costs", "LLM queries and dataset size of the generation",
                  ["quantity", *[r.label for r in gen_runs], "paper"])
    if not gen_runs:
        table.notes.append("No generate stage in this run.")
        return table
    calls = [costs.calls_by_role_purpose(r.manifests["generate"]) for r in gen_runs]
    order = list(costs.PURPOSE_ORDER)
    pairs = sorted(set().union(*[set(c) for c in calls]),
                   key=lambda rp: (order.index(rp[1]) if rp[1] in order else len(order), rp[1], rp[0]))
    seeds = [r.metric("generate", "seeds") for r in gen_runs]
    table.rows.append(["seeds", *[_num(s) for s in seeds], f"{kwargs['paper_seeds']:,} Alpaca seeds (WizardLM)"])
    for role, purpose in pairs:
        table.rows.append([f"calls: {role} / {purpose}", *[c.get((role, purpose), 0) for c in calls], ""])
    totals = [sum(c.values()) for c in calls]
    table.rows.append(["calls: all roles", *totals,
                       f"TeaMs-RL {100 * kwargs['paper_query_ratio']:.2f}% of WizardLM's "
                       f"{kwargs['paper_wizard_queries']:,}"])
    sizes = [r.metric("generate", "dataset/size") for r in gen_runs]
    table.rows.append(["dataset size (final instructions)", *[_num(s) for s in sizes],
                       f"TeaMs-RL {100 * kwargs['paper_size_ratio']:.2f}% of WizardLM's "
                       f"{kwargs['paper_wizard_instructions']:,}"])
    per_seed = [t / s if s else None for t, s in zip(totals, seeds, strict=True)]
    table.rows.append(["calls per seed", *[_num(v) for v in per_seed],
                       f"WizardLM {int(paper.value('queries.wizardlm_rounds', 4))} rounds x "
                       f"{int(paper.value('queries.wizardlm_calls_per_instruction_round', 3))} calls"])
    table.rows.append([f"calls extrapolated to {kwargs['paper_seeds']:,} seeds",
                       *[None if v is None else round(v * kwargs["paper_seeds"]) for v in per_seed],
                       f"WizardLM {kwargs['paper_wizard_queries']:,}"])
    table.notes.append("No WizardLM-baseline generation to compare with: run `make repro-queries`, or set "
                       "`report.compare_with=[<run dir of +experiment=wizardlm_baseline on the same seeds>]`.")
    return table


def paper_queries_table(paper: PaperResults) -> Table:
    table = Table("paper_queries", "The paper's query and size numbers", ["quantity", "value", "source"])
    for key, label, fmt_ in (
        ("teams_rl_fraction_of_wizardlm", "TeaMs-RL expert queries / WizardLM's", ratio_pct),
        ("dataset_size_fraction_of_wizardlm", "TeaMs-RL dataset size / WizardLM's", ratio_pct),
        ("wizardlm_total_queries", "WizardLM total queries", _int_or_nr),
        ("wizardlm_instructions", "WizardLM evolved instructions", _int_or_nr),
        ("teams_rl_pairs", "TeaMs-RL instruction/answer pairs", _int_or_nr),
    ):
        entry = paper.get(f"queries.{key}")
        table.rows.append([label, NOT_REPORTED if entry.value is None else fmt_(entry.value), entry.source])
    return table


def _int_or_nr(value) -> str:
    return NOT_REPORTED if value is None else f"{int(value):,}"


def _num(value):
    value = number(value)
    if value is None:
        return None
    return int(value) if value.is_integer() else round(value, 3)


# ------------------------------------------------------------------------------------------ LLM accounting

def llm_accounting_table(runs: list[RunResults]) -> Table:
    """What every stage sent to each LLM role when its artifact was made (the `cost/*` numbers)."""
    table = Table("llm_accounting", "LLM requests per stage and role (when each artifact was made)",
                  ["run", "stage", "role", "model", "queries sent", "cache hits", "failures", "prompt tokens",
                   "completion tokens", "USD"])
    for run in runs:
        for stage, roles in run.llm_accounting().items():
            for role, c in sorted(roles.items()):
                table.rows.append([run.label, stage, role, c.get("model"), c.get("queries", 0), c.get("cache_hits", 0),
                                   c.get("failures", 0), c.get("prompt_tokens", 0), c.get("completion_tokens", 0),
                                   round(float(c.get("usd", 0.0)), 4)])
    if not table.rows:
        table.notes.append("No LLM requests were recorded by the stages of these runs.")
    return table


# ------------------------------------------------------------------------------------------- Open LLM v1

def _paper_average(paper: PaperResults, model: str) -> str:
    values = [paper.openllm(model, key).value for key, _ in BENCHMARKS]
    return NOT_REPORTED if any(v is None for v in values) else f"{sum(values) / len(values):.2f}"


def openllm_table(runs: list[RunResults], paper: PaperResults) -> Table:
    """Open LLM Leaderboard v1 benchmarks (percent): base vs fine-tuned models vs the paper's numbers."""
    table = Table("openllm_v1", "Open LLM Leaderboard v1 benchmarks (%)",
                  ["model", *[label for _, label in BENCHMARKS], "average"])
    for label, scores, _ in benchmark_series(runs):
        table.rows.append([label, *[pct(scores.get(k)) for k, _ in BENCHMARKS], pct(scores.get("average"))])
    for model in paper.openllm_models():
        label = PAPER_MODEL_LABELS.get(model, f"{model} (paper)")
        table.rows.append([label, *[paper.cell(f"openllm_v1.{model}.{k}") for k, _ in BENCHMARKS],
                           _paper_average(paper, model)])
    ours = runs[0] if runs else None
    if ours is not None:
        matched = paper_model_for_target(None, ours.target_model())
        if ours.has("evaluate") and matched is None:
            table.notes.append(f"The paper reports no numbers for this target ({ours.target_model()}); its rows "
                               "are the Llama-1-7b results.")
        settings = ours.eval_settings()
        if settings.get("benchmarks"):
            protocol = ", ".join(f"{b['key']}: {b['task']} {b.get('num_fewshot')}-shot {b.get('metric')}"
                                 for b in settings["benchmarks"])
            limit = settings.get("limit")
            table.notes.append(f"Our protocol: {protocol}" + (f"; limit {limit} documents per task" if limit else "")
                               + f" (lm-eval {settings.get('lm_eval_version', '?')}).")
            if any(str(b.get("task", "")).startswith("offline_") for b in settings["benchmarks"]):
                table.notes.append("The offline tasks are small local samples of each benchmark (wiring, not "
                                   "quality): do not compare them with the paper's numbers.")
    for key, source in paper.sources("openllm_v1"):
        table.notes.append(f"paper `{key}`: {source}")
    return table


# ------------------------------------------------------------------------------------------------ privacy

def attacks_of(metrics: dict) -> list[str]:
    names = []
    for key in metrics:
        if key.endswith("/auc"):
            names.append(key[: -len("/auc")])
    order = list(ATTACK_LABELS)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def tpr_keys(metrics: dict, attack: str) -> list[str]:
    keys = [k[len(attack) + 1:] for k in metrics if k.startswith(f"{attack}/tpr@")]

    def rate(k):
        try:
            return float(k[len("tpr@"):].split("%")[0])
        except ValueError:
            return 0.0

    return sorted(keys, key=rate)


def privacy_table(runs: list[RunResults], paper: PaperResults) -> Table:
    """Membership inference per attack: ROC-AUC with its bootstrap 95% CI and TPR at low FPR."""
    fpr_keys: list[str] = []
    for run in runs:
        m = run.metrics("privacy")
        for attack in attacks_of(m):
            for k in tpr_keys(m, attack):
                if k not in fpr_keys:
                    fpr_keys.append(k)
    table = Table("privacy", "Membership inference (members = training pairs, non-members = held-out pairs)",
                  ["model", "attack", "AUC", "AUC 95% CI", *[k.replace("tpr@", "TPR@").replace("fpr", " FPR")
                                                            for k in fpr_keys], "members / non-members"])
    for run in runs:
        m = run.metrics("privacy")
        for attack in attacks_of(m):
            lo, hi = number(m.get(f"{attack}/auc_ci_low")), number(m.get(f"{attack}/auc_ci_high"))
            table.rows.append([run.label, ATTACK_LABELS.get(attack, attack), fmt(m.get(f"{attack}/auc"), 3),
                               NOT_RUN if lo is None else f"[{lo:.3f}, {hi:.3f}]",
                               *[fmt(m.get(f"{attack}/{k}"), 3) for k in fpr_keys],
                               f"{_num(m.get('n_members'))} / {_num(m.get('n_nonmembers'))}"])
    for key, label in (("teams_rl", "TeaMs-RL model (paper)"), ("baseline", "baseline model (paper)")):
        entry = paper.get(f"privacy.{key}")
        table.rows.append([label, "not stated", NOT_REPORTED if entry.value is None else f"{entry.value:.2f}",
                           NOT_REPORTED, *[NOT_REPORTED for _ in fpr_keys], NOT_REPORTED])
    table.notes.append("AUC 0.5 = the attacker cannot tell members from non-members (better privacy); the paper "
                       "reports one AUC per model without naming the attack.")
    for key, source in paper.sources("privacy"):
        table.notes.append(f"paper `{key}`: {source}")
    return table


# ----------------------------------------------------------------------------------- policy, data, SFT

def policy_table(runs: list[RunResults]) -> Table:
    runs = [r for r in runs if r.has("policy")]
    ops: list[str] = []
    for run in runs:
        found = [k[len("op_prob/"):] for k in run.metrics("policy") if k.startswith("op_prob/")]
        order = run.operator_order()
        found.sort(key=lambda o: order.index(o) if o in order else len(order))
        ops += [o for o in found if o not in ops]
    table = Table("policy", "Policy training (the instructor's operator choices)",
                  ["run", "algorithm", "operators", "updates", "first mean reward", "final mean reward",
                   "mean reward", "final entropy", "instructor queries", "reviewer queries",
                   *[f"P({o})" for o in ops]])
    for run in runs:
        m = run.metrics("policy")
        table.rows.append([run.label, m.get("algorithm"), m.get("operator_set"), _num(m.get("updates")),
                           fmt(m.get("first_mean_reward"), 3), fmt(m.get("final_mean_reward"), 3),
                           fmt(m.get("mean_reward"), 3), fmt(m.get("final_entropy"), 3),
                           _num(m.get("llm_queries/instructor")), _num(m.get("llm_queries/reviewer")),
                           *[fmt(m.get(f"op_prob/{o}"), 3) for o in ops]])
    return table


def dataset_table(runs: list[RunResults]) -> Table:
    """Size and diversity of each generated dataset, with its seed instructions for comparison."""
    table = Table("dataset", "Generated dataset: size and diversity",
                  ["data", "records", "train / heldout", "instruction words (mean)", "distinct-1", "distinct-2",
                   "embedding diversity", "operator mix"])
    seeds_done = set()
    for run in [r for r in runs if r.has("generate")]:
        s, m = run.generate_stats(), run.metrics("generate")
        seed_key = str((run.manifests["generate"].get("config") or {}).get("seeds"))
        if s and seed_key not in seeds_done:
            seeds_done.add(seed_key)
            table.rows.append([f"seeds of {run.label}", _num(m.get("seeds")), NOT_RUN,
                               fmt((s.get("seed_instruction_words") or {}).get("mean"), 2),
                               fmt(s.get("seed_distinct_1"), 3), fmt(s.get("seed_distinct_2"), 3),
                               fmt(s.get("seed_embedding_diversity"), 3), NOT_RUN])
        mix = s.get("operator_mix") or {}
        table.rows.append([f"generated: {run.label} ({m.get('mode')})", _num(m.get("dataset/size")),
                           f"{_num(m.get('dataset/train'))} / {_num(m.get('dataset/heldout'))}",
                           fmt(m.get("instruction_words_mean"), 2), fmt(m.get("distinct_1"), 3),
                           fmt(m.get("distinct_2"), 3), fmt(m.get("embedding_diversity"), 3),
                           ", ".join(f"{k} {v}" for k, v in mix.items()) or NOT_RUN])
    table.notes.append("distinct-n = unique n-grams / all n-grams of the instructions; embedding diversity = "
                       "1 - mean pairwise cosine similarity of all-MiniLM-L6-v2 embeddings ('-' = not computed).")
    return table


def finetune_table(runs: list[RunResults]) -> Table:
    table = Table("finetune", "Supervised fine-tuning",
                  ["run", "base model", "examples", "steps", "epochs", "first loss", "final loss", "train loss",
                   "DeepSpeed ZeRO", "processes", "tokens/s", "device"])
    for run in [r for r in runs if r.has("finetune")]:
        m = run.metrics("finetune")
        table.rows.append([run.label, m.get("base_model"), _num(m.get("examples")), _num(m.get("steps")),
                           fmt(m.get("epochs"), 2), fmt(m.get("first_loss"), 3), fmt(m.get("final_loss"), 3),
                           fmt(m.get("train_loss"), 3), _num(m.get("deepspeed_stage")) or "off",
                           _num(m.get("ranks")), fmt(m.get("tokens_per_s"), 1), m.get("device")])
    return table
