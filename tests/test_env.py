"""The evolution MDP: transitions, episodes, observations, query counts, and the batched VecEnv."""

from __future__ import annotations

import numpy as np
import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.evol.env import EnvSettings, EvolutionVecEnv, InstructionEvolutionEnv, make_envs
from teams_rl.evol.observations import ObservationEncoder
from teams_rl.evol.operators import load_operator_set
from teams_rl.evol.rewards import build_reward
from teams_rl.evol.seeds import Seed
from teams_rl.llm.client import LLMClient
from tests.evol_fakes import ADDITIONS, OperatorRuleBackend, hash_embed

SEEDS = [Seed("s0", "How to cook food?"), Seed("s1", "Name three planets."), Seed("s2", "Sort a list of numbers."),
         Seed("s3", "Summarise this text.", input="The cat sat on the mat.")]
JUDGE = {"terms": {"reviewer_judge": {"weight": 1.0}}}


@pytest.fixture(scope="module")
def opset():
    from tests.conftest import compose_config

    return load_operator_set(compose_config().operators)


def _parts(opset, changing=None, obs="last_op", episode_length=3, reward_cfg=JUDGE, style="plain", **settings):
    instructor = OperatorRuleBackend(changing_ops=changing, style=style)
    reviewer = OperatorRuleBackend(model="judge")
    reward = build_reward(reward_cfg, reviewer=LLMClient("reviewer", reviewer), embed=hash_embed)
    encoder = ObservationEncoder(obs, len(opset), episode_length, embed=hash_embed)
    cfg = EnvSettings(episode_length=episode_length, seed=7, **settings)
    return LLMClient("instructor", instructor), instructor, reviewer, reward, encoder, cfg


def test_transitions_episode_length_info_and_query_counts(opset):
    client, instructor, reviewer, reward, encoder, cfg = _parts(opset, changing=["deepening"])
    env = InstructionEvolutionEnv(client, opset, SEEDS, reward, encoder, cfg)
    obs, info = env.reset(seed=3)
    start = info["instruction"]
    assert obs.tolist() == [0.0] * 6 and info["seed_id"] in {s.id for s in SEEDS}
    obs, r, term, trunc, info = env.step(2)  # deepening changes the instruction
    assert info["instruction"] == f"{start} {ADDITIONS['deepening']}" and info["previous_instruction"] == start
    assert info["operator"] == "deepening" and info["op_id"] == 2 and info["changed"] and not info["rejected"]
    assert r == 1.0 and obs.tolist() == [0, 0, 1, 0, 0, 0] and not term and not trunc
    assert info["queries"] == {"instructor": 1, "reviewer": 1}
    obs, r, term, _, info = env.step(1)  # add_constraints leaves it unchanged here: Equal, reward 0, no judge
    assert r == 0.0 and not info["changed"] and info["queries"] == {"instructor": 1, "reviewer": 0}
    assert obs.argmax() == 1 and not term
    obs, r, term, _, info = env.step(np.int64(2))
    assert term and info["episode"]["l"] == 3 and info["episode"]["r"] == 2.0
    assert info["episode_queries"] == {"instructor": 3, "reviewer": 2}
    assert instructor.batches == [1, 1, 1] and reviewer.batches == [1, 1]
    assert client.account.by_purpose["evolve"].queries == 3
    obs, info = env.reset()
    assert obs.sum() == 0.0 and env.ep.step == 0 and info["episode_index"] == 2


def test_rejected_rewrite_keeps_the_instruction(opset):
    _, _, _, reward, encoder, cfg = _parts(opset)
    backend = OperatorRuleBackend(fail_ops=["breadth"])
    env = InstructionEvolutionEnv(LLMClient("instructor", backend), opset, SEEDS, reward, encoder, cfg)
    _, info0 = env.reset(seed=0)
    _, r, _, _, info = env.step(0)
    assert info["rejected"] and info["instruction"] == info0["instruction"] and r == 0.0
    assert info["queries"] == {"instructor": 1, "reviewer": 0}


