"""Membership-inference attacks on a causal LM from one batched pass of per-token log-probabilities.

Attacks (every score is oriented so that *higher means more likely a member*):
  loss      mean token log-likelihood, i.e. minus the LOSS attack's NLL (Yeom et al. 2018)
  zlib      minus NLL divided by the zlib-compressed length of the scored text (Carlini et al. 2021)
  min_k     mean of the lowest k% token log-probs (Shi et al. 2024, "Min-K% Prob")
  min_k_pp  mean of the lowest k% of (log p(x_t) - mu_t) / sigma_t, mu/sigma = mean/std of log p(z) under
            the model's next-token distribution (Zhang et al. 2024, "Min-K%++")
  ref       NLL under a reference model minus NLL under the target (Carlini et al. 2021); with the
            pre-fine-tuning base model as reference it cancels how hard an example is in itself
Metrics: ROC-AUC with a stratified bootstrap CI and TPR at fixed low FPR (as in mimir, Duan et al. 2024).
"""

from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass

import numpy as np

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp", "ref")
SHARED_PREFIX_MIN_TOKENS = 8  # fewer shared columns are not worth a second forward call


@dataclass
class TokenScores:
    """Per scored token: log p(x_t | x_<t), and mean/std of log p(z | x_<t) over the vocabulary."""

    logprobs: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    @property
    def nll(self) -> float:
        return float(-self.logprobs.mean())


# ----------------------------------------------------------------------------------------- tokenising
def encode_pairs(tokenizer, prompts: list[str], responses: list[str], *, max_length: int = 512,
                 score_on: str = "response", append_eos: bool = True) -> list[tuple[list[int], int]]:
    """Token ids of prompt + response and the position of the first scored token.

    Tokenised the way the SFT recipe trains (`teams_rl.sft.data.encode`): the prompt with the tokenizer's
    special tokens, the response without, then EOS; so `score_on="response"` scores exactly the tokens a
    fine-tuned model was trained on (`"full"` scores every token after the first). Over-long sequences are
    cut from the right, as in training; when the prompt alone fills `max_length`, its beginning is cut
    instead, leaving half the window for the response.
    """
    if score_on not in ("response", "full"):
        raise ValueError(f"score_on must be 'response' or 'full', got {score_on!r}")
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    out = []
    for p_ids, r_ids in zip(prompt_ids, response_ids, strict=True):
        ids = list(p_ids) + list(r_ids) + eos
        start = len(p_ids) if score_on == "response" else 1
        cut = start - max_length // 2 if start >= max_length else 0
        ids, start = ids[cut:cut + max_length], start - cut
        if start >= len(ids):
            raise ValueError("an example has no response token to score (empty response and no EOS)")
        out.append((ids, start))
    return out


def scored_texts(prompts: list[str], responses: list[str], score_on: str) -> list[str]:
    return list(responses) if score_on == "response" else [p + r for p, r in zip(prompts, responses, strict=True)]


# ----------------------------------------------------------------------------------------- the log-prob pass
def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _batch_logits(model, ids, mask, first: int, keep_arg: bool, shared_prefix: bool):
    """(logits, offset): the logits of positions `first`.. (all positions without `logits_to_keep`) and the
    position of their first row. With `shared_prefix` the leading columns every row shares (the Alpaca
    template) run once, when no scored position lies inside them: the same logits up to float rounding."""
    import torch

    from teams_rl.llm.prefix_cache import prefix_then_tails, shared_columns

    width = ids.shape[1]
    shared = shared_columns(ids) if shared_prefix and keep_arg and ids.shape[0] > 1 else 0
    if shared >= SHARED_PREFIX_MIN_TOKENS and first >= shared:
        _, tails = prefix_then_tails(model, ids, shared, head_kwargs={"logits_to_keep": 1},
                                     tail_kwargs={"logits_to_keep": torch.arange(first - shared, width - shared - 1)})
        return tails.logits, first
    kwargs = {"logits_to_keep": torch.arange(first, width - 1)} if keep_arg else {}
    return model(input_ids=ids, attention_mask=mask, **kwargs).logits, (first if keep_arg else 0)


