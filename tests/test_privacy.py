"""Membership-inference attacks and the privacy stage on tiny models trained inside the tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from teams_rl.errors import TeamsRLError
from teams_rl.eval import members as mem
from teams_rl.eval import mia
from teams_rl.sft.data import format_prompt

# Words the tiny tokenizer keeps as single tokens: responses are short and cheap to memorise.
WORDS = ("air atom autumn balance blue brown carbon cat city code colors data day diet dog energy fox gas health "
         "helium history ideas light list mat models number plant plants paint party fall false five agent area").split()



def random_pairs(rng: random.Random, n: int, length: int = 10) -> list[dict]:
    return [{"instruction": " ".join(rng.choices(WORDS, k=rng.randint(3, 6))), "input": "",
             "output": " ".join(rng.choices(WORDS, k=length))} for _ in range(n)]


def common_pairs(rng: random.Random, n: int) -> list[dict]:
    """'Easy' text: one of six stock responses (a word repeated), predictable for a model that has seen them."""
    return [{"instruction": " ".join(rng.choices(WORDS, k=rng.randint(3, 6))), "input": "",
             "output": " ".join([rng.choice(WORDS[:6])] * 10)} for _ in range(n)]


def encode(tok, rows: list[dict]):
    return mia.encode_pairs(tok, [format_prompt(r["instruction"], r["input"]) for r in rows],
                            [r["output"] for r in rows])


def train_on(model, tok, rows: list[dict], steps: int, lr: float = 1e-2):
    """Full-batch AdamW on the responses (prompt tokens masked, as in SFT)."""
    import torch

    encoded = encode(tok, rows)
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for r, (seq, start) in enumerate(encoded):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        labels[r, start:len(seq)] = torch.tensor(seq[start:])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def auc_of(model, tok, members, nonmembers, attack="loss", reference=None):
    rows = members + nonmembers
    labels = np.array([1] * len(members) + [0] * len(nonmembers))
    target = mia.token_scores(model, encode(tok, rows), batch_size=32, pad_id=tok.pad_token_id)
    ref = None if reference is None else mia.token_scores(reference, encode(tok, rows), batch_size=32,
                                                          pad_id=tok.pad_token_id)
    scores = mia.attack_scores(target, [r["output"] for r in rows], 0.2, ref)
    return mia.roc_auc(labels, scores[attack])


@pytest.fixture(scope="module")
def member_split():
    rng = random.Random(0)
    return random_pairs(rng, 32), random_pairs(rng, 32)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, member_split):
    """tiny_llama (seed 0, the built-in base) after 30 full-batch steps on the members, saved to disk."""
    from teams_rl.models import build_tiny_llama

    model, tok = build_tiny_llama(seed=0)
    train_on(model, tok, member_split[0], steps=30)
    path = tmp_path_factory.mktemp("memorised")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_json(path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


# ------------------------------------------------------------------------------------------- the log-prob pass
def test_batched_pass_equals_one_sequence_at_a_time(tiny_llama_dir):
    import torch

    from teams_rl.models import load_causal_lm

    model, tok = load_causal_lm(tiny_llama_dir)
    rows = random_pairs(random.Random(3), 12) + [dict(r, output=r["output"] * 3) for r in random_pairs(random.Random(4), 5)]
    encoded = encode(tok, rows)
    single = mia.token_scores(model, encoded, batch_size=1, pad_id=tok.pad_token_id)
    batched = mia.token_scores(model, encoded, batch_size=8, pad_id=tok.pad_token_id)
    ids, start = encoded[-1]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    naive = full[start - 1:len(ids) - 1].gather(-1, torch.tensor(ids[start:])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(single[-1].logprobs, naive, atol=1e-5)
    for a, b, (seq, st) in zip(single, batched, encoded, strict=True):
        assert len(a.logprobs) == len(seq) - st > 0
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        np.testing.assert_allclose(a.mu, b.mu, atol=1e-4)
        np.testing.assert_allclose(a.sigma, b.sigma, atol=1e-4)


def test_shared_template_runs_once_and_scores_the_same(tiny_llama_dir, monkeypatch):
    """The Alpaca template every row starts with is run once per batch: the scores equal the plain pass's."""
    from teams_rl.llm import prefix_cache
    from teams_rl.models import load_causal_lm

    model, tok = load_causal_lm(tiny_llama_dir)
    encoded = encode(tok, random_pairs(random.Random(5), 12))
    calls = []
    real = prefix_cache.prefix_then_tails
    monkeypatch.setattr(prefix_cache, "prefix_then_tails", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    shared = mia.token_scores(model, encoded, batch_size=4, pad_id=tok.pad_token_id)
    assert len(calls) == 3 and min(calls) >= mia.SHARED_PREFIX_MIN_TOKENS  # every batch of 4 shared its start
    plain = mia.token_scores(model, encoded, batch_size=4, pad_id=tok.pad_token_id, shared_prefix=False)
    assert len(calls) == 3
    for a, b in zip(shared, plain, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.mu, b.mu, atol=1e-5)
        np.testing.assert_allclose(a.sigma, b.sigma, atol=1e-5)


def test_response_is_scored_given_the_prompt(tiny_llama_dir):
    """Tokenised as the SFT recipe trains (`teams_rl.sft.data.encode`): the scored tokens are its labels."""
    from teams_rl.models import load_causal_lm
    from teams_rl.sft.data import IGNORE_INDEX, encode

    _, tok = load_causal_lm(tiny_llama_dir)
    prompt = format_prompt("Name a colour")
    (ids, start), = mia.encode_pairs(tok, [prompt], [" blue sky"])
    train_ids, labels, _ = encode(tok, "Name a colour", "", " blue sky", max_length=512)
    assert ids == train_ids and start == labels.index(next(x for x in labels if x != IGNORE_INDEX))
    assert tok.decode(ids[start:]) == " blue sky" + tok.eos_token
    (full_ids, full_start), = mia.encode_pairs(tok, [prompt], [" blue sky"], score_on="full")
    assert full_ids == ids and full_start == 1
    (right, right_start), = mia.encode_pairs(tok, [prompt], [" blue sky"], max_length=start + 1)
    assert right == ids[:start + 1] and right_start == start          # cut from the right, as in training
    (left, left_start), = mia.encode_pairs(tok, [prompt], [" blue sky"], max_length=6)
    assert left == ids[start - 3:start + 3] and left_start == 3        # prompt too long: keep its end


# ------------------------------------------------------------------------------------------- attacks and metrics
def test_attack_scores_by_hand():
    ts = mia.TokenScores(logprobs=-np.arange(1.0, 11.0), mu=np.zeros(10), sigma=np.full(10, 2.0))
    text = "abcabcabcabc"
    assert mia.loss_score(ts) == pytest.approx(-5.5)
    assert mia.min_k_score(ts, 0.2) == pytest.approx(-9.5)           # lowest 2 of 10: -10, -9
    assert mia.min_k_pp_score(ts, 0.2) == pytest.approx(-4.75)       # (-9.5 - 0) / 2
    import zlib

    assert mia.zlib_score(ts, text) == pytest.approx(-5.5 / len(zlib.compress(text.encode())))
    ref = mia.TokenScores(logprobs=np.full(4, -7.0), mu=np.zeros(4), sigma=np.ones(4))
    assert mia.ref_score(ts, ref) == pytest.approx(7.0 - 5.5)


def test_auc_and_tpr_at_low_fpr_by_hand():
    nonmembers = np.arange(100.0)                                   # 0, 1, ..., 99
    members = np.array([150, 120, 99.5, 98.5, 97.5, 50, 40, 30, 20, 10])
    labels = np.array([1] * 10 + [0] * 100)
    scores = np.concatenate([members, nonmembers])
    # 0 false positives allowed: members above 99 -> 3/10; 1 allowed (99): above 98 -> 4/10; 5 allowed: above 94
    assert mia.tpr_at_fpr(labels, scores, 0.001) == pytest.approx(0.3)
    assert mia.tpr_at_fpr(labels, scores, 0.01) == pytest.approx(0.4)
    assert mia.tpr_at_fpr(labels, scores, 0.05) == pytest.approx(0.5)
    # AUC = P(member > non-member) with ties counted 1/2: (100+100+100+99+98+50.5+40.5+30.5+20.5+10.5) / 1000
    assert mia.roc_auc(labels, scores) == pytest.approx(0.6495)
    assert mia._auc_rows(members[None], nonmembers[None])[0] == pytest.approx(0.6495)
    lo, hi = mia.auc_bootstrap_ci(labels, scores, n_boot=500, seed=0)
    assert lo < 0.6495 < hi and hi - lo < 0.5
    metrics = mia.attack_metrics(labels, scores, fprs=(0.001, 0.01), n_boot=200)
    assert set(metrics) == {"auc", "auc_ci_low", "auc_ci_high", "tpr@0.1%fpr", "tpr@1%fpr"}


def test_memorised_members_are_detected_untrained_model_is_chance(tiny_llama_dir, memorised, member_split):
    from teams_rl.models import load_causal_lm

    members, nonmembers = member_split
    base, tok = load_causal_lm(tiny_llama_dir)
    trained, _ = load_causal_lm(memorised)
    assert 0.35 <= auc_of(base, tok, members, nonmembers) <= 0.65
    assert auc_of(trained, tok, members, nonmembers) >= 0.95
    assert auc_of(trained, tok, members, nonmembers, "min_k") >= 0.9


def test_reference_attack_cancels_a_difficulty_shift():
    """Members are hard (random words) and non-members easy (stock responses the base model learnt).
    Fine-tuning lowers the members' loss, but not below the easy texts', so LOSS ranks the non-members as
    members (AUC well below chance); the base model as reference removes the difficulty."""
    import copy

    from teams_rl.models import build_tiny_llama

    rng = random.Random(1)
    base, tok = build_tiny_llama(seed=0)
    train_on(base, tok, common_pairs(rng, 8) + random_pairs(rng, 8), steps=30)     # the base's "pre-training"
    members, nonmembers = random_pairs(rng, 24), common_pairs(rng, 24)
    target = train_on(copy.deepcopy(base), tok, members, steps=3, lr=1e-3)        # fine-tuning on the members
    loss_auc = auc_of(target, tok, members, nonmembers, "loss")
    ref_auc = auc_of(target, tok, members, nonmembers, "ref", reference=base)
    assert loss_auc <= 0.3 and ref_auc >= 0.85 and ref_auc - loss_auc >= 0.5


# ------------------------------------------------------------------------------------------- the stage
def test_privacy_stage_end_to_end(compose, tmp_path, tiny_llama_dir, memorised, member_split):
    from teams_rl.pipeline import run_pipeline

    members, nonmembers = member_split
    cfg = compose(["stages=[privacy]", f"privacy.model={memorised}", f"privacy.reference_model={tiny_llama_dir}",
                   f"privacy.members={write_json(tmp_path / 'm.json', members)}",
                   f"privacy.nonmembers={write_json(tmp_path / 'n.json', nonmembers + random_pairs(random.Random(9), 8))}",
                   "privacy.bootstrap=200"])
    result = run_pipeline(cfg, tmp_path / "run")["privacy"]
    assert result["n_members"] == result["n_nonmembers"] == 32          # equal counts (40 non-members given)
    assert result["loss/auc"] >= 0.95 and result["ref/auc"] >= 0.95
    assert result["loss/auc_ci_low"] <= result["loss/auc"] <= result["loss/auc_ci_high"]
    assert 0 <= result["loss/tpr@0.1%fpr"] <= result["loss/tpr@1%fpr"] <= 1
    assert result["nll_members"] < result["nll_nonmembers"]
    assert {f"{a}/auc" for a in mia.ATTACKS} <= set(result)
    out = Path(json.loads((tmp_path / "run" / "run_manifest.json").read_text())["stages"]["privacy"]["folder"])
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and sum(r["member"] for r in rows) == 32
    assert json.loads((out / "metrics.json").read_text())["loss/auc"] == result["loss/auc"]
    from teams_rl.fast_dtype import resolve_dtype

    chosen = resolve_dtype("auto", "cpu", cfg.paths.cache)  # privacy.dtype: auto, the fast one of this machine
    assert json.loads((out / "manifest.json").read_text())["dtype"] == {"target": chosen, "reference": chosen}


def test_privacy_needs_finetune_and_generate_unless_paths_given(compose, tmp_path):
    from teams_rl.stages import privacy

    assert privacy.STAGE.inputs_for(compose(["privacy.model=null"])) == ["finetune", "generate"]
    given = compose([f"privacy.model={tmp_path}", "privacy.members=a.json", "privacy.nonmembers=b.json"])
    assert privacy.STAGE.inputs_for(given) == []
    assert compose(["evaluate.model=tiny_llama"]).privacy.model == "tiny_llama"   # follows evaluate.model


@pytest.mark.parametrize("case, message", [
    ("overlap", "both members and non-members"),
    ("empty", "non-member set is empty"),
    ("missing_model", "does not exist"),
    ("missing_file", "does not exist"),
])
def test_privacy_bad_inputs_are_one_line(compose, tmp_path, tiny_llama_dir, member_split, case, message):
    from teams_rl.pipeline import run_pipeline

    members, nonmembers = member_split
    files = {"m": write_json(tmp_path / "m.json", members),
             "n": write_json(tmp_path / "n.json", {"overlap": nonmembers + members[:2], "empty": []}.get(case, nonmembers))}
    model = "/nonexistent/checkpoint" if case == "missing_model" else tiny_llama_dir
    if case == "missing_file":
        files["n"] = str(tmp_path / "absent.jsonl")
    cfg = compose(["stages=[privacy]", f"privacy.model={model}", f"privacy.reference_model={tiny_llama_dir}",
                   f"privacy.members={files['m']}", f"privacy.nonmembers={files['n']}"])
    with pytest.raises(TeamsRLError, match=message) as err:
        run_pipeline(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)


def test_size_matched_sampling():
    rng = random.Random(2)
    m, n = [mem.Example(**r) for r in random_pairs(rng, 30)], [mem.Example(**r) for r in random_pairs(rng, 12)]
    a, b = mem.sample_equal(m, n, max_samples=10, seed=0)
    assert len(a) == len(b) == 10 and set(a) <= set(m) and set(b) <= set(n)
    assert mem.sample_equal(m, n, max_samples=10, seed=0) == (a, b)
    assert len(mem.sample_equal(m, n, max_samples=None, seed=0)[0]) == 12
    with pytest.raises(TeamsRLError, match="match_size"):
        mem.sample_equal(m, n, max_samples=20, seed=0, match_size=True)