def test_messy_outputs_are_cleaned_before_they_become_the_state(opset):
    client, *_ = _parts(opset)
    _, _, _, reward, encoder, cfg = _parts(opset)
    env = InstructionEvolutionEnv(LLMClient("i", OperatorRuleBackend(style="messy")), opset, SEEDS, reward, encoder, cfg)
    _, info0 = env.reset(seed=1)
    _, _, _, _, info = env.step(3)
    assert info["instruction"] == f"{info0['instruction']} {ADDITIONS['concretizing']}"
    assert info["raw_output"].startswith("Sure! Here is the rewritten prompt")


def test_seed_inputs_are_part_of_the_instruction(opset):
    _, _, _, reward, encoder, cfg = _parts(opset)
    env = InstructionEvolutionEnv(LLMClient("i", OperatorRuleBackend()), opset, [SEEDS[3]], reward, encoder, cfg)
    assert env.reset()[1]["instruction"] == "Summarise this text.\nThe cat sat on the mat."


def test_embedding_observation_is_instruction_embedding_plus_step(opset):
    client, _, _, reward, encoder, cfg = _parts(opset, obs="embedding", episode_length=4)
    env = InstructionEvolutionEnv(client, opset, SEEDS, reward, encoder, cfg)
    assert env.observation_space.shape == (385,)
    obs, info = env.reset(seed=0)
    assert np.allclose(obs[:384], hash_embed([info["instruction"]])[0]) and obs[384] == 0.0
    obs, *_, info = env.step(0)
    assert np.allclose(obs[:384], hash_embed([info["instruction"]])[0]) and obs[384] == pytest.approx(0.25)
    assert env.observation_space.contains(obs)


def test_box_actions_map_by_argmax_after_bias(opset):
    client, _, _, reward, encoder, _ = _parts(opset)
    cfg = EnvSettings(episode_length=3, action_space="box", action_bias=[0.3, 0, 0, 0, 0, 0])
    env = InstructionEvolutionEnv(client, opset, SEEDS, reward, encoder, cfg)
    assert env.action_space.shape == (6,)
    assert env.action_to_op(np.zeros(6)) == 0  # the breadth bias wins a tie
    assert env.action_to_op(np.array([0.0, 0.2, 0.0, 0.0, 0.0, 0.0])) == 0
    assert env.action_to_op(np.array([0.0, 0.4, 0.0, 0.0, 0.0, 0.0])) == 1
    env.reset(seed=0)
    assert env.step(np.array([0, 0, 0, 0, 0, 1.0], dtype=np.float32))[4]["operator"] == "complicate_input"
    with pytest.raises(TeamsRLError, match="only applies to action_space=box"):
        EnvSettings(action_bias=[0.3] * 6)


def test_carry_instruction_continues_the_chain_across_episodes(opset):
    client, _, _, reward, encoder, cfg = _parts(opset, episode_length=2, carry_instruction=True)
    env = InstructionEvolutionEnv(client, opset, ["How to cook food?"], reward, encoder, cfg)
    env.reset()
    env.step(1)
    last = env.step(2)[4]["instruction"]
    assert env.reset()[1]["instruction"] == last


def test_gymnasium_and_sb3_env_checkers_accept_the_env(opset):
    from stable_baselines3.common.env_checker import check_env

    client, _, _, reward, encoder, cfg = _parts(opset)
    check_env(InstructionEvolutionEnv(client, opset, SEEDS, reward, encoder, cfg), warn=False)


def _rollout_single(opset, n, actions, changing):
    results = []
    for i in range(n):
        client, _, _, reward, encoder, cfg = _parts(opset, changing=changing)
        env = InstructionEvolutionEnv(client, opset, SEEDS, reward, encoder, cfg, index=i)
        obs, _ = env.reset()
        rows = [(obs, None, False, None)]
        for t in range(actions.shape[0]):
            obs, r, term, _, info = env.step(actions[t, i])
            rows.append((obs, r, term, info["instruction"]))
            if term:
                obs, _ = env.reset()
                rows.append((obs, None, False, None))
        results.append(rows)
    return results


