"""The generation engine: a trained (or baseline) policy steers the expert LLM over seed instructions.

For every seed, the agent picks an operator at each of `episode_length` steps, with the paper's generation
rules applied on top of its scores (a per-operator bias, in-breadth forced at given steps, in-breadth
replaced elsewhere). The expert executes the operator (purpose "evolve"); every step's instruction is kept
with its lineage (seed id, step, operator, parent). Then the expert answers every evolved instruction
(purpose "answer") and, with `filters.elimination.no_info_gain`, the reviewer judges each evolution against
its parent (purpose "judge", WizardLM's elimination rule 1).

Modes:
  teams_rl  each step rewrites the previous step's instruction (the official `generate_data_alpaca.py`);
            answers and filters come after the chains.
  wizardlm  WizardLM's Evol-Instruct: every round's evolution is answered and judged at once; an evolution
            that fails elimination is dropped and the next round retries from its parent.

Every LLM result is appended to a `Journal` keyed by (seed id, step) as soon as its call returns, so a killed
run resumes where it stopped and a finished one re-run sends no query. The engine takes LLM clients (anything
with `complete(requests)`), not a stage context, so it runs and is tested on its own.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from teams_rl import config as C
from teams_rl.errors import TeamsRLError
from teams_rl.evol.filters import RULE1, FilterSettings, TextRules
from teams_rl.evol.journal import Journal
from teams_rl.evol.seeds import Seed
from teams_rl.llm.types import ChatRequest

MODES = ("teams_rl", "wizardlm")
EVOLUTION_FAILED = "evolution_failed"
ANSWER_FAILED = "answer_failed"
COLUMNS = ("id", "seed_id", "step", "operator", "parent_id", "parent_instruction", "instruction", "input", "output")


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


def build_rules(gen, opset) -> Rules:
    rules = C.get(gen, "rules", {})
    forced = frozenset(int(s) for s in (C.get(rules, "forced_breadth_steps") or []))
    steps = int(C.get(gen, "episode_length"))
    bad = sorted(s for s in forced if not 1 <= s <= steps)
    if bad:
        raise TeamsRLError(f"generate.rules.forced_breadth_steps {bad} outside 1..{steps}")
    if forced and not opset.breadth_indices:
        raise TeamsRLError(f"generate.rules.forced_breadth_steps needs an in-breadth operator; set "
                           f"'{opset.name}' has none")
    bias = np.zeros(len(opset))
    for name, value in (C.plain(C.get(rules, "op_bias")) or {}).items():
        bias[opset.index(str(name))] += float(value)
    replace = C.get(rules, "replace_breadth_with")
    return Rules(forced, bias, None if replace in (None, "") else opset.index(str(replace)),
                 tuple(opset.breadth_indices))


@dataclass(frozen=True)
class GenerationSettings:
    """`cfg.generate` as plain values (see conf/generate/default.yaml)."""

    mode: str
    steps: int
    merge_input: bool
    deterministic: bool
    chunk_size: int
    evolve_max_tokens: int | None
    evolve_temperature: float | None
    min_words: int
    answer_system: str | None
    answer_max_tokens: int | None
    answer_temperature: float | None

    @classmethod
    def from_config(cls, gen) -> GenerationSettings:
        mode = str(C.get(gen, "mode", "teams_rl"))
        if mode not in MODES:
            raise TeamsRLError(f"generate.mode must be one of {', '.join(MODES)}, got '{mode}'")
        steps = int(C.get(gen, "episode_length"))
        if steps < 1:
            raise TeamsRLError(f"generate.episode_length must be >= 1, got {steps}")
        ev, ans = C.get(gen, "evolve", {}), C.get(gen, "answer", {})
        return cls(mode=mode, steps=steps, merge_input=bool(C.get(gen, "merge_input", True)),
                   deterministic=bool(C.get(gen, "deterministic", True)),
                   chunk_size=max(1, int(C.get(gen, "chunk_size", 256))),
                   evolve_max_tokens=C.get(ev, "max_tokens"), evolve_temperature=C.get(ev, "temperature"),
                   min_words=int(C.get(ev, "min_words", 3)), answer_system=C.get(ans, "system") or None,
                   answer_max_tokens=C.get(ans, "max_tokens"), answer_temperature=C.get(ans, "temperature"))


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def stable_int(*parts) -> int:
    """A 31-bit integer that depends only on `parts` (request seeds, per-chain RNG seeds)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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
    """Runs the rollout, answers and judging for all seeds, journaling every result.

    `expert` and `reviewer()` are LLM clients (the reviewer is asked for only when rule 1 is on)."""

    def __init__(self, settings: GenerationSettings, rules: Rules, filters: FilterSettings, agent, opset,
                 seeds: list[Seed], journal: Journal, expert, reviewer: Callable | None = None, base_seed: int = 0):
        if list(agent.operators) != opset.names:
            raise TeamsRLError(f"the policy was trained on operators {agent.operators} but "
                               f"operators={opset.name} has {opset.names}; use the same operator set")
        self.s = settings
        self.mode = settings.mode
        self.steps = settings.steps
        self.rules = rules
        self.filters = filters
        self.text_rules = TextRules(filters)
        self.agent = agent
        self.opset = opset
        self.seeds = seeds
        self.journal = journal
        self.expert = expert
        self._reviewer = reviewer
        self.merge_input = settings.merge_input
        self.base_seed = int(base_seed)
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
        if self.s.deterministic and self.agent.algorithm != "random":  # a random agent always samples
            scores = self.agent.action_scores(obs, step - 1, deterministic=True)
        else:
            scores = np.stack([
                self.agent.action_scores(obs[i:i + 1], step - 1, deterministic=False,
                                         rng=np.random.default_rng(stable_int(self.base_seed, c.seed.id, step)))[0]
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
        rewrites = evolve_detailed(
            self.expert, self.opset, [c.text for c in todo], ops,
            seeds=[stable_int(self.base_seed, c.seed.id, step, "evolve") for c in todo], purpose="evolve",
            max_tokens=self.s.evolve_max_tokens, temperature=self.s.evolve_temperature, min_words=self.s.min_words)
        self.journal.append({
            "kind": "evolve", "key": record_key(c.seed.id, step), "seed_id": c.seed.id, "step": step,
            "op_index": op, "operator": self.opset.names[op], "parent_id": c.parent_id, "parent": c.text,
            "instruction": rw.text, "raw": rw.raw, "error": rw.completion.error, "cached": rw.completion.cached,
        } for c, op, rw in zip(todo, ops, rewrites, strict=True))

    def answer(self, keys: list[str]) -> None:
        todo = [k for k in keys if ("answer", k) not in self.journal]
        if not todo:
            return
        evolved = [self.journal.get("evolve", k) for k in todo]
        requests = [
            ChatRequest.chat(self.prompt_of(e), system=self.s.answer_system, max_tokens=self.s.answer_max_tokens,
                             temperature=self.s.answer_temperature, purpose="answer",
                             seed=stable_int(self.base_seed, e["seed_id"], e["step"], "answer"))
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
            if self._reviewer is None:
                raise TeamsRLError("generate: elimination rule 1 needs a reviewer LLM")
            requests = [
                ChatRequest.chat(self._judge.render(evolved[i]["parent"], evolved[i]["instruction"]),
                                 max_tokens=self._judge.max_tokens, purpose="judge",
                                 seed=stable_int(self.base_seed, evolved[i]["seed_id"], evolved[i]["step"], "judge"))
                for i in ask
            ]
            completions = dict(zip(ask, self._reviewer().complete(requests), strict=True))
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

        chunk = self.s.chunk_size
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


# ------------------------------------------------------------------------------------------------ splits

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
