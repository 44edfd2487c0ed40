"""Stage `generate`: the trained policy steers the expert LLM over the seeds; the expert answers; filters; dataset.

The engine is `teams_rl.evol.generation` (see there for the modes and the generation rules). Every result is
appended to `journal.jsonl` keyed by (seed id, step) as soon as its call returns, so a killed run resumes where
it stopped, and a finished one re-run sends no query. Outputs: `dataset/` (HF DatasetDict: train, heldout),
`alpaca.json`, `heldout.json`, `dropped.jsonl`, `stats.json`, PNG plots and a dataset card `README.md`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from teams_rl import config as C
from teams_rl.errors import TeamsRLError
from teams_rl.evol import budget_cap, quality
from teams_rl.evol import generation_inputs as gen_inputs
from teams_rl.evol.filters import FilterSettings, apply_filters
from teams_rl.evol.generation import (
    COLUMNS,
    GenerationSettings,
    Generator,
    build_rules,
    cleaning_metrics,
    start_text,
)
from teams_rl.evol.journal import Journal
from teams_rl.evol.seeds import load_seeds
from teams_rl.stages import Stage

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
# How the requests are scheduled and how many failures are tolerated change how the stage runs, not what it makes.
RUN_ONLY_KEYS = ("generate.schedule", "generate.max_failed_fraction")


def _config_keys(cfg: DictConfig) -> list[str]:
    keys = ["seed", "generate", "seeds", "filters", "operators", "expert", "privacy.holdout_fraction"]
    if FilterSettings.from_cfg(cfg.get("filters")).no_info_gain:
        keys.append("reviewer")
    return keys + budget_cap.config_keys(cfg)


def _inputs(cfg: DictConfig) -> list[str]:
    return [] if C.get(cfg.generate, "mode") == "none" else ["policy"]  # mode none: the expert answers the seeds


def _roles(cfg: DictConfig) -> list[str]:
    return ["expert"] + (["reviewer"] if FilterSettings.from_cfg(cfg.get("filters")).no_info_gain else [])


def _estimate(cfg: DictConfig) -> list:
    """What a full run sends (dry_run): an evolution per seed and step, an answer per evolution (at most),
    a judgement per evolution with rule 1. Prompts grow by ~27 tokens (20 words) per in-depth step."""
    from teams_rl.evol.evolution import evolve_request
    from teams_rl.evol.operators import load_operator_set
    from teams_rl.evol.seeds import seed_sample
    from teams_rl.llm.plans import RequestPlan
    from teams_rl.llm.types import ChatRequest

    s = GenerationSettings.from_config(cfg.generate)
    opset, filters = load_operator_set(cfg.get("operators")), FilterSettings.from_cfg(cfg.get("filters"))
    count, sample, note = seed_sample(cfg.get("seeds"))
    count += gen_inputs.heldout_seeds(cfg) or 0  # the extra non-member seeds are evolved the same way
    n, growth = count * max(s.steps, 1), 27 * max(s.steps - 1, 0) / 2
    texts = [start_text(seed, s.merge_input) for seed in sample]
    plans = [
        RequestPlan("expert", "evolve", n, [evolve_request(opset, i % len(opset), t, max_tokens=s.evolve_max_tokens,
                                                           temperature=s.evolve_temperature)
                                            for i, t in enumerate(texts)], growth, note),
        RequestPlan("expert", "answer", n, [ChatRequest.chat(t, system=s.answer_system, max_tokens=s.answer_max_tokens,
                                                             purpose="answer") for t in texts], growth,
                    "at most: one per usable evolution"),
    ]
    if s.mode == "none":
        plans = plans[1:]  # no evolution: one answer per seed
    if filters.no_info_gain:
        from teams_rl.evol.rewards import Judge

        judge = Judge(None, prompt=filters.judge_prompt, max_tokens=filters.judge_max_tokens)
        plans.append(RequestPlan("reviewer", "judge", n, [ChatRequest.chat(judge.render(t, t + " in detail"),
                                                                           max_tokens=judge.max_tokens, purpose="judge")
                                                          for t in texts], 2 * growth, "at most: one per answer"))
    return budget_cap.cap_plans(cfg, plans)


def _validate(cfg: DictConfig) -> None:
    from teams_rl.evol.operators import load_operator_set
    from teams_rl.evol.seeds import check_seeds

    GenerationSettings.from_config(cfg.generate)
    budget_cap.check(cfg)
    gen_inputs.policy_update(cfg)
    build_rules(cfg.generate, load_operator_set(cfg.get("operators")))
    FilterSettings.from_cfg(cfg.get("filters"))
    gen_inputs.holdout_fraction(cfg)
    check_seeds(cfg.get("seeds"))
    quality.QualitySettings.from_cfg(cfg)
    if gen_inputs.heldout_seeds(cfg) is not None:
        from teams_rl.evol.seeds import check_heldout_seeds

        check_heldout_seeds(cfg.get("seeds"), gen_inputs.heldout_seeds(cfg))


# ------------------------------------------------------------------------------------------------ outputs

def write_dataset(out_dir: Path, train: list[dict], heldout: list[dict]) -> None:
    import datasets

    features = datasets.Features({c: datasets.Value("int32" if c == "step" else "string") for c in COLUMNS})

    def table(rows):
        return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=features)

    target = out_dir / "dataset"
    if target.exists():
        shutil.rmtree(target)
    datasets.DatasetDict({"train": table(train), "heldout": table(heldout)}).save_to_disk(str(target))
    for name, rows in (("alpaca.json", train), ("heldout.json", heldout)):
        alpaca = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows]
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(alpaca, indent=2, ensure_ascii=False))
        tmp.replace(out_dir / name)


def run(cfg: DictConfig, ctx) -> dict:
    from teams_rl.artifacts import write_json_atomic
    from teams_rl.evol.dataset_stats import dataset_stats, plot_stats, write_card
    from teams_rl.evol.operators import load_operator_set

    seeds = load_seeds(cfg.get("seeds"))
    extra = gen_inputs.heldout_seed_list(cfg, seeds)
    settings = GenerationSettings.from_config(cfg.generate)
    opset = load_operator_set(cfg.get("operators"))
    filters = FilterSettings.from_cfg(cfg.get("filters"))
    progress = bool(cfg.generate.get("progress", True))
    journal = Journal(ctx.out_dir / JOURNAL)
    try:
        if journal.torn_lines:
            log.warning("generate: dropped a torn last journal line (the previous run was killed mid-write)")
        resumed = journal.count("evolve")
        if resumed:
            log.info("generate: resuming, %d evolutions already journaled", resumed)
        if ctx.failures is not None:  # the failure budget's denominator: the requests a full run sends
            ctx.failures.planned = (len(seeds) + len(extra)) * max(settings.steps, 1) * (3 if filters.no_info_gain else 2)
        agent = None if settings.mode == "none" else gen_inputs.generating_agent(cfg, ctx.inputs["policy"])
        generator = Generator(settings, build_rules(cfg.generate, opset), filters, agent,
                              opset, seeds + extra, journal, ctx.llm("expert"), lambda: ctx.llm("reviewer"),
                              base_seed=int(cfg.seed), failures=ctx.failures,
                              heldout_ids=frozenset(s.id for s in extra))
        generator.run(progress)
        records = generator.records()
        calls = generator.calls()
        cleaning = generator.cleaning()  # what clean_rewrite did, per kind and operator
    finally:
        journal.close()

    seed_texts = [start_text(s, settings.merge_input) for s in seeds + extra]
    report = apply_filters(records, filters, seed_texts=seed_texts, progress=progress)
    if not report.kept:  # an empty dataset is nothing to stand behind: fail instead of committing it
        raise TeamsRLError(f"generate: no record survived the filters ({_reasons(report.by_reason())}) of "
                           f"{len(records)} evolutions; nothing to train on (see {ctx.out_dir / JOURNAL} for the "
                           "raw answers; filters=none keeps every answered evolution)")
    train, heldout = gen_inputs.split_records(cfg, report.kept, extra)  # non-members: extra seeds or a fraction
    write_dataset(ctx.out_dir, train, heldout)
    with open(ctx.out_dir / "dropped.jsonl", "w") as fh:
        for rec in report.dropped:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

    stats = dataset_stats(report.kept, seed_texts, embeddings=bool(cfg.generate.get("embedding_stats", True)))
    stats["dropped_by_reason"] = report.by_reason()
    stats["split"] = {"train": len(train), "heldout": len(heldout)}
    stats["calls"] = calls
    stats["cleaning"] = cleaning
    stats["quality"] = quality.measure(cfg, report.kept, seeds + extra, seed_texts, ctx.log)
    write_json_atomic(ctx.out_dir / "stats.json", stats)
    for path in plot_stats(report.kept, seed_texts, ctx.out_dir):
        ctx.tracker.log_image(f"generate/{path.stem}", path)

    metrics = {
        "mode": generator.mode,
        "seeds": generator.seeds_started() - len(extra),
        **generator.budget_metrics(),
        "heldout_seeds": len(extra),
        "policy_update": gen_inputs.policy_update(cfg) or "final",
        "episode_length": generator.steps,
        "evolutions": len(records),
        "dataset/size": len(report.kept),
        "dataset/train": len(train),
        "dataset/heldout": len(heldout),
        "dropped": len(report.dropped),
        **{f"dropped/{k}": v for k, v in report.by_reason().items()},
        **calls,
        **cleaning_metrics(cleaning),
        "calls/total": sum(v for k, v in calls.items() if k.startswith("calls/")),
        "distinct_1": stats["distinct_1"],
        "distinct_2": stats["distinct_2"],
        "instruction_words_mean": stats["instruction_words"]["mean"],
    }
    if stats.get("embedding_diversity") is not None:
        metrics["embedding_diversity"] = stats["embedding_diversity"]
    write_card(ctx.out_dir, cfg, metrics, stats, opset.names, ctx.input_manifests.get("policy"),
               expert_model=generator.expert.model_id)
    ctx.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    ctx.tracker.log_table("generate/dropped_by_reason", ["reason", "records"],
                          [[k, v] for k, v in report.by_reason().items()])
    _print_summary(metrics)
    return metrics


def _reasons(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _print_summary(metrics: dict) -> None:
    print(f"\ngenerate ({metrics['mode']}): {metrics['seeds']} seeds x {metrics['episode_length']} steps = "
          f"{metrics['evolutions']} evolutions -> {metrics['dataset/size']} records "
          f"(train {metrics['dataset/train']}, heldout {metrics['dataset/heldout']})")
    drops = {k[len('dropped/'):]: v for k, v in metrics.items() if k.startswith("dropped/")}
    if drops:
        print("dropped: " + ", ".join(f"{k} {v}" for k, v in drops.items()))
    calls = {k[len('calls/'):]: v for k, v in metrics.items() if k.startswith("calls/") and k != "calls/total"}
    print("LLM calls: " + ", ".join(f"{k} {v}" for k, v in calls.items()) + f" (total {metrics['calls/total']})")


STAGE = Stage(name="generate", version=4, run=run, config_keys=_config_keys, inputs=_inputs, resumable=True,
              validate=_validate, roles=_roles, run_only_keys=RUN_ONLY_KEYS, estimate=_estimate)
