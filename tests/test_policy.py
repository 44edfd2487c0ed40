"""The policy stage: learning with sb3 algorithms, baselines, the saved agent, resume, config checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.evol.agents import load_agent
from teams_rl.evol.reward_window import TRANSITIONS_KEY
from teams_rl.pipeline import fingerprints, plan, run_pipeline
from tests.evol_fakes import rule_overrides

# Only `deepening` changes the instruction, so the reviewer judge pays 1 for deepening and 0 otherwise.
TARGET = "deepening"
FAKES = rule_overrides(changing_ops=[TARGET])
FAST = ["stages=[policy]", "reward=reviewer_judge", "policy.progress=false"]


def _run(compose, tmp_path, overrides, name="run"):
    cfg = compose(FAKES + FAST + list(overrides), artifacts=tmp_path / "artifacts")
    metrics = run_pipeline(cfg, tmp_path / name)["policy"]
    folder = tmp_path / "artifacts" / "policy" / fingerprints(cfg, plan(cfg))["policy"]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return cfg, metrics, folder, rows


@pytest.mark.parametrize("rl, updates, threshold", [
    # uniform is 1/6; each run is deterministic (fake LLMs, fixed seeds); observed finals: 0.89, 0.99, 0.99, 0.74
    ("trpo", 20, 0.7),
    ("ppo", 12, 0.8),
    ("a2c", 20, 0.8),
    pytest.param("trpo_paper", 60, 0.5, marks=pytest.mark.slow),  # with policy=paper: 6 transitions per update
])
def test_learning_raises_the_rewarded_operators_probability(compose, tmp_path, rl, updates, threshold):
    paper_mdp = ["policy=paper"] if rl == "trpo_paper" else []
    _, metrics, folder, rows = _run(compose, tmp_path, [f"rl={rl}", *paper_mdp, f"policy.updates={updates}",
                                                        "policy.checkpoint_every=1000"])
    assert metrics["updates"] == updates and len(rows) == updates
    assert rows[0][f"op_prob/{TARGET}"] < 0.5  # after one update (ppo at lr 6e-3, obs=none: 0.41), far from the final
    assert metrics[f"op_prob/{TARGET}"] >= threshold
    assert metrics["final_mean_reward"] > rows[0]["mean_reward"]
    assert metrics["final_entropy"] < rows[0]["entropy"]
    agent = load_agent(folder)
    probs = agent.probabilities(agent.obs_encoder.encode(["x"], [None], [0]), samples=4000)
    assert probs[0].argmax() == agent.operators.index(TARGET)


def test_trained_agent_artifact_and_scores(compose, tmp_path):
    cfg, metrics, folder, rows = _run(compose, tmp_path, ["rl=trpo", "policy.updates=2", "policy.n_envs=4",
                                                         "policy.steps_per_update=3", "policy.obs=last_op"])
    for name in ("agent.json", "policy.zip", "metrics.jsonl", "learning_curve.png", "manifest.json"):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "agent.json").read_text())
    assert meta["algorithm"] == "trpo" and meta["action_space"] == "discrete" and meta["update"] == 2
    assert meta["operators"][2] == "deepening" and meta["obs"]["kind"] == "last_op"
    row = rows[-1]
    assert row["timesteps"] == 24 and row["requests/instructor"] == 24
    assert sum(row[f"action_frac/{n}"] for n in meta["operators"]) == pytest.approx(1.0)
    assert sum(row[f"op_prob/{n}"] for n in meta["operators"]) == pytest.approx(1.0, abs=1e-5)
    assert row["llm_queries/instructor"] == 24 and 0 < row["llm_queries/reviewer"] <= 24
    assert metrics["requests/reviewer"] == row["requests/reviewer"]
    run_metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics" / "policy.jsonl").read_text().splitlines()]
    assert [r["step"] for r in run_metrics if "policy/mean_reward" in r] == [1, 2]

    agent = load_agent(folder)
    obs = agent.obs_encoder.encode(["a", "b", "c"], [None, 0, 2], [0, 1, 1])
    logp = agent.action_scores(obs, step=0)
    assert logp.shape == (3, 6) and np.allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-5)
    noisy = agent.action_scores(obs, step=0, deterministic=False, rng=np.random.default_rng(0))
    assert not np.allclose(noisy, logp)
    again = agent.action_scores(obs, step=0, deterministic=False, rng=np.random.default_rng(0))
    assert np.array_equal(noisy, again)


def test_paper_box_agent_scores_are_the_gaussian_before_bias(compose, tmp_path):
    _, _, folder, _ = _run(compose, tmp_path, ["rl=trpo_paper", "policy=paper", "policy.updates=2"])
    agent = load_agent(folder)
    meta = json.loads((folder / "agent.json").read_text())
    assert meta["action_space"] == "box" and meta["action_bias"] == [0.3, 0, 0, 0, 0, 0]
    assert meta["obs_norm"]["clip"] == 5.0 and len(meta["obs_norm"]["mean"]) == 6
    obs = agent.obs_encoder.encode(["a", "b"], [None, 3], [0, 1])
    mean = agent.action_scores(obs, step=0)
    model_mean = agent.model.policy.get_distribution(
        __import__("torch").as_tensor(agent.normalize(obs))).distribution.mean.detach().numpy()
    assert np.allclose(mean, model_mean, atol=1e-6)  # the mean, no bias added
    samples = np.stack([agent.action_scores(obs, 0, deterministic=False, rng=np.random.default_rng(i))
                        for i in range(400)])
    assert np.allclose(samples.mean(axis=0), mean, atol=0.25) and samples.std(axis=0).mean() > 0.5
    p = agent.probabilities(obs, samples=20000, rng=np.random.default_rng(0))
    p0 = agent.probabilities(obs, bias=np.zeros(6), samples=20000, rng=np.random.default_rng(0))
    assert (p[:, 0] > p0[:, 0]).all()  # the +0.3 breadth bias makes breadth likelier


def test_random_and_fixed_baselines_train_nothing_but_roll_out(compose, tmp_path):
    _, metrics, folder, rows = _run(compose, tmp_path, ["rl=random", "policy.updates=2", "policy.n_envs=4",
                                                        "policy.steps_per_update=3"])
    assert not (folder / "policy.zip").exists() and metrics["algorithm"] == "random"
    assert rows[-1]["entropy"] == pytest.approx(np.log(6)) and rows[-1]["timesteps"] == 2 * 4 * 3
    agent = load_agent(folder)
    scores = agent.action_scores(np.zeros((5000, 6)), step=0, rng=np.random.default_rng(1))
    assert np.bincount(scores.argmax(axis=1), minlength=6).min() > 700  # uniform choice

    _, metrics, folder, rows = _run(compose, tmp_path, ["rl=fixed", "rl.schedule=[deepening,breadth]",
                                                        "policy.updates=1", "policy.episode_length=4",
                                                        "policy.steps_per_update=4", "policy.n_envs=2"], "fixed")
    assert rows[0]["action_frac/deepening"] == 0.5 and rows[0]["action_frac/breadth"] == 0.5
    agent = load_agent(folder)
    assert [int(agent.action_scores(np.zeros((1, 6)), step=t).argmax()) for t in range(4)] == [2, 0, 2, 0]


def test_resume_after_a_kill_continues_from_the_last_update(compose, tmp_path, monkeypatch):
    from teams_rl.evol import training

    over = ["rl=trpo", "policy.updates=4", "policy.n_envs=2", "policy.steps_per_update=3"]
    _, _, clean_folder, clean_rows = _run(compose, tmp_path / "clean", over)

    original = training.PolicyTraining.save_checkpoint
    calls = []

    def killed_after_two(self, out_dir):
        folder = original(self, out_dir)
        calls.append(self.done)
        if self.done == 2:
            raise KeyboardInterrupt("simulated kill")
        return folder

    monkeypatch.setattr(training.PolicyTraining, "save_checkpoint", killed_after_two)
    cfg = compose(FAKES + FAST + over, artifacts=tmp_path / "killed" / "artifacts")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path / "killed" / "run1")
    folder = tmp_path / "killed" / "artifacts" / "policy" / fingerprints(cfg, plan(cfg))["policy"]
    assert not (folder / "manifest.json").exists()
    assert json.loads((folder / "checkpoints" / "latest.json").read_text())["update"] == 2
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1  # the kill came before row 2 was written

    resumed = run_pipeline(cfg, tmp_path / "killed" / "run2")["policy"]
    assert calls == [1, 2, 3, 4]  # updates 1-2 were not trained again
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2, 3, 4] and resumed["updates"] == 4
    for a, b in zip(clean_rows, rows, strict=True):  # same numbers as the run that was never killed
        assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}
    import torch

    clean, again = load_agent(clean_folder).model.policy.state_dict(), load_agent(folder).model.policy.state_dict()
    assert all(torch.equal(clean[k], again[k]) for k in clean)


def test_three_operator_sets_train_three_policies(compose, tmp_path):
    seen = {}
    for name in ("teams_rl", "wizardlm", "in_depth_only"):
        cfg, metrics, folder, _ = _run(compose, tmp_path, [f"operators={name}", "rl=trpo", "policy.updates=1",
                                                           "policy.n_envs=2", "policy.steps_per_update=2"], name)
        seen[folder.name] = json.loads((folder / "agent.json").read_text())["operators"]
        assert metrics["operator_set"] == name
    assert sorted(len(ops) for ops in seen.values()) == [4, 5, 6]


def test_fingerprint_ignores_mechanics_but_not_the_mdp(compose):
    base = compose(FAKES + FAST)
    fp = fingerprints(base, ["policy"])["policy"]
    assert fingerprints(compose(FAKES + FAST + ["policy.progress=true", "policy.checkpoint_every=5"]),
                        ["policy"])["policy"] == fp
    assert fingerprints(compose(FAKES + FAST + ["policy.updates=9"]), ["policy"])["policy"] != fp
    assert fingerprints(compose(FAKES + FAST + ["operators=wizardlm"]), ["policy"])["policy"] != fp
    # the reviewer only matters when the reward asks it
    novelty = FAKES + ["stages=[policy]", "reward=embedding_novelty"]
    assert (fingerprints(compose(novelty), ["policy"])["policy"]
            == fingerprints(compose(novelty + ["reviewer.sampling.max_tokens=99"]), ["policy"])["policy"])


def test_paper_preset_selects_the_paper_mdp_and_reward(compose):
    cfg = compose(["+experiment=llama7b"])
    assert cfg.rl.algorithm == "trpo_paper" and cfg.rl.action_space == "box" and cfg.rl.action_bias.breadth == 0.3
    assert cfg.policy.updates == 200 and cfg.policy.n_envs == 1 and cfg.policy.steps_per_update == 6
    assert cfg.policy.seed == 543 and list(cfg.policy.seed_instructions) == ["How to cook food?"]
    assert list(cfg.reward.terms) == ["reviewer_judge"]
    assert compose(["+experiment=llama7b", "reward=embedding_novelty"]).reward.terms.embedding_novelty.weight == 1.0
    assert compose(["+experiment=llama7b", "policy.updates=3"]).policy.updates == 3


def test_rl_changes_only_the_algorithm(compose):
    """A sweep over `rl` compares algorithms on one MDP and one reward: no rl preset selects other groups."""
    default = compose([])
    for rl in ("trpo", "trpo_paper", "ppo", "a2c", "random", "fixed"):
        cfg = compose([f"rl={rl}"])
        for group in ("policy", "reward", "operators", "generate", "seeds"):
            assert cfg[group] == default[group], f"rl={rl} changed {group}"


@pytest.mark.parametrize("overrides, message", [
    (["rl.algorithm=sac"], "rl.algorithm 'sac' is unknown"),
    (["rl=trpo", "+rl.action_bias.breadth=0.3"], "rl.action_bias needs rl.action_space=box"),
    (["rl=trpo_paper", "+rl.action_bias.shout=1"], "rl.action_bias names unknown operator 'shout'"),
    (["rl=fixed", "operators=in_depth_only"], "rl.schedule names 'breadth', which is not in the operator set"),
    (["policy.updates=0"], "policy.updates must be a positive integer"),
    (["policy.obs=pixels"], "policy.obs must be one of"),
    (["rl=trpo", "+rl.hyperparams.warp_speed=9"], "rl.hyperparams"),
])
def test_config_mistakes_fail_with_one_line(compose, tmp_path, overrides, message):
    cfg = compose(FAKES + FAST + overrides)
    with pytest.raises(TeamsRLError, match=message) as err:
        run_pipeline(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)


def test_policy_baseline_rolls_random_operators_over_the_same_budget_once_for_every_rl(compose, tmp_path):
    """The learning curve's yardstick: same budget and reward, uniform operators, one artifact for any `rl`; a
    trained policy on the fake reward (only deepening pays) beats it by more than 2 standard errors."""
    over = FAKES + ["stages=[policy,policy_baseline]", "reward=reviewer_judge", "policy.progress=false",
                    "policy.updates=12", "policy.n_envs=4", "policy.steps_per_update=2", "policy.checkpoint_every=1000"]
    trpo, ppo = compose(over + ["rl=trpo"]), compose(over + ["rl=ppo"])
    fp = lambda cfg: fingerprints(cfg, plan(cfg))  # noqa: E731
    assert fp(trpo)["policy_baseline"] == fp(ppo)["policy_baseline"] and fp(trpo)["policy"] != fp(ppo)["policy"]
    # random operators ignore the observation: an observation ablation shares the baseline too, not the policy
    bandit = compose(over + ["rl=ppo", "policy.obs=none", "policy.final_window=3"])
    assert fp(bandit)["policy_baseline"] == fp(ppo)["policy_baseline"] and fp(bandit)["policy"] != fp(ppo)["policy"]
    assert fp(compose(over + ["rl=ppo", "policy.updates=6"]))["policy_baseline"] != fp(ppo)["policy_baseline"]
    metrics = run_pipeline(ppo, tmp_path / "run")
    base, trained = metrics["policy_baseline"], metrics["policy"]
    assert base["algorithm"] == "random" and base["baseline/transitions"] == 12 * 4 * 2
    assert abs(base["baseline/mean_reward"] - 1 / 6) < 0.1  # 1 of 6 operators pays
    assert trained["final_window/updates"] == 6 and trained["final_window/transitions"] == 6 * 8  # the last half
    diff = trained["final_window/mean_reward"] - base["baseline/mean_reward"]
    se = (trained["final_window/reward_se"] ** 2 + base["baseline/reward_se"] ** 2) ** 0.5
    assert diff > 2 * se


def test_the_random_baseline_rolls_out_wide_with_the_policys_layout_of_transitions(compose, tmp_path, monkeypatch):
    """Independent episodes run side by side: one batched step per episode step (here 3 instead of 7), and
    each update row holds the transitions the policy's layout gives it (same count, same episode ends)."""
    import teams_rl.evol.env as env_module

    batches = []
    step_envs = env_module.step_envs
    monkeypatch.setattr(env_module, "step_envs", lambda envs, actions: batches.append(len(envs)) or
                        step_envs(envs, actions))
    over = FAKES + ["stages=[policy,policy_baseline]", "reward=reviewer_judge", "policy.progress=false", "rl=ppo",
                    "policy.updates=7", "policy.n_envs=4", "policy.steps_per_update=1", "policy.episode_length=3"]
    cfg = compose(over, artifacts=tmp_path / "artifacts")
    metrics = run_pipeline(cfg, tmp_path / "run")
    folders = {stage: Path(cfg.paths.artifacts) / stage / fp for stage, fp in fingerprints(cfg, plan(cfg)).items()}
    policy, base = ([json.loads(line) for line in (folders[stage] / "metrics.jsonl").read_text().splitlines()]
                    for stage in ("policy", "policy_baseline"))
    assert batches[-3:] == [12, 8, 8] and sum(batches[-3:]) == 7 * 4  # 4 envs x 3 episodes, the 3rd one step long
    assert [r["transitions"] for r in base] == [r["transitions"] for r in policy] == [4] * 7
    assert [r["episodes"] for r in base] == [r["episodes"] for r in policy] == [0, 0, 4, 0, 0, 4, 0]
    assert base[-1]["requests/instructor"] == metrics["policy_baseline"]["requests/instructor"] == 28
    assert base[-1]["llm_queries/instructor"] == 28 and (folders["policy_baseline"] / "learning_curve.png").is_file()
    # every transition is filed with its episode, the SE's cluster: 4 envs x 3 episodes in both layouts
    for rows in (policy, base):
        assert [len(r[TRANSITIONS_KEY]) for r in rows] == [r["transitions"] for r in rows]
        assert [sorted(t[2] for t in r[TRANSITIONS_KEY]) for r in rows] == [[s] * 4 for s in (1, 2, 3, 1, 2, 3, 1)]
        assert len({(t[0], t[1]) for r in rows for t in r[TRANSITIONS_KEY]}) == 12
    assert metrics["policy_baseline"]["baseline/episodes"] == 12 and metrics["policy_baseline"]["baseline/se_unit"] == "episode"
    assert not any(k.startswith("final_window/") for k in metrics["policy_baseline"])  # the policy's figure only
    assert metrics["policy"]["final_window/updates"] == 4 and metrics["policy"]["final_window/episodes"] == 8
    assert metrics["policy"]["final_window/reward_se"] is not None  # 8 episodes: an SE (0 once it always pays)
    assert metrics["policy_baseline"]["baseline/reward_se"] > 0 and metrics["policy_baseline"]["baseline/reward_se_iid"] > 0
    logged = [json.loads(line) for stage in ("policy", "policy_baseline")
              for line in (tmp_path / "run" / "metrics" / f"{stage}.jsonl").read_text().splitlines()]
    assert len(logged) >= 14 and not any(TRANSITIONS_KEY in row for row in logged)  # the logger gets numbers only


def test_a_baseline_whose_episodes_carry_over_steps_like_the_policy(compose, tmp_path):
    """With `carry_instruction` (the paper) an episode starts where the last ended, so the episodes are not
    independent: the baseline runs the policy stage's own loop (checkpoints included), over the same budget."""
    over = FAKES + ["stages=[policy_baseline]", "reward=reviewer_judge", "policy.progress=false",
                    "policy.carry_instruction=true", "policy.updates=4", "policy.n_envs=3", "policy.episode_length=2",
                    "policy.steps_per_update=1"]
    cfg = compose(over, artifacts=tmp_path / "artifacts")
    base = run_pipeline(cfg, tmp_path / "run")["policy_baseline"]
    folder = Path(cfg.paths.artifacts) / "policy_baseline" / fingerprints(cfg, plan(cfg))["policy_baseline"]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert base["algorithm"] == "random" and base["baseline/transitions"] == 4 * 3 == sum(r["transitions"] for r in rows)
    assert (folder / "checkpoints").is_dir() and base["requests/instructor"] == 12
    assert base["baseline/se_unit"] == "env" and base["baseline/episodes"] == 3  # one chain per env
