"""Stage `generate`: the trained policy steers the expert LLM over the seeds; the expert answers; filters; dataset.

For every seed, the policy (from the `policy` artifact) picks an operator at each of `episode_length` steps,
with the paper's generation rules from `cfg.generate.rules` applied on top of its scores (a per-operator bias,
in-breadth forced at given steps, in-breadth replaced elsewhere). The expert executes the operator (purpose
"evolve"); every step's instruction is kept with its lineage (seed id, step, operator, parent). Then the expert
answers every kept instruction (purpose "answer") and, with `filters.elimination.no_info_gain`, the reviewer
judges each evolution against its parent (purpose "judge", WizardLM's elimination rule 1).

`generate.mode`:
  teams_rl  each step rewrites the previous step's instruction (the official `generate_data_alpaca.py`);
            answers and filters come after the chains.
  wizardlm  WizardLM's Evol-Instruct: every round's evolution is answered and judged at once; an evolution
            that fails elimination is dropped and the next round retries from its parent.

All LLM calls of a chunk of seeds and one step go in ONE batched `complete` call. Every result is appended to
`journal.jsonl` keyed by (seed id, step) as soon as its call returns, so a killed run resumes where it
stopped, and a finished one re-run sends no query. Outputs: `dataset/` (HF DatasetDict: train, heldout),
`alpaca.json`, `heldout.json`, `dropped.jsonl`, `stats.json`, PNG plots and a dataset card `README.md`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from teams_rl.errors import TeamsRLError
from teams_rl.evol.filters import RULE1, FilterSettings, TextRules, apply_filters
from teams_rl.evol.journal import Journal
from teams_rl.evol.seeds import Seed, load_seeds
from teams_rl.llm.types import ChatRequest

log = logging.getLogger(__name__)

VERSION = 1
INPUTS = ["policy"]
RESUMABLE = True
MODES = ("teams_rl", "wizardlm")
EVOLUTION_FAILED = "evolution_failed"
ANSWER_FAILED = "answer_failed"
JOURNAL = "journal.jsonl"


def config_keys(cfg: DictConfig) -> list[str]:
    keys = ["seed", "generate", "seeds", "filters", "operators", "expert", "privacy.holdout_fraction"]
    if FilterSettings.from_cfg(cfg.get("filters")).no_info_gain:
        keys.append("reviewer")
    return keys


# ------------------------------------------------------------------------------------------------ settings

@dataclass(frozen=True)
class Rules:
    """The paper's generation rules on top of the policy's scores (1-based steps)."""

    forced_breadth_steps: frozenset[int]
    bias: np.ndarray                 # [n_ops], added to the scores
    replace_breadth_with: int | None
    breadth: tuple[int, ...]

    def choose(self, scores: np.ndarray, step: int) -> int:
        if step in self.forced_breadth_steps:
            return self.breadth[0]
        op = int(np.argmax(scores + self.bias))
        if self.replace_breadth_with is not None and op in self.breadth:
            return self.replace_breadth_with
        return op


def build_rules(gen: DictConfig, opset) -> Rules:
    rules = gen.get("rules") or {}
    forced = frozenset(int(s) for s in (rules.get("forced_breadth_steps") or []))
    bad = sorted(s for s in forced if not 1 <= s <= int(gen.episode_length))
    if bad:
        raise TeamsRLError(f"generate.rules.forced_breadth_steps {bad} outside 1..{gen.episode_length}")
    if forced and not opset.breadth_indices:
        raise TeamsRLError(f"generate.rules.forced_breadth_steps needs an in-breadth operator; set "
                           f"'{opset.name}' has none")
    bias = np.zeros(len(opset))
    for name, value in (rules.get("op_bias") or {}).items():
        bias[opset.index(str(name))] += float(value)
    replace = rules.get("replace_breadth_with")
    return Rules(forced, bias, None if replace in (None, "") else opset.index(str(replace)),
                 tuple(opset.breadth_indices))


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _stable_int(*parts) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def holdout_fraction(cfg: DictConfig) -> float:
    value = OmegaConf.select(cfg, "privacy.holdout_fraction", default=None)
    if value is None:
        value = cfg.generate.get("holdout_fraction", 0.0)
    value = float(value or 0.0)
    if not 0.0 <= value < 1.0:
        raise TeamsRLError(f"holdout_fraction must be in [0, 1), got {value}")
    return value


# ------------------------------------------------------------------------------------------------ chains

@dataclass
class Chain:
    """Where one seed's evolution stands: its current instruction (the next step's parent)."""

    seed: Seed
    text: str
    parent_id: str
    last_op: int | None = None


def start_text(seed: Seed, merge_input: bool) -> str:
    return f"{seed.instruction}\n{seed.input}" if merge_input and seed.input else seed.instruction


def record_key(seed_id: str, step: int) -> str:
    return f"{seed_id}/{step}"


class Generator:
    """Runs the rollout, answers and judging for all seeds, journaling every result."""

    def __init__(self, cfg: DictConfig, ctx, seeds: list[Seed], journal: Journal):
        from teams_rl.evol.agents import load_agent
        from teams_rl.evol.operators import load_operator_set

        self.cfg = cfg
        self.gen = cfg.generate
        self.mode = str(self.gen.get("mode", "teams_rl"))
        if self.mode not in MODES:
            raise TeamsRLError(f"generate.mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        self.steps = int(self.gen.episode_length)
        if self.steps < 1:
            raise TeamsRLError(f"generate.episode_length must be >= 1, got {self.steps}")
        self.ctx = ctx
        self.seeds = seeds
        self.journal = journal
        self.opset = load_operator_set(cfg.get("operators"))
        self.agent = load_agent(ctx.inputs["policy"])
        if list(self.agent.operators) != self.opset.names:
            raise TeamsRLError(f"the policy was trained on operators {self.agent.operators} but "
                               f"operators={self.opset.name} has {self.opset.names}; use the same operator set")
        self.rules = build_rules(self.gen, self.opset)
        self.filters = FilterSettings.from_cfg(cfg.get("filters"))
        self.text_rules = TextRules(self.filters)
        self.merge_input = bool(self.gen.get("merge_input", True))
        self.deterministic = bool(self.gen.get("deterministic", True))
        self.base_seed = int(cfg.seed)
        self.expert = ctx.llm("expert")
        self.seed_by_id = {s.id: s for s in seeds}
        self._judge = None

    # -- policy ------------------------------------------------------------------------------------
    def choose_ops(self, chains: list[Chain], step: int) -> list[int]:
        """Operator per chain at 1-based `step`: the agent's scores + the rules. Each chain's choice depends
        only on its own state and (seed id, step), never on the rest of the batch (resumes are exact)."""
        obs = self.agent.obs_encoder.encode([c.text for c in chains], [c.last_op for c in chains],
                                            [step - 1] * len(chains))
        if not chains:
            return []
        if self.deterministic and self.agent.algorithm != "random":  # a random agent always samples
            scores = self.agent.action_scores(obs, step - 1, deterministic=True)
        else:
            scores = np.stack([
                self.agent.action_scores(obs[i:i + 1], step - 1, deterministic=False,
                                         rng=np.random.default_rng(_stable_int(self.base_seed, c.seed.id, step)))[0]
                for i, c in enumerate(chains)
            ])
        return [self.rules.choose(scores[i], step) for i in range(len(chains))]

    # -- LLM calls ---------------------------------------------------------------------------------
    def evolve(self, chains: list[Chain], step: int) -> None:
        from teams_rl.evol.evolution import evolve_detailed

        todo = [c for c in chains if ("evolve", record_key(c.seed.id, step)) not in self.journal]
        if not todo:
            return
        ops = self.choose_ops(todo, step)
        ev = self.gen.get("evolve") or {}
        rewrites = evolve_detailed(
            self.expert, self.opset, [c.text for c in todo], ops,
            seeds=[_stable_int(self.base_seed, c.seed.id, step, "evolve") for c in todo], purpose="evolve",
            max_tokens=ev.get("max_tokens"), temperature=ev.get("temperature"),
            min_words=int(ev.get("min_words", 3)))
        self.journal.append({
            "kind": "evolve", "key": record_key(c.seed.id, step), "seed_id": c.seed.id, "step": step,
            "op_index": op, "operator": self.opset.names[op], "parent_id": c.parent_id, "parent": c.text,
            "instruction": rw.text, "raw": rw.raw, "error": rw.completion.error, "cached": rw.completion.cached,
        } for c, op, rw in zip(todo, ops, rewrites, strict=True))

    def answer(self, keys: list[str]) -> None:
        todo = [k for k in keys if ("answer", k) not in self.journal]
        if not todo:
            return
        ans = self.gen.get("answer") or {}
        evolved = [self.journal.get("evolve", k) for k in todo]
        requests = [
            ChatRequest.chat(self.prompt_of(e), system=ans.get("system") or None, max_tokens=ans.get("max_tokens"),
                             temperature=ans.get("temperature"), purpose="answer",
                             seed=_stable_int(self.base_seed, e["seed_id"], e["step"], "answer"))
            for e in evolved
        ]
        completions = self.expert.complete(requests)
        self.journal.append({
            "kind": "answer", "key": k, "output": (c.text or "").strip() if c.ok else None, "error": c.error,
            "cached": c.cached,
        } for k, c in zip(todo, completions, strict=True))

    def judge(self, keys: list[str]) -> None:
        """Elimination rule 1 for answered evolutions: the reviewer is asked whether parent and evolved
        instruction are equal (the reward module's prompt and parser). An unchanged text is "Equal" unasked."""
        from teams_rl.evol.rewards import Judge, parse_judgement

        todo = [k for k in keys if ("judge", k) not in self.journal]
        if not todo:
            return
        if self._judge is None:
            self._judge = Judge(None, prompt=self.filters.judge_prompt, strict=self.filters.judge_strict,
                                max_tokens=self.filters.judge_max_tokens)
        evolved = [self.journal.get("evolve", k) for k in todo]
        ask = [i for i, e in enumerate(evolved) if _norm(e["instruction"]) != _norm(e["parent"])]
        completions = {}
        if ask:
            requests = [
                ChatRequest.chat(self._judge.render(evolved[i]["parent"], evolved[i]["instruction"]),
                                 max_tokens=self._judge.max_tokens, purpose="judge",
                                 seed=_stable_int(self.base_seed, evolved[i]["seed_id"], evolved[i]["step"], "judge"))
                for i in ask
            ]
            completions = dict(zip(ask, self.ctx.llm("reviewer").complete(requests), strict=True))
        rows = []
        for i, key in enumerate(todo):
            c = completions.get(i)
            verdict = parse_judgement(c.text, self._judge.strict) if c is not None and c.ok else None
            rows.append({"kind": "judge", "key": key, "not_equal": bool(verdict), "queried": c is not None,
                         "reply": None if c is None else c.text, "error": None if c is None else c.error,
                         "cached": bool(c is not None and c.cached)})
        self.journal.append(rows)

    def prompt_of(self, evolved: dict) -> str:
        seed_input = "" if self.merge_input else self.seed_by_id[evolved["seed_id"]].input
        return f"{evolved['instruction']}\n\n{seed_input}" if seed_input else evolved["instruction"]

    # -- state -------------------------------------------------------------------------------------
    def drop_reason(self, key: str) -> str | None:
        """Why the evolution `key` is not a dataset record (None = not so far): a failed evolution or answer,
        rule 1 when enabled, and in wizardlm mode the round's other elimination rules (2-4). The remaining
        filters (Alpaca, duplicates) run afterwards in `apply_filters`."""
        evolved = self.journal.get("evolve", key)
        if evolved["instruction"] is None:
            return EVOLUTION_FAILED
        answer = self.journal.get("answer", key)
        if answer is None or answer["output"] is None:
            return ANSWER_FAILED
        if self.filters.no_info_gain:
            verdict = self.journal.get("judge", key)
            if verdict is None or not verdict["not_equal"]:
                return RULE1
        if self.mode == "wizardlm":
            return (self.text_rules.answer_reason(answer["output"])
                    or self.text_rules.copied_prompt_reason(evolved["instruction"]))
        return None

    def advance(self, chain: Chain, step: int) -> None:
        key = record_key(chain.seed.id, step)
        evolved = self.journal.get("evolve", key)
        chain.last_op = evolved["op_index"]
        if self.mode == "wizardlm":
            accepted = self.drop_reason(key) is None
        else:
            accepted = evolved["instruction"] is not None
        if accepted:
            chain.text, chain.parent_id = evolved["instruction"], key

    # -- driver ------------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        chunk = max(1, int(self.gen.get("chunk_size", 256)))
        judge = self.filters.no_info_gain
        n_chunks = (len(self.seeds) + chunk - 1) // chunk
        bar = tqdm(total=n_chunks * self.steps, desc=f"generate ({self.mode})", unit="step", disable=not progress)
        for start in range(0, len(self.seeds), chunk):
            chains = [Chain(s, start_text(s, self.merge_input), s.id) for s in self.seeds[start:start + chunk]]
            for step in range(1, self.steps + 1):
                self.evolve(chains, step)
                keys = [record_key(c.seed.id, step) for c in chains]
                if self.mode == "wizardlm":
                    ok = [k for k in keys if self.journal.get("evolve", k)["instruction"] is not None]
                    self.answer(ok)
                    if judge:
                        self.judge([k for k in ok if self.journal.get("answer", k)["output"] is not None])
                for c in chains:
                    self.advance(c, step)
                bar.update(1)
            if self.mode == "teams_rl":
                keys = [record_key(c.seed.id, s) for c in chains for s in range(1, self.steps + 1)]
                ok = [k for k in keys if self.journal.get("evolve", k)["instruction"] is not None]
                self.answer(ok)
                if judge:
                    self.judge([k for k in ok if self.journal.get("answer", k)["output"] is not None])
        bar.close()

    # -- results -----------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        """Every evolution in seed and step order, with lineage, answer and (if already known) drop reason."""
        out = []
        for seed in self.seeds:
            for step in range(1, self.steps + 1):
                key = record_key(seed.id, step)
                evolved = self.journal.get("evolve", key)
                answer = self.journal.get("answer", key) or {}
                rec = {
                    "id": key, "seed_id": seed.id, "step": step, "operator": evolved["operator"],
                    "parent_id": evolved["parent_id"], "parent_instruction": evolved["parent"],
                    "instruction": evolved["instruction"] or "",
                    "input": "" if self.merge_input else seed.input,
                    "output": answer.get("output") or "",
                }
                reason = self.drop_reason(key)
                if reason:
                    rec["drop_reason"] = reason
                out.append(rec)
        return out

    def calls(self) -> dict[str, int]:
        """LLM requests by role/purpose as journaled: `calls/...` needed, `sent/...` not served by the cache."""
        out: Counter = Counter()
        for kind, role in (("evolve", "expert"), ("answer", "expert"), ("judge", "reviewer")):
            for rec in self.journal.records(kind):
                if kind == "judge" and not rec["queried"]:
                    continue
                out[f"calls/{role}/{kind}"] += 1
                if not rec.get("cached"):
                    out[f"sent/{role}/{kind}"] += 1
        return dict(out)


# ------------------------------------------------------------------------------------------------ outputs

def split_holdout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split by seed (a whole chain goes to one side, so held-out items are not near-copies of
    training items): seeds are shuffled and taken until `fraction` of the records are held out."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    by_seed: dict[str, list[dict]] = {}
    for rec in records:
        by_seed.setdefault(rec["seed_id"], []).append(rec)
    order = sorted(by_seed)
    np.random.default_rng(seed).shuffle(order)
    target = max(1, round(fraction * len(records)))
    held: set[str] = set()
    count = 0
    for seed_id in order:
        if count >= target or len(held) == len(order) - 1:
            break
        held.add(seed_id)
        count += len(by_seed[seed_id])
    train = [r for r in records if r["seed_id"] not in held]
    heldout = [r for r in records if r["seed_id"] in held]
    return train, heldout


COLUMNS = ("id", "seed_id", "step", "operator", "parent_id", "parent_instruction", "instruction", "input", "output")


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

    seeds = load_seeds(cfg.get("seeds"))
    gen = cfg.generate
    progress = bool(gen.get("progress", True))
    journal = Journal(ctx.out_dir / JOURNAL)
    try:
        if journal.torn_lines:
            log.warning("generate: dropped a torn last journal line (the previous run was killed mid-write)")
        resumed = journal.count("evolve")
        if resumed:
            log.info("generate: resuming, %d evolutions already journaled", resumed)
        generator = Generator(cfg, ctx, seeds, journal)
        generator.run(progress)
        records = generator.records()
        calls = generator.calls()
    finally:
        journal.close()

    settings = generator.filters
    seed_texts = [start_text(s, generator.merge_input) for s in seeds]
    report = apply_filters(records, settings, seed_texts=seed_texts, progress=progress)
    if not report.kept:
        log.warning("generate: no record survived the filters (%s); the dataset is empty", report.by_reason())
    train, heldout = split_holdout(report.kept, holdout_fraction(cfg), int(cfg.seed))
    write_dataset(ctx.out_dir, train, heldout)
    with open(ctx.out_dir / "dropped.jsonl", "w") as fh:
        for rec in report.dropped:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

    stats = dataset_stats(report.kept, seed_texts, embeddings=bool(gen.get("embedding_stats", True)))
    stats["dropped_by_reason"] = report.by_reason()
    stats["split"] = {"train": len(train), "heldout": len(heldout)}
    stats["calls"] = calls
    write_json_atomic(ctx.out_dir / "stats.json", stats)
    for path in plot_stats(report.kept, seed_texts, ctx.out_dir):
        ctx.tracker.log_image(f"generate/{path.stem}", path)

    metrics = {
        "mode": generator.mode,
        "seeds": len(seeds),
        "episode_length": generator.steps,
        "evolutions": len(records),
        "dataset/size": len(report.kept),
        "dataset/train": len(train),
        "dataset/heldout": len(heldout),
        "dropped": len(report.dropped),
        **{f"dropped/{k}": v for k, v in report.by_reason().items()},
        **calls,
        "calls/total": sum(v for k, v in calls.items() if k.startswith("calls/")),
        "distinct_1": stats["distinct_1"],
        "distinct_2": stats["distinct_2"],
        "instruction_words_mean": stats["instruction_words"]["mean"],
    }
    if stats.get("embedding_diversity") is not None:
        metrics["embedding_diversity"] = stats["embedding_diversity"]
    write_card(ctx.out_dir, cfg, metrics, stats, generator.opset.names, ctx.input_manifests.get("policy"),
               expert_model=generator.expert.model_id)
    ctx.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    ctx.tracker.log_table("generate/dropped_by_reason", ["reason", "records"],
                          [[k, v] for k, v in report.by_reason().items()])
    _print_summary(metrics)
    return metrics


def _print_summary(metrics: dict) -> None:
    print(f"\ngenerate ({metrics['mode']}): {metrics['seeds']} seeds x {metrics['episode_length']} steps = "
          f"{metrics['evolutions']} evolutions -> {metrics['dataset/size']} records "
          f"(train {metrics['dataset/train']}, heldout {metrics['dataset/heldout']})")
    drops = {k[len('dropped/'):]: v for k, v in metrics.items() if k.startswith("dropped/")}
    if drops:
        print("dropped: " + ", ".join(f"{k} {v}" for k, v in drops.items()))
    calls = {k[len('calls/'):]: v for k, v in metrics.items() if k.startswith("calls/") and k != "calls/total"}
    print("LLM calls: " + ", ".join(f"{k} {v}" for k, v in calls.items()) + f" (total {metrics['calls/total']})")
