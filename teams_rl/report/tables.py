"""The report's tables, each built from finished runs beside the paper's numbers.

A `Table` renders to markdown (report.md), CSV (one file per table) and a wandb table (`report/<key>`).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

from teams_rl.evol import quality
from teams_rl.report.collect import (
    RunResults,
    benchmark_documents,
    benchmark_series,
    benchmark_stderr,
    number,
)
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


def pct_se(value, se, digits: int = 2) -> str:
    """A score in percent with its standard error (`-` when not run)."""
    value, se = number(value), number(se)
    if value is None:
        return NOT_RUN
    return f"{100 * value:.{digits}f}" + ("" if se is None else f" ± {100 * se:.{digits}f}")


def average_stderr(scores: dict) -> float | None:
    """Standard error of the mean of the four benchmarks, treating them as independent samples."""
    errs = [benchmark_stderr(scores, k) for k, _ in BENCHMARKS]
    if any(e is None for e in errs):
        return None
    return (sum(e * e for e in errs) ** 0.5) / len(errs)


def ratio_pct(value) -> str:
    value = number(value)
    return NOT_RUN if value is None else f"{100 * value:.2f}%"


# ------------------------------------------------------------------------------------------- query costs

def generate_mode(run: RunResults) -> str | None:
    return run.metrics("generate").get("mode") if run.has("generate") else None


def find_query_pair(runs: list[RunResults]) -> tuple[RunResults, RunResults] | None:
    """A TeaMs-RL and a WizardLM-baseline generation among `runs` (same seeds preferred; first run first)."""
    from teams_rl.report import costs

    return costs.query_pair(runs)


def from_grid(grid) -> Table:
    """A `teams_rl.report.costs.Grid` as a report table."""
    return Table(grid.key, grid.title, list(grid.columns), [list(r) for r in grid.rows], list(grid.notes))


def query_claims_tables(runs: list[RunResults], paper: PaperResults) -> list[Table]:
    """The paper's query/size claims from measurements (TeaMs-RL measured / WizardLM's measured per-seed cost
    extrapolated to the paper's seeds), ratios first, then the parts; [] without both generations."""
    from teams_rl.report import costs

    pair = find_query_pair(runs)
    if pair is None:
        return []
    claims = costs.claims_of(pair, paper.scale())
    tables = [from_grid(claims.ratio_table()), from_grid(claims.parts_table())]
    tables[0].notes.append(f"TeaMs-RL = {pair[0].label}, WizardLM baseline = {pair[1].label}.")
    return tables