def token_scores(model, encoded: list[tuple[list[int], int]], *, batch_size: int = 16, pad_id: int = 0,
                 progress: bool = False, desc: str = "log-probs", shared_prefix: bool = True) -> list[TokenScores]:
    """One forward pass per batch of length-sorted, right-padded sequences; logits only at scored positions;
    the tokens every row of a batch starts with run once (`shared_prefix`, see `_batch_logits`)."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]), reverse=True)
    results: list[TokenScores | None] = [None] * len(encoded)
    keep_arg = _accepts_logits_to_keep(model)
    with torch.inference_mode(), tqdm(total=len(order), desc=desc, disable=not progress, leave=False) as bar:
        for lo in range(0, len(order), max(1, batch_size)):
            idx = order[lo:lo + max(1, batch_size)]
            width = max(len(encoded[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = encoded[i][0]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            first = min(encoded[i][1] for i in idx) - 1   # first position whose logits are needed
            logits, offset = _batch_logits(model, ids.to(device), mask.to(device), first, keep_arg, shared_prefix)
            # every scored token of the batch at once: logits at position t-1 predict token t
            rows, cols, targets, counts = [], [], [], []
            for row, i in enumerate(idx):
                seq, start = encoded[i]
                rows += [row] * (len(seq) - start)
                cols += range(start - 1 - offset, len(seq) - 1 - offset)
                targets += seq[start:]
                counts.append(len(seq) - start)
            lp = torch.log_softmax(logits[torch.tensor(rows), torch.tensor(cols)].float(), dim=-1)
            p = lp.exp()
            mu = (p * lp).sum(-1)
            sigma = (p * (lp - mu[:, None]).square()).sum(-1).sqrt()
            token_lp = lp.gather(-1, torch.tensor(targets, device=lp.device)[:, None])[:, 0]
            stacked = torch.stack([token_lp, mu, sigma]).cpu().numpy().astype(np.float64)
            bounds = np.cumsum(counts)[:-1]
            logprobs, mus, sigmas = (np.split(x, bounds) for x in stacked)
            for i, lp_i, mu_i, sigma_i in zip(idx, logprobs, mus, sigmas, strict=True):
                results[i] = TokenScores(logprobs=lp_i, mu=mu_i, sigma=sigma_i)
            bar.update(len(idx))
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- attacks
def _lowest_mean(values: np.ndarray, k: float) -> float:
    n = max(1, int(len(values) * k))
    return float(np.sort(values)[:n].mean())


def loss_score(ts: TokenScores) -> float:
    return -ts.nll


def zlib_score(ts: TokenScores, text: str) -> float:
    return -ts.nll / max(1, len(zlib.compress(text.encode("utf-8"))))


def min_k_score(ts: TokenScores, k: float) -> float:
    return _lowest_mean(ts.logprobs, k)


def min_k_pp_score(ts: TokenScores, k: float) -> float:
    z = (ts.logprobs - ts.mu) / np.maximum(ts.sigma, 1e-6)
    return _lowest_mean(z, k)


def ref_score(target: TokenScores, reference: TokenScores) -> float:
    return reference.nll - target.nll


def attack_scores(target: list[TokenScores], texts: list[str], k: float,
                  reference: list[TokenScores] | None = None, attacks=ATTACKS) -> dict[str, np.ndarray]:
    """{attack: per-example scores}; `ref` only when reference scores are given."""
    out: dict[str, np.ndarray] = {}
    for name in attacks:
        if name == "loss":
            out[name] = np.array([loss_score(t) for t in target])
        elif name == "zlib":
            out[name] = np.array([zlib_score(t, s) for t, s in zip(target, texts, strict=True)])
        elif name == "min_k":
            out[name] = np.array([min_k_score(t, k) for t in target])
        elif name == "min_k_pp":
            out[name] = np.array([min_k_pp_score(t, k) for t in target])
        elif name == "ref":
            if reference is not None:
                out[name] = np.array([ref_score(t, r) for t, r in zip(target, reference, strict=True)])
        else:
            raise ValueError(f"unknown attack {name!r} (known: {', '.join(ATTACKS)})")
    return out


# ----------------------------------------------------------------------------------------- metrics
def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def _auc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of each row pair (Mann-Whitney U with mid-ranks for ties): pos (B, P), neg (B, N)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    n_pos, n_neg = pos.shape[1], neg.shape[1]
    return (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auc_bootstrap_ci(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, alpha: float = 0.05,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile CI of the AUC, resampling members and non-members separately (both stay present)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if n_boot <= 0 or len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    aucs = np.concatenate([
        _auc_rows(pos[rng.integers(0, len(pos), (m, len(pos)))], neg[rng.integers(0, len(neg), (m, len(neg)))])
        for m in _chunks(n_boot, 250)
    ])
    return float(np.quantile(aucs, alpha / 2)), float(np.quantile(aucs, 1 - alpha / 2))


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return fpr, tpr


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    """The highest TPR among ROC thresholds whose FPR is at most `max_fpr`. With fewer than 1/max_fpr
    non-members that means zero false positives: the share of members scored above every non-member."""
    fpr, tpr = roc_points(labels, scores)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def attack_metrics(labels: np.ndarray, scores: np.ndarray, fprs=(0.001, 0.01), n_boot: int = 1000,
                   seed: int = 0) -> dict[str, float]:
    lo, hi = auc_bootstrap_ci(labels, scores, n_boot=n_boot, seed=seed)
    out = {"auc": roc_auc(labels, scores), "auc_ci_low": lo, "auc_ci_high": hi}
    for f in fprs:
        out[f"tpr@{_pct(f)}fpr"] = tpr_at_fpr(labels, scores, f)
    return out


def _pct(f: float) -> str:
    return f"{f * 100:g}%"


# ----------------------------------------------------------------------------------------- plots
def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path, title: str = "") -> None:
    """ROC curves of the attacks side by side on linear and log-log axes."""
    from teams_rl.plotting import roc_panels

    roc_panels([(name, fpr, tpr, auc) for name, (fpr, tpr, auc) in curves.items()], path, suptitle=title)
