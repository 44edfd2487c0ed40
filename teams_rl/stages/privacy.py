"""Membership inference against the fine-tuned model: can an attacker tell training pairs from held-out ones?

Members are the pairs the model was trained on (the generate stage's `train` split, or `privacy.members`);
non-members are the held-out split fixed before training (`heldout`, or `privacy.nonmembers`); the same
number of each is scored. One batched per-token log-prob pass per model (target, and the pre-fine-tuning
base model as reference) gives the LOSS, zlib, min-k%, min-k%++ and reference attacks. Writes
`scores.jsonl` (per example), `metrics.json`, `roc.png` (linear and log-log); logs `privacy/*`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from teams_rl import config as C
from teams_rl.errors import TeamsRLError
from teams_rl.stages import Stage

log = logging.getLogger(__name__)


def _given_data(cfg: DictConfig) -> bool:
    return bool(cfg.privacy.get("members")) and bool(cfg.privacy.get("nonmembers"))


def _inputs(cfg: DictConfig) -> list[str]:
    from teams_rl.eval.harness import check_model_ref

    check_model_ref(cfg.privacy.get("model"), "privacy.model")
    check_model_ref(cfg.privacy.get("reference_model"), "privacy.reference_model")
    deps = [] if cfg.privacy.get("model") else ["finetune"]
    return deps + ([] if _given_data(cfg) else ["generate"])


def _target_model(cfg: DictConfig, ctx) -> str:
    from teams_rl.models import model_to_score

    return model_to_score(cfg.privacy.get("model"), cfg.paths.get("cache"), ctx.inputs.get("finetune"))


def _member_sets(cfg: DictConfig, ctx):
    from teams_rl.eval import members as mem

    p = cfg.privacy
    if _given_data(cfg):
        m = mem.load_examples(p.members, p.get("members_split", "train"), "members")
        n = mem.load_examples(p.nonmembers, p.get("nonmembers_split", "heldout"), "non-members")
    else:
        dataset = Path(ctx.inputs["generate"]) / "dataset"
        m = mem.load_examples(dataset, p.get("members_split", "train"), "members")
        n = mem.load_examples(dataset, p.get("nonmembers_split", "heldout"), "non-members")
    mem.validate(m, n)
    return mem.sample_equal(m, n, p.get("max_samples"), int(p.get("seed", 0)), bool(p.get("match_size", False)))


def _load(path: str, dtype: str, device: str):
    from teams_rl.models import load_causal_lm

    try:
        return load_causal_lm(path, dtype=dtype, device=device)
    except OSError as err:
        raise TeamsRLError(f"privacy: cannot load model '{path}': {str(err).splitlines()[0]}") from err


def _score(path: str, prompts, responses, p, device: str, dtype: str, desc: str):
    from teams_rl.eval import mia

    model, tok = _load(path, dtype, device)
    encoded = mia.encode_pairs(tok, prompts, responses, max_length=int(p.get("max_length", 512)),
                               score_on=str(p.get("score_on", "response")), append_eos=bool(p.get("append_eos", True)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    scores = mia.token_scores(model, encoded, batch_size=int(p.get("batch_size", 16)), pad_id=pad,
                              progress=True, desc=desc)
    del model
    return scores


def _validate(cfg: DictConfig) -> None:
    from teams_rl.fast_dtype import check_dtype
    from teams_rl.models import check_model

    _inputs(cfg)
    p = cfg.privacy
    check_dtype(p.get("dtype", "auto"), "privacy.dtype")
    _attacks(cfg, bool(p.get("reference_model")))
    for key in ("max_samples", "batch_size", "max_length"):
        C.integer(cfg, f"privacy.{key}", minimum=1, optional=key == "max_samples")
    C.integer(cfg, "privacy.bootstrap", minimum=0)
    C.integer(cfg, "privacy.seed")
    C.fraction(cfg, "privacy.holdout_fraction", optional=True)
    fprs = C.plain(p.get("fpr")) or []
    if not isinstance(fprs, list) or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1
                                             for f in fprs):
        raise TeamsRLError(f"privacy.fpr must be a list of false-positive rates in (0, 1), got {fprs!r}")
    for key in ("members", "nonmembers"):
        if p.get(key) and not Path(str(p[key])).expanduser().exists():
            raise TeamsRLError(f"privacy.{key}: {p[key]} does not exist")
    for key in ("model", "reference_model"):
        if p.get(key):
            check_model(str(p[key]), cfg.paths.get("cache"), f"privacy.{key}")


def _attacks(cfg, ref_path) -> list[str]:
    """The attacks to run, after checking the settings they use."""
    from teams_rl.eval import mia

    p = cfg.privacy
    C.choice(cfg, "privacy.score_on", ("response", "full"), default="response")
    k = C.number(cfg, "privacy.k", optional=True)
    if k is not None and not 0 < k <= 1:
        raise TeamsRLError(f"privacy.k is the fraction of tokens min-k% averages: (0, 1], got {p.k}")
    attacks = [str(a) for a in p.get("attacks", mia.ATTACKS)]
    unknown = sorted(set(attacks) - set(mia.ATTACKS))
    if unknown:
        raise TeamsRLError(f"privacy.attacks: unknown {', '.join(unknown)} (known: {', '.join(mia.ATTACKS)})")
    if not ref_path:
        attacks = [a for a in attacks if a != "ref"]
    if not attacks:
        raise TeamsRLError("privacy: no attack to run (privacy.attacks is empty, or only `ref` without a "
                           "privacy.reference_model)")
    return attacks


def _evaluate(labels, scores: dict, p) -> tuple[dict, dict, list[list]]:
    """Per attack: AUC (+ bootstrap CI) and TPR at the configured FPRs; ROC curves; table rows."""
    from teams_rl.eval import mia

    fprs = [float(f) for f in p.get("fpr", [0.001, 0.01])]
    metrics, curves, rows = {}, {}, []
    for name, values in scores.items():
        m = mia.attack_metrics(labels, values, fprs=fprs, n_boot=int(p.get("bootstrap", 1000)),
                               seed=int(p.get("seed", 0)))
        metrics.update({f"{name}/{key}": value for key, value in m.items()})
        fpr, tpr = mia.roc_points(labels, values)
        curves[name] = (fpr, tpr, m["auc"])
        rows.append([name, *m.values()])
    return metrics, curves, rows


def run(cfg: DictConfig, ctx) -> dict:
    from teams_rl.eval import mia
    from teams_rl.fast_dtype import resolve_dtype
    from teams_rl.models import pick_device, resolve_model
    from teams_rl.sft.data import format_prompt

    p = cfg.privacy
    device = pick_device(str(p.get("device", "auto")))
    dtype = resolve_dtype(p.get("dtype", "auto"), device, cfg.paths.get("cache"), "privacy.dtype")
    target_path = _target_model(cfg, ctx)
    ref_path = resolve_model(str(p.reference_model), cfg.paths.get("cache")) if p.get("reference_model") else None
    attacks = _attacks(cfg, ref_path)
    members, nonmembers = _member_sets(cfg, ctx)
    examples = members + nonmembers
    labels = np.array([1] * len(members) + [0] * len(nonmembers))
    prompts = [format_prompt(e.instruction, e.input) for e in examples]   # the template the SFT stage trains with
    responses = [e.output for e in examples]
    log.info("privacy: %d members + %d non-members, target %s, reference %s",
             len(members), len(nonmembers), target_path, ref_path)

    target = _score(target_path, prompts, responses, p, device, dtype, "privacy: target log-probs")
    reference = _score(ref_path, prompts, responses, p, device, dtype, "privacy: reference log-probs") \
        if "ref" in attacks else None
    ctx.extra["dtype"] = {"target": dtype, **({"reference": dtype} if reference is not None else {})}
    texts = mia.scored_texts(prompts, responses, str(p.get("score_on", "response")))
    scores = mia.attack_scores(target, texts, float(p.get("k", 0.2)), reference, attacks)

    metrics: dict = {"n_members": len(members), "n_nonmembers": len(nonmembers)}
    attack_metrics, curves, rows = _evaluate(labels, scores, p)
    metrics.update(attack_metrics)
    metrics["nll_members"] = float(np.mean([t.nll for t in target[:len(members)]]))
    metrics["nll_nonmembers"] = float(np.mean([t.nll for t in target[len(members):]]))

    _write(ctx.out_dir, examples, labels, target, reference, scores, metrics)
    mia.plot_roc(curves, ctx.out_dir / "roc.png",
                 title=f"membership inference: {len(members)} members vs {len(nonmembers)} non-members")
    columns = ["attack", *[key.split("/", 1)[1] for key in attack_metrics if key.startswith(f"{rows[0][0]}/")]]
    ctx.log(metrics)
    ctx.tracker.log_table("privacy/attacks", columns, rows)
    ctx.tracker.log_image("privacy/roc", ctx.out_dir / "roc.png")
    _print(rows, columns)
    return metrics


def _write(out_dir: Path, examples, labels, target, reference, scores, metrics) -> None:
    with open(out_dir / "scores.jsonl", "w") as fh:
        for i, e in enumerate(examples):
            row = {"member": int(labels[i]), "instruction": e.instruction, "n_tokens": len(target[i].logprobs),
                   "nll": target[i].nll, **{name: float(v[i]) for name, v in scores.items()}}
            if reference is not None:
                row["nll_reference"] = reference[i].nll
            fh.write(json.dumps(row) + "\n")
    with open(out_dir / "metrics.json", "w") as fh:
        json.dump(metrics, fh, indent=2, sort_keys=True)


def _print(rows, columns) -> None:
    print("\nmembership inference")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join([row[0]] + [f"{v:.3f}" for v in row[1:]]) + " |")


STAGE = Stage(name="privacy", version=1, run=run, config_keys=["privacy"], inputs=_inputs, validate=_validate)