def query_cost_table(runs: list[RunResults], paper: PaperResults) -> Table:
    """The same-seed control, TeaMs-RL vs the WizardLM baseline, when both generations are among `runs`
    (`teams_rl.report.costs`), else this run's own generation costs."""
    from teams_rl.report import costs

    scale = paper.scale()
    pair = find_query_pair(runs)
    if pair is not None:
        teams, wizard = pair
        cost = costs.query_cost_table(teams.manifests["generate"], wizard.manifests["generate"], scale)
        table = Table("query_costs", "Same-seed control: TeaMs-RL vs WizardLM seed for seed",
                      ["quantity", f"TeaMs-RL ({teams.label})", f"WizardLM baseline ({wizard.label})",
                       "TeaMs-RL / WizardLM", "paper"])
        for r in cost.rows:
            table.rows.append([r.quantity, _num(r.teams), _num(r.wizard), ratio_pct(r.ratio), r.paper])
        table.notes += cost.grid().notes
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
    table.rows.append(["seeds", *[_num(s) for s in seeds], f"{scale.seeds:,} Alpaca seeds (WizardLM)"])
    for role, purpose in pairs:
        table.rows.append([f"calls: {role} / {purpose}", *[c.get((role, purpose), 0) for c in calls], ""])
    totals = [sum(c.values()) for c in calls]
    table.rows.append(["calls: all roles", *totals,
                       f"TeaMs-RL {100 * scale.query_ratio:.2f}% of WizardLM's {scale.wizard_queries:,}"])
    sizes = [r.metric("generate", "dataset/size") for r in gen_runs]
    table.rows.append(["dataset size (final instructions)", *[_num(s) for s in sizes],
                       f"TeaMs-RL {100 * scale.size_ratio:.2f}% of WizardLM's {scale.wizard_instructions:,}"])
    per_seed = [t / s if s else None for t, s in zip(totals, seeds, strict=True)]
    table.rows.append(["calls per seed", *[_num(v) for v in per_seed],
                       f"WizardLM {scale.rounds} rounds x {scale.calls_per_round} calls"])
    table.rows.append([f"calls extrapolated to {scale.seeds:,} seeds",
                       *[None if v is None else round(v * scale.seeds) for v in per_seed],
                       f"WizardLM {scale.wizard_queries:,} (inferred)"])
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
    sizes: dict[str, str] = {}
    for label, scores, _ in benchmark_series(runs):
        table.rows.append([label, *[pct_se(scores.get(k), benchmark_stderr(scores, k)) for k, _ in BENCHMARKS],
                           pct_se(scores.get("average"), average_stderr(scores))])
        for k, _ in BENCHMARKS:
            if (documents := benchmark_documents(scores, k)) is not None:
                sizes[k] = documents
    if sizes:
        table.notes.append("± = lm-eval's standard error; documents per task: "
                           + ", ".join(f"{k} n = {v}" for k, v in sizes.items())
                           + ". Differences smaller than about 2 standard errors are not evidence of a change.")
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
    for run in runs:
        table.notes += interval_warnings(run.label, run.metrics("privacy"))
    table.notes.append("AUC 0.5 = the attacker cannot tell members from non-members (better privacy); the paper "
                       "reports one AUC per model without naming the attack.")
    for key, source in paper.sources("privacy"):
        table.notes.append(f"paper `{key}`: {source}")
    return table


MIN_N_FOR_CI = 30  # per side: below this a bootstrap 95% CI of an AUC is too coarse to stand behind


def interval_warnings(label: str, m: dict) -> list[str]:
    """Flags for a privacy result whose n is too small for its interval or whose interval is degenerate."""
    out = []
    members, nonmembers = number(m.get("n_members")), number(m.get("n_nonmembers"))
    if members is not None and nonmembers is not None and min(members, nonmembers) < MIN_N_FOR_CI:
        out.append(f"WARNING ({label}): n = {int(members)} members / {int(nonmembers)} non-members is too small for a "
                   f"95% CI (fewer than {MIN_N_FOR_CI} per side); read the AUCs as anecdotes.")
    degenerate = [ATTACK_LABELS.get(a, a) for a in attacks_of(m)
                  if number(m.get(f"{a}/auc_ci_low")) is not None
                  and number(m.get(f"{a}/auc_ci_low")) == number(m.get(f"{a}/auc_ci_high"))]
    if degenerate:
        out.append(f"WARNING ({label}): degenerate interval (zero width) for {', '.join(degenerate)}: the bootstrap "
                   "cannot vary the result, usually because the sets are tiny or perfectly separated.")
    return out


# ----------------------------------------------------------------------------------- policy, data, SFT

