"""The report: tables, figures and wandb logging from finished artifacts; sweep aggregation; the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from teams_rl.pipeline import StageContext
from teams_rl.report.collect import RunResults
from teams_rl.report.paper import PaperResults
from tests.report_fixtures import OPS, build_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULT_STAGES = ("policy", "generate", "finetune", "evaluate_base", "evaluate", "privacy")


class RecordingTracker:
    """A StageTracker stand-in that remembers what would go to wandb."""

    def __init__(self):
        self.tables: dict[str, tuple[list, list]] = {}
        self.images: dict[str, Path] = {}
        self.logged: dict = {}

    def log(self, metrics, step=None):
        self.logged.update(metrics)

    def log_table(self, key, columns, rows):
        self.tables[key] = (columns, rows)

    def log_image(self, key, path):
        self.images[key] = Path(path)


def read_csv(path: Path) -> dict[str, list[str]]:
    with open(path) as fh:
        rows = list(csv.reader(fh))
    return {row[0]: row for row in rows}


def run_report_stage(tmp_path, ours: Path, compare_with=(), stages=RESULT_STAGES + ("report",)):
    from teams_rl.stages import report

    cfg = OmegaConf.create({"experiment_name": "fixture", "stages": list(stages), "report": {
        "title": None, "compare_with": [str(p) for p in compare_with], "primary_attack": "loss", "figures": True,
        "dpi": 60, "paper_results": None}})
    results = RunResults.from_run_dir(ours)
    out_dir, run_dir = tmp_path / "report_artifact", tmp_path / "the_run"
    out_dir.mkdir()
    tracker = RecordingTracker()
    ctx = StageContext("report", cfg, out_dir, run_dir, "fp", dict(results.folders), dict(results.manifests), None,
                       tracker)
    metrics = report.run(cfg, ctx)
    return metrics, out_dir, run_dir, tracker


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ours = build_run(root, "fixture", mia_shift=0.4)
    wizard = build_run(root, "wizard", mode="wizardlm", tuned={"arc_challenge": 0.4, "hellaswag": 0.3, "mmlu": 0.25,
                                                                "truthfulqa_mc2": 0.4}, mia_shift=1.5)
    return ours, wizard


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, two_runs):
    """The report stage run once on the fixture run, with the WizardLM-baseline run beside it."""
    ours, wizard = two_runs
    return run_report_stage(tmp_path_factory.mktemp("stage"), ours, compare_with=[wizard])


def test_report_stage_tables_match_the_metrics_files(two_runs, rendered):
    ours, wizard = two_runs
    metrics, out_dir, run_dir, _ = rendered
    ev = json.loads((RunResults.from_run_dir(ours).folders["evaluate"] / "manifest.json").read_text())["metrics"]

    bench = read_csv(out_dir / "openllm_v1.csv")
    assert bench["fine-tuned: fixture"][1:] == [f"{100 * ev[f'finetuned/{k}']:.2f}" for k in
                                                ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "average")]
    assert bench["base: tiny_llama"][1] == "25.00"
    assert bench["fine-tuned: wizard"][1] == "40.00"
    paper = bench["TeaMs-RL Llama-1-7b (paper)"]
    assert paper[1:] == ["54.35", "not reported", "not reported", "not reported", "not reported"]
    assert bench["WizardLM-7b (paper)"][1] == "not reported"
    notes = (out_dir / "report.md").read_text()
    assert ("documents per task: " + ", ".join(f"{k} n = {int(ev[f'finetuned/{k}/n'])}" for k in
                                               ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"))) in notes

    priv = list(csv.reader(open(out_dir / "privacy.csv")))
    header, rows = priv[0], priv[1:]
    loss = next(r for r in rows if r[0] == "fixture" and r[1] == "LOSS")
    pm = RunResults.from_run_dir(ours).metrics("privacy")
    assert loss[header.index("AUC")] == f"{pm['loss/auc']:.3f}"
    assert loss[header.index("AUC 95% CI")] == f"[{pm['loss/auc_ci_low']:.3f}, {pm['loss/auc_ci_high']:.3f}]"
    assert header[4:6] == ["TPR@0.1% FPR", "TPR@1% FPR"]
    assert [r[2] for r in rows if "(paper)" in r[0]] == ["0.47", "0.72"]

    # TeaMs-RL (8 + 8 expert calls, 8 records) vs WizardLM (16 + 16 expert + 16 judge, 12 records)
    costs = read_csv(out_dir / "query_costs.csv")
    assert costs["calls: expert (all purposes)"][1:4] == ["16", "32", "50.00%"]
    assert costs["calls: all roles"][1:4] == ["16", "48", "33.33%"]
    assert costs["dataset size (final instructions)"][1:4] == ["8", "12", "66.67%"]
    assert "5.73%" in costs["calls: all roles"][4]
    # the claims: TeaMs-RL as measured / WizardLM's measured per-seed cost x 52,002 seeds
    wizard_x, wizard_pairs_x = round(48 / 4 * 52002), round(12 / 4 * 52002)      # 624,024 and 156,006
    claims_csv = read_csv(out_dir / "query_claims.csv")
    assert claims_csv["expert queries, TeaMs-RL / WizardLM"][1:4] == ["16", str(wizard_x), "0.0026%"]
    assert claims_csv["dataset size, TeaMs-RL / WizardLM"][1:4] == ["8", str(wizard_pairs_x), "0.0051%"]
    assert claims_csv["all queries incl. policy training, TeaMs-RL / WizardLM"][1] == "40"   # 16 + 12 + 12
    assert claims_csv["per seed (both measured): expert queries per seed / WizardLM queries per seed"][1:4] == [
        "4.0", "12.0", "33.33%"]
    parts = read_csv(out_dir / "query_claim_parts.csv")
    wizard_row = parts["WizardLM baseline: queries (evolve + answer + judge, elimination retries included)"]
    assert wizard_row[1:5] == ["4", "48", "12.0", str(wizard_x)]
    assert "624,024" in wizard_row[5]
    assert parts["TeaMs-RL run: expert queries (evolve + answer)"][4] == "not extrapolated"
    assert metrics["expert_query_ratio"] == pytest.approx(16 / wizard_x)
    assert metrics["dataset_size_ratio"] == pytest.approx(8 / wizard_pairs_x)
    assert metrics["expert_query_ratio_per_seed"] == pytest.approx(4 / 12)
    assert metrics["loss_auc"] == pytest.approx(pm["loss/auc"])

    claims = read_csv(out_dir / "claims.csv")
    assert claims["expert queries, TeaMs-RL / WizardLM"][1] == "5.73%"
    assert claims["expert queries, TeaMs-RL / WizardLM"][3] == "0.0026%"
    assert "measured on 4 seeds, x 52,002" in claims["expert queries, TeaMs-RL / WizardLM"][4]
    assert claims["ARC of the fine-tuned model (%)"][1:2] + claims["ARC of the fine-tuned model (%)"][3:4] == [
        "54.35", "50.00"]
    assert claims["membership-inference AUC, baseline model"][3].startswith(
        f"{RunResults.from_run_dir(wizard).metric('privacy', 'loss/auc'):.3f}")

    policy = read_csv(out_dir / "policy.csv")
    assert policy["fixture"][5] == "0.600"      # final mean reward of the fixture's history
    dataset = read_csv(out_dir / "dataset.csv")
    assert dataset["generated: fixture (teams_rl)"][1] == "8"


def test_report_stage_writes_figures_publishes_and_logs(rendered):
    _, out_dir, run_dir, tracker = rendered
    expected = {"policy_learning_curve", "operator_mix", "dataset_diversity", "benchmark_bars", "roc_curves"}
    for name in expected:
        png = out_dir / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000, name
    md = (out_dir / "report.md").read_text()
    for name in expected:
        assert f"](figures/{name}.png)" in md
    assert "| ARC | HellaSwag | MMLU | TruthfulQA | average |" in md
    assert "not reported" in md and "54.35" in md
    # published next to the run, without the artifact's manifest
    assert (run_dir / "report" / "report.md").read_text() == md
    assert (run_dir / "report" / "figures" / "roc_curves.png").is_file()
    assert (run_dir / "report" / "openllm_v1.csv").is_file()
    # wandb: every table and figure under report/*, the stages' LLM accounting under cost/*
    assert {f"report/{n}" for n in expected} == set(tracker.images)
    assert {"report/openllm_v1", "report/privacy", "report/query_costs", "report/claims"} <= set(tracker.tables)
    assert tracker.logged["cost/policy/instructor/queries"] == 8
    assert all(k.startswith("cost/") for k in tracker.logged)


def test_report_without_results_shows_the_paper_numbers(tmp_path):
    root = tmp_path / "empty"
    (root).mkdir()
    (root / "run_manifest.json").write_text(json.dumps({"experiment": "empty", "stages": {}}))
    from teams_rl.report.__main__ import main

    assert main([str(root), "--no-figures"]) == 0
    md = (root / "report" / "report.md").read_text()
    assert "No evaluate stage in this run" in md and "No privacy stage in this run" in md
    bench = read_csv(root / "report" / "openllm_v1.csv")
    assert bench["TeaMs-RL Llama-1-7b (paper)"][1] == "54.35"


def test_cli_rerenders_a_run_dir_and_an_artifact_folder(tmp_path, two_runs, capsys):
    from teams_rl.report.__main__ import main

    ours, wizard = two_runs
    assert main([str(ours), "--compare-with", str(wizard), "--out", str(tmp_path / "a"), "--no-figures"]) == 0
    assert read_csv(tmp_path / "a" / "query_costs.csv")["calls: all roles"][3] == "33.33%"
    # from the evaluate artifact alone, its inputs are found in the store by fingerprint
    folder = RunResults.from_run_dir(ours).folders["evaluate"]
    assert main([str(folder), "--out", str(tmp_path / "b"), "--no-figures"]) == 0
    loaded = RunResults.load(folder)
    assert set(loaded.folders) == {"policy", "generate", "finetune", "evaluate_base", "evaluate"}
    assert read_csv(tmp_path / "b" / "openllm_v1.csv")[f"fine-tuned: {loaded.label}"][1] == "50.00"
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such directory"


def make_sweep(root: Path) -> Path:
    sweep = root / "sweep"
    n = 0
    # teams_rl's policies against their random baselines: +0.09 (SE 0.05: z 1.8) and +0.04 (z 0.8)
    versus = {("teams_rl", 1): (0.49, 0.03, 0.4, 0.04), ("teams_rl", 2): (0.44, 0.03, 0.4, 0.04)}
    for ops, rewards_by_seed in (("teams_rl", {1: (0.2, 0.4), 2: (0.2, 0.6)}), ("no_breadth", {1: (0.1, 0.1), 2: (0.1, 0.3)})):
        for seed, rewards in rewards_by_seed.items():
            build_run(sweep, str(n), rewards=rewards, seed=seed, salt=f"{ops}{seed}", mia_shift=0.2 * seed,
                      operators=OPS if ops == "teams_rl" else ["add_constraints", "deepening"],
                      overrides=["+experiment=smoke", f"operators={ops}", f"seed={seed}"], versus=versus.get((ops, seed)))
            n += 1
    # build_run puts artifacts under sweep/artifacts; it is not a job (no run_manifest.json)
    return sweep


def test_sweep_aggregation_mean_std_over_seeds(tmp_path):
    from teams_rl.report.sweep import aggregate_sweep, find_jobs, swept_keys

    sweep = make_sweep(tmp_path)
    jobs = find_jobs(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    assert swept_keys(jobs) == ["operators", "seed"]
    path = aggregate_sweep(sweep, dpi=60)
    assert path == sweep / "report" / "report.md"
    ablation = read_csv(sweep / "report" / "ablation.csv")
    header = list(csv.reader(open(sweep / "report" / "ablation.csv")))[0]
    row = ablation["operators=teams_rl"]
    assert row[1] == "2"
    # final rewards 0.4 and 0.6 -> 0.500 ± 0.141 (sample std)
    assert row[header.index("policy final reward")] == "0.500 ± 0.141"
    assert ablation["operators=no_breadth"][header.index("policy final reward")] == "0.200 ± 0.141"
    raw = list(csv.DictReader(open(sweep / "report" / "ablation_raw.csv")))
    assert float(raw[0]["policy/final_mean_reward/mean"]) == pytest.approx(0.5)
    assert float(raw[0]["policy/final_mean_reward/std"]) == pytest.approx(0.1414, abs=1e-4)
    md = path.read_text()
    assert "swept: `operators`, `seed`" in md
    assert (sweep / "report" / "figures" / "ablation.png").read_bytes()[:8] == PNG_MAGIC
    bench = read_csv(sweep / "report" / "openllm_v1.csv")
    assert bench["fine-tuned: operators=teams_rl"][1] == "50.00 ± 0.00"
    assert bench["TeaMs-RL Llama-1-7b (paper)"][1] == "54.35"
    # each seed against its own random baseline, and the mean difference over seeds with its SE over seeds
    seeds = read_csv(sweep / "report" / "policy_vs_baseline.csv")
    assert "operators=no_breadth" not in seeds  # no baseline stage: no comparison
    row = seeds["operators=teams_rl"]
    assert row[1] == "2" and row[2] == "1: +0.090 (1.80); 2: +0.040 (0.80)" and row[4] == "0 of 2"
    assert row[3] == "+0.065 ± 0.025 (t = 2.60, 1 df)"  # sd of (0.09, 0.04) = 0.0354, / sqrt(2)
    assert "Trained policy minus random operators, over seeds" in md
    cache = read_csv(sweep / "report" / "sweep_cache.csv")
    assert cache["evaluate_base"][4] == "1"     # one base evaluation shared by the 4 jobs
    assert cache["policy"][4] == "4"


def test_hydra_callback_aggregates_on_multirun_end(tmp_path):
    from teams_rl.report.callback import SweepReport

    sweep = make_sweep(tmp_path)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "report": {"figures": False}})
    SweepReport().on_multirun_end(config)
    assert "Ablation" in (sweep / "report" / "report.md").read_text()
    assert not (sweep / "report" / "figures").exists()


def test_report_inputs_are_the_runs_result_stages(tmp_path):
    from teams_rl.stages import report
    from tests.conftest import compose_config

    cfg = compose_config(["stages=[evaluate,report]"], tmp_path)
    assert report.STAGE.inputs_for(cfg) == ["policy", "generate", "finetune", "evaluate_base", "evaluate"]
    cfg = compose_config(["stages=[generate,report]"], tmp_path)
    assert report.STAGE.inputs_for(cfg) == ["policy", "generate"]
    cfg = compose_config(["stages=[llm_check,report]"], tmp_path)
    assert report.STAGE.inputs_for(cfg) == []
    cfg = compose_config([], tmp_path, scale=False)  # the embedded default: its random-operator baseline is reported
    assert report.STAGE.inputs_for(cfg)[:3] == ["policy", "policy_baseline", "generate"]


def test_paper_numbers_file_has_a_source_for_every_entry():
    paper = PaperResults.load()
    assert paper.value("queries.teams_rl_fraction_of_wizardlm") == 0.0573
    assert paper.value("queries.wizardlm_total_queries") == 52_002 * 4 * 3
    assert paper.cell("openllm_v1.teams_rl_llama1_7b.arc_challenge") == "54.35"
    assert paper.cell("openllm_v1.teams_rl_llama1_7b.mmlu") == "not reported"
    assert (paper.value("privacy.teams_rl"), paper.value("privacy.baseline")) == (0.47, 0.72)
    for section in ("queries", "openllm_v1", "privacy"):
        entries = paper.sources(section)
        assert entries and all(source.strip() for _, source in entries)


def test_benchmark_documents_of_a_task_and_of_a_group_of_subjects():
    from teams_rl.report.collect import benchmark_documents

    assert benchmark_documents({"arc_challenge/n": 8.0}, "arc_challenge") == "8"
    group = {"mmlu/astronomy/n": 8.0, "mmlu/nutrition/n": 8.0, "mmlu/n_subtasks": 2.0, "mmlu/acc": 0.3}
    assert benchmark_documents(group, "mmlu") == "16 (2 subjects x 8)"
    assert benchmark_documents({"mmlu/a/n": 5.0, "mmlu/b/n": 9.0}, "mmlu") == "14 (2 subjects)"
    assert benchmark_documents({"hellaswag/acc": 0.5}, "hellaswag") is None


def test_policy_versus_random_baseline_difference_and_flags():
    """final (last updates) minus the random baseline ± the SE of the difference, with n; small-n and zero-width
    privacy intervals are flagged; benchmark cells carry lm-eval's stderr."""
    import math

    from teams_rl.evol.reward_window import TRANSITIONS_KEY, reward_window
    from teams_rl.report.collect import RunResults
    from teams_rl.report.tables import interval_warnings, pct_se, policy_versus_baseline_note

    def row(*transitions):  # [env, episode, step, reward]
        return {"transitions": len(transitions), TRANSITIONS_KEY: [list(t) for t in transitions]}

    # two episodes, each steady over its steps: the episode is the unit, and the SE is that of 2 episode means
    history = [row([0, 1, 1, 0.9]), row([0, 1, 2, 1.0], [1, 1, 1, 0.0]), row([0, 1, 3, 1.0], [1, 1, 2, 0.0])]
    window = reward_window(history, 2)
    assert window["n"] == 4 and window["episodes"] == 2 and window["updates"] == 2 and math.isclose(window["mean"], 0.5)
    assert math.isclose(window["se_iid"], math.sqrt(1 / 3) / 2) and math.isclose(window["se"], 0.5)
    assert math.isclose(reward_window(history)["mean"], 2.9 / 5) and reward_window(history)["episodes"] == 2
    singletons = reward_window([row(*[[e, 1, 1, r] for e, r in enumerate((0.1, 0.4, 0.2, 0.9, 0.5))])])
    assert math.isclose(singletons["se"], singletons["se_iid"])  # one transition per episode: the plain SE
    assert reward_window([row([3, 1, 1, 0.2], [3, 1, 2, 0.6])])["se"] is None  # one episode: no SE
    assert reward_window([]) == {"mean": None, "sd": None, "se": None, "se_iid": None, "n": 0, "episodes": 0,
                                 "updates": 0}
    # carried-over episodes (the paper) are one chain per env: clustered by env, one env gives no SE
    chains = [row([0, 1, 1, 0.2], [1, 1, 1, 0.6]), row([0, 2, 1, 0.4], [1, 2, 1, 0.8])]
    assert reward_window(chains)["episodes"] == 4 and reward_window(chains, unit="env")["episodes"] == 2
    assert reward_window([row([0, 1, 1, 0.2]), row([0, 2, 1, 0.5])], unit="env")["se"] is None
    from teams_rl.errors import TeamsRLError

    with pytest.raises(TeamsRLError, match="per-transition records"):
        reward_window([{"transitions": 8, "mean_reward": 0.3}])
    run = RunResults("demo", manifests={
        "policy": {"metrics": {"final_window/mean_reward": 0.6, "final_window/reward_se": 0.03,
                               "final_window/reward_se_iid": 0.024, "final_window/transitions": 24,
                               "final_window/episodes": 12, "final_window/updates": 3}},
        "policy_baseline": {"metrics": {"baseline/mean_reward": 0.4, "baseline/reward_se": 0.04,
                                        "baseline/reward_se_iid": 0.032, "baseline/transitions": 96,
                                        "baseline/episodes": 32}}})
    v = run.policy_vs_baseline()
    assert math.isclose(v["difference"], 0.2) and math.isclose(v["se"], 0.05) and math.isclose(v["z"], 4.0)
    assert math.isclose(v["se_ratio"], 1.25)
    note = policy_versus_baseline_note("demo", v)
    assert "n = 24 transitions in 12 episodes" in note and "n = 96 transitions in 32 episodes" in note
    assert "+0.200 ± 0.050" in note and "clustered by episode, 1.25x" in note and "more than 2 standard" in note
    weak = policy_versus_baseline_note("demo", {**v, "difference": 0.05, "z": 1.0})
    assert "does NOT beat" in weak
    lone = RunResults("one", manifests={
        "policy": {"metrics": {"final_window/mean_reward": 0.6, "final_window/reward_se": None,
                               "final_window/transitions": 2, "final_window/episodes": 1}},
        "policy_baseline": {"metrics": {"baseline/mean_reward": 0.4, "baseline/reward_se": 0.04}}}).policy_vs_baseline()
    assert lone["se"] is None and lone["z"] is None
    assert "no standard error" in policy_versus_baseline_note("one", lone)
    flat = {**v, "final_se": 0.0, "baseline_se": 0.0, "se": 0.0, "se_ratio": None, "z": None}  # every reward alike
    assert "no standard error" in policy_versus_baseline_note("demo", flat)
    old = RunResults("old", manifests={  # an artifact from before the clustered SE: its SE is not called clustered
        "policy": {"metrics": {"final_window/mean_reward": 0.6, "final_window/reward_se": 0.03}},
        "policy_baseline": {"metrics": {"baseline/mean_reward": 0.4, "baseline/reward_se": 0.04}}}).policy_vs_baseline()
    assert "independent-transition SE, recorded before clustering" in policy_versus_baseline_note("old", old)
    assert "clustered by env: its episodes are one chain" in policy_versus_baseline_note("p", {**v, "se_unit": "env"})
    assert RunResults("x", manifests={"policy": {"metrics": {}}}).policy_vs_baseline() is None
    from teams_rl.report.tables import POLICY_SE_CAVEAT, policy_table

    assert policy_table([run]).notes[-2:] == [note, POLICY_SE_CAVEAT]  # the caveat follows the comparison
    assert POLICY_SE_CAVEAT not in policy_table([RunResults("x", manifests={"policy": {"metrics": {}}})]).notes
    small = interval_warnings("demo", {"n_members": 2, "n_nonmembers": 2, "loss/auc": 1.0, "loss/auc_ci_low": 1.0,
                                       "loss/auc_ci_high": 1.0})
    assert len(small) == 2 and "too small" in small[0] and "degenerate" in small[1]
    assert interval_warnings("demo", {"n_members": 40, "n_nonmembers": 35, "loss/auc": 0.6,
                                      "loss/auc_ci_low": 0.5, "loss/auc_ci_high": 0.7}) == []
    assert pct_se(0.5, 0.05) == "50.00 ± 5.00" and pct_se(0.5, None) == "50.00" and pct_se(None, 0.1) == "-"