def test_vecenv_makes_one_llm_call_per_step_and_equals_n_single_envs(opset):
    n, steps = 4, 7  # episodes of 3 steps: two auto-resets inside the rollout
    actions = np.random.default_rng(0).integers(0, 6, size=(steps, n))
    client, instructor, reviewer, reward, encoder, cfg = _parts(opset, changing=["deepening", "breadth"])
    venv = EvolutionVecEnv(make_envs(n, client, opset, SEEDS, reward, encoder, cfg))
    obs = venv.reset()
    vec_rows = [[(obs[i], None, False, None)] for i in range(n)]
    for t in range(steps):
        obs, rewards, dones, infos = venv.step(actions[t])
        for i in range(n):
            final = infos[i]["terminal_observation"] if dones[i] else obs[i]
            vec_rows[i].append((final, rewards[i], bool(dones[i]), infos[i]["instruction"]))
            if dones[i]:
                vec_rows[i].append((obs[i], None, False, None))
    assert instructor.batches == [n] * steps  # one instructor call per step for all N envs
    assert all(size <= n for size in reviewer.batches) and len(reviewer.batches) <= steps
    assert venv.total_queries["instructor"] == n * steps

    single = _rollout_single(opset, n, actions, ["deepening", "breadth"])
    for i in range(n):
        assert len(single[i]) == len(vec_rows[i])
        for (o1, r1, d1, t1), (o2, r2, d2, t2) in zip(vec_rows[i], single[i], strict=True):
            assert np.array_equal(o1, o2) and r1 == r2 and d1 == d2 and t1 == t2


def test_vecenv_state_roundtrip_continues_identically(opset):
    client, _, _, reward, encoder, cfg = _parts(opset, changing=["deepening"])
    a = EvolutionVecEnv(make_envs(3, client, opset, SEEDS, reward, encoder, cfg))
    a.reset()
    a.step(np.array([2, 1, 0]))
    state = a.get_state()
    b = EvolutionVecEnv(make_envs(3, client, opset, SEEDS, reward, encoder, cfg))
    b.reset()
    assert np.array_equal(b.set_state(state), a._observe(range(3)))
    for t in range(4):
        out_a, out_b = a.step(np.array([2, 2, t % 6])), b.step(np.array([2, 2, t % 6]))
        assert [i["instruction"] for i in out_a[3]] == [i["instruction"] for i in out_b[3]]
        assert np.array_equal(out_a[1], out_b[1])
    assert a.get_attr("index") == [0, 1, 2] and a.env_method("request_seed") == b.env_method("request_seed")


def test_encoder_and_env_validation(opset):
    with pytest.raises(TeamsRLError, match="observation kind"):
        ObservationEncoder("pixels", 6, 6)
    client, _, _, reward, _, cfg = _parts(opset)
    with pytest.raises(TeamsRLError, match="does not match"):
        InstructionEvolutionEnv(client, opset, SEEDS, reward, ObservationEncoder("last_op", 5, 3), cfg)
    with pytest.raises(TeamsRLError, match="at least one seed"):
        InstructionEvolutionEnv(client, opset, [], reward, ObservationEncoder("last_op", 6, 3), cfg)
    enc = ObservationEncoder("last_op", 6, 6)
    assert enc.encode(["a", "b"], [None, 4], [0, 1]).tolist() == [[0] * 6, [0, 0, 0, 0, 1, 0]]
    assert enc.encode(["a"], [-1], [0]).sum() == 0
    step = ObservationEncoder("step", 6, 3)  # the steps taken so far, one-hot over the episode's 3 steps
    assert step.dim == 3 and step.space.shape == (3,)
    assert step.encode(["a", "b", "c"], [None, 4, 1], [0, 1, 2]).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    bandit = ObservationEncoder("none", 6, 3)  # one state: the same operator distribution everywhere
    assert bandit.dim == 1 and bandit.encode(["a", "b"], [None, 3], [0, 2]).tolist() == [[1.0], [1.0]]


@pytest.mark.slow
def test_embedding_observation_with_real_minilm(opset):
    encoder = ObservationEncoder("embedding", 6, 6)
    obs = encoder.encode(["How to cook food?", "How do I prepare a meal?", "Stock prices fell today."],
                         [None, 1, 2], [0, 1, 2])
    assert obs.shape == (3, 385)
    assert np.allclose(np.linalg.norm(obs[:, :384], axis=1), 1.0, atol=1e-4)
    sim = obs[:, :384] @ obs[:, :384].T
    assert sim[0, 1] > 0.6 > 0.2 > sim[0, 2]
    assert obs[:, 384].tolist() == pytest.approx([0.0, 1 / 6, 2 / 6])