# what the difference's SE counts as a sampling unit, and what one run cannot say (experiments/README.md: the
# seed x dtype runs of the embedded default)
POLICY_SE_CAVEAT = ("Each SE counts an episode as one sampling unit (its transitions share a seed instruction and "
                    "each step rewrites the last one's output; where episodes carry over, an env's whole chain is "
                    "the unit). Neither SE includes how training varies from seed "
                    "to seed: a z near 2 from one seed is weak evidence; repeat over seeds (`-m seed=0,1,2,3,4`) "
                    "before reading it as learning.")


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
    compared = False  # whether any run was set against its random baseline
    for run in runs:
        m = run.metrics("policy")
        table.rows.append([run.label, m.get("algorithm"), m.get("operator_set"), _num(m.get("updates")),
                           fmt(m.get("first_mean_reward"), 3), fmt(m.get("final_mean_reward"), 3),
                           fmt(m.get("mean_reward"), 3), fmt(m.get("final_entropy"), 3),
                           _num(m.get("llm_queries/instructor")), _num(m.get("llm_queries/reviewer")),
                           *[fmt(m.get(f"op_prob/{o}"), 3) for o in ops]])
        versus = run.policy_vs_baseline()
        if versus is None:
            continue
        b = run.metrics("policy_baseline")
        table.rows.append([f"{run.label}: random operators, same budget", "random", m.get("operator_set"),
                           _num(b.get("updates")), fmt(b.get("first_mean_reward"), 3),
                           fmt(b.get("final_mean_reward"), 3), fmt(b.get("mean_reward"), 3),
                           fmt(b.get("final_entropy"), 3), _num(b.get("llm_queries/instructor")),
                           _num(b.get("llm_queries/reviewer")), *[fmt(b.get(f"op_prob/{o}"), 3) for o in ops]])
        table.notes.append(policy_versus_baseline_note(run.label, versus))
        compared = True
    if compared:
        table.notes.append(POLICY_SE_CAVEAT)
    return table


def policy_versus_baseline_note(label: str, v: dict) -> str:
    """One line: the trained policy's final reward minus the random baseline's, ± its standard error, with n."""
    def side(mean, se) -> str:
        return f"{mean:.3f}" + (f" ± {se:.3f}" if se is not None else " (no SE: fewer than 2 episodes)")

    def units(n: int, episodes: int) -> str:
        return f"n = {n} transitions" + (f" in {episodes} episodes" if episodes else "")

    head = (f"{label}: final reward (last {v['final_updates']} updates, {units(v['final_n'], v['final_episodes'])}) "
            f"{side(v['final'], v['final_se'])} minus random-operator baseline "
            f"({units(v['baseline_n'], v['baseline_episodes'])}) {side(v['baseline'], v['baseline_se'])}")
    if not v["se"] or v["z"] is None:  # no SE, or one of 0 (every reward alike): no z to judge
        return head + f" = **{v['difference']:+.3f}**, with no standard error: nothing can be said about learning."
    ratio = f", {v['se_ratio']:.2f}x the SE of independent transitions" if v["se_ratio"] is not None else ""
    kind = {"episode": f"SE clustered by episode{ratio}", "env": f"SE clustered by env: its episodes are one "
            f"chain{ratio}"}.get(v.get("se_unit"), "independent-transition SE, recorded before clustering")
    verdict = ("beats the random baseline by more than 2 standard errors" if v["z"] > 2 else
               "does NOT beat the random baseline by 2 standard errors")
    return (head + f" = **{v['difference']:+.3f} ± {v['se']:.3f}** ({kind}); the policy {verdict} "
            f"(z = {v['z']:.2f}).")


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


def quality_table(runs: list[RunResults]) -> Table:
    """Quality of each generated dataset per operator and step, with its seeds (stats.json `quality`)."""
    columns, _ = quality.table_rows(None)
    table = Table("dataset_quality", "Generated dataset: quality per operator and step", ["data", *columns])
    for run in [r for r in runs if r.has("generate")]:
        section = run.generate_stats().get("quality")
        if not section or not section.get("enabled"):
            table.notes.append(f"{run.label}: no quality figures ({quality.describe(section)})")
            continue
        table.rows += [[run.label, *row] for row in quality.table_rows(section)[1]]
        table.notes.append(f"{run.label}: {quality.describe(section)}")
    table.notes.append("distinct-n = unique / all n-grams; self-BLEU 0-100 (lower = more diverse); Vendi = effective "
                       "number of distinct instructions (1..n); IFD = PPL(answer | instruction) / PPL(answer) "
                       "(lower = the instruction helps more).")
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
