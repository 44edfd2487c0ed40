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
  none      no evolution: the expert answers each seed instruction once (one record per seed, step 0); no
            policy is needed.

Budget (`generate.on_budget`): `stop` (default) ends the run at a role's budget (exit 3, a rerun with a larger
budget resumes); `cap` makes `expert.budget.max_queries` the size of the data: seeds are evolved in order while
they fit (`teams_rl.evol.budget_cap`), a refused request is never a record, and the run commits what fit and
says it was budget-capped.

Every LLM result is appended to a `Journal` keyed by (seed id, step) as soon as its call returns, so a killed
run resumes where it stopped and a finished one re-run sends no query. The engine takes LLM clients (anything
with `complete(requests)`), not a stage context, so it runs and is tested on its own.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from teams_rl import config as C
from teams_rl.errors import BudgetExceeded, TeamsRLError
from teams_rl.evol.cleaning import KINDS as CLEANING_KINDS
from teams_rl.evol.cleaning import REJECTIONS
from teams_rl.evol.evolution import evolve_request, to_rewrite
from teams_rl.evol.filters import RULE1, FilterSettings, TextRules
from teams_rl.evol.journal import Journal
from teams_rl.evol.seeds import Seed
from teams_rl.llm.client import Scheduler
from teams_rl.llm.failures import FailureBudget
from teams_rl.llm.types import ChatRequest, Completion

MODES = ("teams_rl", "wizardlm", "none")
SCHEDULES = ("stream", "barrier")
ON_BUDGET = ("stop", "cap")
EVOLUTION_FAILED = "evolution_failed"
ANSWER_FAILED = "answer_failed"
BUDGET_CAPPED = "budget_capped"   # its requests were not all sent before the expert budget ran out
COLUMNS = ("id", "seed_id", "step", "operator", "parent_id", "parent_instruction", "instruction", "input", "output")


# ------------------------------------------------------------------------------------------------ settings

@dataclass(frozen=True)
class Rules:
    """The paper's generation rules on top of the policy's scores (1-based steps)."""

    forced_breadth_steps: frozenset[int]
    bias: np.ndarray                 # [n_ops], added to the scores
    replace_breadth_with: int | None  # an operator index, NEXT (the policy's own best other operator) or CYCLE
    breadth: tuple[int, ...]
    depth: np.ndarray = field(init=False)  # the other (in-depth) operator indices, for NEXT and CYCLE

    NEXT = -1
    CYCLE = -2

    def __post_init__(self):
        object.__setattr__(self, "depth", np.array([i for i in range(len(self.bias)) if i not in self.breadth]))

    def choose(self, scores: np.ndarray, step: int, turn: int = 0) -> int:
        """The operator at 1-based `step`; `turn` (the seed's position) picks CYCLE's operator."""
        if step in self.forced_breadth_steps:
            return self.breadth[0]
        scored = scores + self.bias
        op = int(np.argmax(scored))
        if self.replace_breadth_with is None or op not in self.breadth:
            return op
        if self.replace_breadth_with == self.CYCLE:
            # the in-depth operators in turn over seeds and steps: consecutive seeds draw each of them at
            # every step, whatever a committed policy's residual preference among them is
            return int(self.depth[(turn + step) % len(self.depth)])
        if self.replace_breadth_with != self.NEXT:
            return self.replace_breadth_with
        # the argmax over the other operators: with sampled (Gumbel) scores, a draw from the policy's
        # distribution renormalised over them; with the mean scores, its second choice
        return int(self.depth[np.argmax(scored[self.depth])])


def build_rules(gen, opset) -> Rules:
    rules = C.get(gen, "rules", {})
    forced_list = C.plain(C.get(rules, "forced_breadth_steps")) or []
    if isinstance(forced_list, (str, int)) or any(isinstance(s, bool) or not isinstance(s, int) for s in forced_list):
        raise TeamsRLError(f"generate.rules.forced_breadth_steps must be a list of 1-based steps, got {forced_list!r}")
    forced = frozenset(forced_list)
    if forced and C.get(gen, "mode") == "none":
        raise TeamsRLError("generate.mode=none evolves nothing: generate.rules.forced_breadth_steps must be empty, "
                           f"got {sorted(forced)}")
    steps = C.integer({"generate": gen}, "generate.episode_length", minimum=1)
    bad = sorted(s for s in forced if not 1 <= s <= steps)
    if bad:
        raise TeamsRLError(f"generate.rules.forced_breadth_steps {bad} outside 1..{steps}")
    if forced and not opset.breadth_indices:
        raise TeamsRLError(f"generate.rules.forced_breadth_steps needs an in-breadth operator; set "
                           f"'{opset.name}' has none")
    bias = np.zeros(len(opset))
    for name, value in (C.plain(C.get(rules, "op_bias")) or {}).items():
        index = opset.index(str(name))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TeamsRLError(f"generate.rules.op_bias.{name} must be a number, got {value!r}")
        bias[index] += float(value)
    replace = C.get(rules, "replace_breadth_with")
    if replace in (None, ""):
        replace_with = None
    elif str(replace) in ("next", "cycle"):
        if len(opset.breadth_indices) == len(opset):
            raise TeamsRLError(f"generate.rules.replace_breadth_with={replace} needs an in-depth operator; set "
                               f"'{opset.name}' has none")
        replace_with = Rules.NEXT if str(replace) == "next" else Rules.CYCLE
    else:
        replace_with = opset.index(str(replace))
    return Rules(forced, bias, replace_with, tuple(opset.breadth_indices))


@dataclass(frozen=True)
class GenerationSettings:
    """`cfg.generate` as plain values (see conf/generate/default.yaml)."""

    mode: str
    steps: int
    merge_input: bool
    deterministic: bool
    evolve_max_tokens: int | None
    evolve_temperature: float | None
    min_words: int
    answer_system: str | None
    answer_max_tokens: int | None
    answer_temperature: float | None
    schedule: str = "stream"
    on_budget: str = "stop"

    @classmethod
    def from_config(cls, gen) -> GenerationSettings:
        """Checked values of the `generate` node (wrong types and ranges are one line naming the key)."""
        g = {"generate": gen}
        mode = C.choice(g, "generate.mode", MODES, default="teams_rl")
        schedule = C.choice(g, "generate.schedule", SCHEDULES, default="stream")
        on_budget = C.choice(g, "generate.on_budget", ON_BUDGET, default="stop")
        if on_budget == "cap" and schedule != "stream":
            raise TeamsRLError("generate.on_budget=cap needs generate.schedule=stream (seeds start in order as "
                               "the budget allows)")
        steps = C.integer(g, "generate.episode_length", minimum=1)
        if mode == "none":
            steps = 0  # the expert answers the seeds; episode_length does not apply
        return cls(mode=mode, schedule=schedule, steps=steps, on_budget=on_budget,
                   merge_input=C.boolean(g, "generate.merge_input", default=True),
                   deterministic=C.boolean(g, "generate.deterministic", default=True),
                   evolve_max_tokens=C.integer(g, "generate.evolve.max_tokens", minimum=1, optional=True),
                   evolve_temperature=C.number(g, "generate.evolve.temperature", minimum=0.0, optional=True),
                   min_words=C.integer(g, "generate.evolve.min_words", minimum=0, optional=True) or 0,
                   answer_system=C.get(gen, "answer.system") or None,
                   answer_max_tokens=C.integer(g, "generate.answer.max_tokens", minimum=1, optional=True),
                   answer_temperature=C.number(g, "generate.answer.temperature", minimum=0.0, optional=True))


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def stable_int(*parts) -> int:
    """A 31-bit integer that depends only on `parts` (request seeds, per-chain RNG seeds)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------ chains

@dataclass
class Chain:
    """Where one seed's evolution stands: its current instruction (the next step's parent) and next step."""

    seed: Seed
    text: str
    parent_id: str
    last_op: int | None = None
    step: int = 1


def start_text(seed: Seed, merge_input: bool) -> str:
    return f"{seed.instruction}\n{seed.input}" if merge_input and seed.input else seed.instruction


def record_key(seed_id: str, step: int) -> str:
    return f"{seed_id}/{step}"


class Generator:
    """Runs the rollout, answers and judging for all seeds, journaling every result as it arrives.

    `expert` and `reviewer()` are LLM clients (the reviewer is asked for only when rule 1 is on).

    Schedules (`generate.schedule`):
      stream   each seed's chain advances as soon as its own request returns: its next evolution, its answer
               and its judgement go out while other chains are still waiting, at most `max_concurrency` in
               flight per backend, requests on a chain's critical path first;
      barrier  every step of every chain waits for the slowest request of that step (the reference schedule).
    Both give the same records: an operator choice depends only on (seed, step, the chain's own state).

    A request that fails after its retries (and past the stage's failure budget) is never journaled: new
    requests stop, the ones in flight are journaled as they finish, and `run` raises `LLMFailures`."""

    def __init__(self, settings: GenerationSettings, rules: Rules, filters: FilterSettings, agent, opset,
                 seeds: list[Seed], journal: Journal, expert, reviewer: Callable | None = None, base_seed: int = 0,
                 failures: FailureBudget | None = None, heldout_ids: frozenset[str] = frozenset()):
        if settings.mode != "none" and list(agent.operators) != opset.names:
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
        self.seed_turn = {s.id: i for i, s in enumerate(seeds)}  # a seed's position (Rules.CYCLE)
        self.failures = failures
        self.heldout_ids = frozenset(heldout_ids)  # seeds evolved for the non-member set: their own purposes
        self._judge = None
        self._sched: Scheduler | None = None
        self._pending: set[tuple[str, str]] = set()
        self._failed: list[Completion] = []
        self._budget_stop: str | None = None
        self._bar = None
        self._budget_role = "expert"      # whose budget stopped the run
        self.cap = self._budget_cap(settings, expert)
        self._pending_by_seed: Counter = Counter()

    @staticmethod
    def _budget_cap(settings: GenerationSettings, expert):
        """`generate.on_budget=cap`: the expert role's `max_queries` bounds the data (None: no cap)."""
        if settings.on_budget != "cap":
            return None
        from teams_rl.evol.budget_cap import BudgetCap, per_seed_max

        budget = getattr(expert, "budget", None)
        if budget is None or budget.max_queries is None:
            raise TeamsRLError("generate.on_budget=cap needs expert.budget.max_queries (the expert queries the "
                               "data may cost)")
        return BudgetCap(int(budget.max_queries), per_seed_max(settings.mode, settings.steps))

    @property
    def capped(self) -> bool:
        """True when the expert budget ended the data before every seed was generated."""
        return self.cap is not None and self._budget_stop is not None and self._budget_role == "expert"

    # -- policy ------------------------------------------------------------------------------------
    def choose_op(self, chain: Chain, step: int) -> int:
        """The operator of `chain` at 1-based `step`: the agent's scores for this chain alone + the rules, so the
        choice depends only on (seed, step, the chain's state), never on which other chains are in flight."""
        obs = self.agent.obs_encoder.encode([chain.text], [chain.last_op], [step - 1])
        if self.s.deterministic and self.agent.algorithm != "random":  # a random agent always samples
            scores = self.agent.action_scores(obs, step - 1, deterministic=True)[0]
        else:
            rng = np.random.default_rng(stable_int(self.base_seed, chain.seed.id, step))
            scores = self.agent.action_scores(obs, step - 1, deterministic=False, rng=rng)[0]
        return self.rules.choose(scores, step, self.seed_turn.get(chain.seed.id, 0))

    # -- requests ----------------------------------------------------------------------------------
    def _evolve_request(self, chain: Chain, step: int) -> tuple[ChatRequest, int]:
        op = self.choose_op(chain, step)
        return evolve_request(self.opset, op, chain.text, stable_int(self.base_seed, chain.seed.id, step, "evolve"),
                              self.purpose("evolve", chain.seed.id), max_tokens=self.s.evolve_max_tokens, temperature=self.s.evolve_temperature), op

    def _answer_request(self, evolved: dict) -> ChatRequest:
        return ChatRequest.chat(self.prompt_of(evolved), system=self.s.answer_system,
                                max_tokens=self.s.answer_max_tokens, temperature=self.s.answer_temperature,
                                purpose=self.purpose("answer", evolved["seed_id"]), seed=stable_int(self.base_seed, evolved["seed_id"], evolved["step"],
                                                                  "answer"))

    def _judge_request(self, evolved: dict) -> ChatRequest:
        judge = self._get_judge()
        return ChatRequest.chat(judge.render(evolved["parent"], evolved["instruction"]), max_tokens=judge.max_tokens,
                                purpose=self.purpose("judge", evolved["seed_id"]),
                                seed=stable_int(self.base_seed, evolved["seed_id"], evolved["step"], "judge"))

    def purpose(self, kind: str, seed_id: str) -> str:
        """The accounting purpose of a request: `heldout_<kind>` for the extra non-member seeds."""
        return f"heldout_{kind}" if seed_id in self.heldout_ids else kind

    def _get_judge(self):
        from teams_rl.evol.rewards import Judge

        if self._judge is None:
            self._judge = Judge(None, prompt=self.filters.judge_prompt, strict=self.filters.judge_strict,
                                max_tokens=self.filters.judge_max_tokens)
        return self._judge

    def _submit(self, kind: str, key: str, request: ChatRequest, priority: float, extra: dict | None = None) -> None:
        if (kind, key) in self._pending or self._failed or self._budget_stop:
            return
        if kind == "judge":
            if self._reviewer is None:
                raise TeamsRLError("generate: elimination rule 1 needs a reviewer LLM")
            client = self._reviewer()
        else:
            client = self.expert
        seed_id = key.rsplit("/", 1)[0]
        if kind != "judge" and self.cap is not None and not self.cap.charge(seed_id):
            self._budget_stop = self.cap.refused  # the refused request is not sent, and nothing after it
            return
        self._pending.add((kind, key))
        self._pending_by_seed[seed_id] += 1
        self._sched.submit(client, request, tag=(kind, key, extra), priority=priority)

    def _priority(self, kind: str, step: int) -> float:
        """Lower goes first: the more requests still wait behind this one on its chain, the more urgent."""
        if self.mode == "none":
            return 0.0
        if self.mode == "teams_rl":
            return -(self.steps - step + 1) if kind == "evolve" else 0.0
        per_step = 3 if self.filters.no_info_gain else 2
        left = {"evolve": per_step, "answer": per_step - 1, "judge": 1}[kind]
        return -(per_step * (self.steps - step) + left)

    # -- results -> journal ------------------------------------------------------------------------
    def _record(self, kind: str, key: str, completion: Completion, extra: dict | None) -> dict:
        if kind == "evolve":
            rewrite = to_rewrite(completion, self.s.min_words, self.opset[extra["op_index"]].template, extra["parent"])
            return {"kind": "evolve", "key": key, **extra, "instruction": rewrite.text, "raw": rewrite.raw,
                    "cleaning": list(rewrite.cleaning), "rejected_as": rewrite.rejected_as,
                    "error": None, "cached": completion.cached, "truncated": completion.truncated}
        if kind == "answer":
            return {"kind": "answer", "key": key, "output": completion.text.strip(), "error": None,
                    "cached": completion.cached, "truncated": completion.truncated}
        from teams_rl.evol.rewards import parse_judgement

        verdict = parse_judgement(completion.text, self._get_judge().strict)
        return {"kind": "judge", "key": key, "not_equal": bool(verdict), "queried": True, "reply": completion.text,
                "error": None, "cached": completion.cached}

    def _unqueried_judge(self, key: str) -> None:
        """An evolution that did not change the text is "Equal" without asking the reviewer."""
        self.journal.append([{"kind": "judge", "key": key, "not_equal": False, "queried": False, "reply": None,
                              "error": None, "cached": False}])

    def _collect(self) -> list[dict]:
        """Wait for finished requests; journal the successes (one fsync for all of them) and return them."""
        rows = []
        for (kind, key, extra), completion in self._sched.wait():
            self._pending.discard((kind, key))
            self._pending_by_seed[key.rsplit("/", 1)[0]] -= 1
            if completion.error_kind == "budget":
                self._budget_stop = completion.error
                self._budget_role = "reviewer" if kind == "judge" else "expert"
            elif not completion.ok:
                self._failed.append(completion)
            else:
                rows.append(self._record(kind, key, completion, extra))
        self.journal.append(rows)
        if self._bar is not None:
            self._bar.update(sum(1 for r in rows if r["kind"] == "evolve"))
        return rows

    # -- chains ------------------------------------------------------------------------------------
    def _apply(self, chain: Chain, key: str, evolved: dict) -> None:
        chain.last_op = evolved["op_index"]
        accepted = self.drop_reason(key) is None if self.mode == "wizardlm" else evolved["instruction"] is not None
        if accepted:
            chain.text, chain.parent_id = evolved["instruction"], key
        chain.step += 1

    def _needs_judge(self, key: str, evolved: dict) -> bool:
        """Rule 1 on: True when the reviewer must be asked (and asks), False when the verdict is known."""
        if not self.filters.no_info_gain or self.journal.get("judge", key) is not None:
            return False
        if _norm(evolved["instruction"]) == _norm(evolved["parent"]):
            self._unqueried_judge(key)
            return False
        self._submit("judge", key, self._judge_request(evolved), self._priority("judge", evolved["step"]))
        return True

    def _submit_evolve(self, chain: Chain) -> None:
        step = chain.step
        key = record_key(chain.seed.id, step)
        if ("evolve", key) in self._pending:
            return
        request, op = self._evolve_request(chain, step)
        extra = {"seed_id": chain.seed.id, "step": step, "op_index": op, "operator": self.opset.names[op],
                 "parent_id": chain.parent_id, "parent": chain.text}
        self._submit("evolve", key, request, self._priority("evolve", step), extra)

    def _advance(self, chain: Chain, last_phase: int | None = None) -> None:
        """Send what `chain` needs next, replaying whatever the journal already holds. `last_phase` (barrier
        schedule) holds back requests of later phases."""
        if self.mode == "none":
            self._advance_none(chain)
        elif self.mode == "wizardlm":
            self._advance_wizardlm(chain, last_phase)
        else:
            self._advance_teams(chain, last_phase)

    def _advance_none(self, chain: Chain) -> None:
        """No evolution: the seed itself is the instruction, answered once (record key `<seed>/0`)."""
        key = record_key(chain.seed.id, 0)
        if self.journal.get("answer", key) is None:
            self._submit("answer", key, self._answer_request(self.seed_record(chain.seed)), self._priority("answer", 0))

    def seed_record(self, seed: Seed) -> dict:
        """A seed as the step-0 "evolution" of mode none (what `prompt_of` and the records read)."""
        return {"seed_id": seed.id, "step": 0, "instruction": start_text(seed, self.merge_input)}

    def _advance_teams(self, chain: Chain, last_phase: int | None) -> None:
        while chain.step <= self.steps:
            key = record_key(chain.seed.id, chain.step)
            evolved = self.journal.get("evolve", key)
            if evolved is None:
                if last_phase is None or chain.step <= last_phase:
                    self._submit_evolve(chain)
                break
            self._apply(chain, key, evolved)
        if last_phase is not None and last_phase <= self.steps:
            return  # barrier: the answers go out after every step of every chain
        for step in range(1, chain.step):
            key = record_key(chain.seed.id, step)
            evolved = self.journal.get("evolve", key)
            if evolved["instruction"] is None:
                continue
            if self.journal.get("answer", key) is None:
                self._submit("answer", key, self._answer_request(evolved), self._priority("answer", step))
            elif last_phase is None or last_phase > self.steps + 1:
                self._needs_judge(key, evolved)

    def _advance_wizardlm(self, chain: Chain, last_phase: int | None) -> None:
        while chain.step <= self.steps:
            step, key = chain.step, record_key(chain.seed.id, chain.step)
            allowed = 3 * step if last_phase is None else last_phase  # phases: 3s-2 evolve, 3s-1 answer, 3s judge
            evolved = self.journal.get("evolve", key)
            if evolved is None:
                if allowed >= 3 * step - 2:
                    self._submit_evolve(chain)
                return
            if evolved["instruction"] is not None:
                if self.journal.get("answer", key) is None:
                    if allowed >= 3 * step - 1:
                        self._submit("answer", key, self._answer_request(evolved), self._priority("answer", step))
                    return
                if self.filters.no_info_gain and self.journal.get("judge", key) is None:
                    if allowed >= 3 * step and self._needs_judge(key, evolved):
                        return
                    if self.journal.get("judge", key) is None:
                        return
            self._apply(chain, key, evolved)

    # -- driver ------------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> None:
        """Generate every seed's chain (resuming from the journal); raises on failures or a budget stop."""
        from tqdm.auto import tqdm

        chains = {s.id: Chain(s, start_text(s, self.merge_input), s.id) for s in self.seeds}
        self._sched = Scheduler()
        kind = "answer" if self.mode == "none" else "evolve"
        self._bar = tqdm(total=len(chains) * max(self.steps, 1), initial=self.journal.count(kind),
                         desc=f"generate ({self.mode}, {self.s.schedule})", unit=kind, disable=not progress)
        try:
            if self.cap is not None:
                self._run_capped(chains)
            elif self.s.schedule == "barrier":
                self._run_barrier(chains)
            else:
                self._run_stream(chains)
        finally:
            self._bar.close()
            self._bar = None
        self._raise_if_stopped(chains)

    def _run_stream(self, chains: dict[str, Chain]) -> None:
        for chain in chains.values():
            self._advance(chain)
        while self._sched.busy:
            for row in self._collect():
                self._advance(chains[row["key"].rsplit("/", 1)[0]])

    def _run_capped(self, chains: dict[str, Chain]) -> None:
        """The stream schedule, with seeds started in order while the expert budget holds them (`BudgetCap`)."""
        self.cap.count_journal(self.journal)
        order = list(chains.values())
        nxt = 0

        def settle(chain: Chain) -> None:
            if chain.seed.id in self.cap.running and not self._pending_by_seed[chain.seed.id]:
                self.cap.finish(chain.seed.id)  # nothing in flight and nothing left to send

        while True:
            while nxt < len(order) and not (self._failed or self._budget_stop):
                if not self.cap.fits_next() and self.cap.running:
                    break  # wait until a running seed's real cost is known
                if self.cap.exhausted():  # seeds are left but not one more request fits
                    self.cap.charge(order[nxt].seed.id)
                    self._budget_stop = self.cap.refused
                    break
                chain = order[nxt]
                nxt += 1
                self.cap.start(chain.seed.id)
                self._advance(chain)
                settle(chain)
            if not self._sched.busy:
                return
            for row in self._collect():
                chain = chains[row["key"].rsplit("/", 1)[0]]
                self._advance(chain)
                settle(chain)

    def _run_barrier(self, chains: dict[str, Chain]) -> None:
        # phases: teams_rl = steps, answers, judges; wizardlm = evolve, answer, judge per round; none = answers
        phases = {"teams_rl": self.steps + 2, "wizardlm": 3 * self.steps, "none": 1}[self.mode]
        for phase in range(1, phases + 1):
            for chain in chains.values():
                self._advance(chain, last_phase=phase)
            while self._sched.busy:  # the barrier: every request of this phase, before any of the next
                self._collect()
            if self._failed or self._budget_stop:
                return

    def _raise_if_stopped(self, chains: dict[str, Chain]) -> None:
        if not (self._failed or self._budget_stop) or (self.capped and not self._failed):
            return  # done, or the expert budget ended the data (generate.on_budget=cap)
        unfinished = sum(1 for c in chains.values() if c.step <= self.steps)
        kept = f"{len(self.journal)} results journaled, {unfinished} of {len(chains)} chains unfinished"
        if self._failed:
            failures = self.failures or FailureBudget("generate")
            if not failures.total_failed:  # no budget was attached: book what came back
                for completion in self._failed:
                    failures.record("expert", self.expert.where, completion)
            raise failures.error(kept=kept)
        raise BudgetExceeded(f"{self._budget_stop} ({kept})")

    def prompt_of(self, evolved: dict) -> str:
        seed_input = "" if self.merge_input else self.seed_by_id[evolved["seed_id"]].input
        return f"{evolved['instruction']}\n\n{seed_input}" if seed_input else evolved["instruction"]

    # -- state -------------------------------------------------------------------------------------
    def drop_reason(self, key: str) -> str | None:
        """Why the evolution `key` is not a dataset record (None = not so far): an unusable rewrite, rule 1
        when enabled, and in wizardlm mode the round's other elimination rules (2-4). The remaining filters
        (Alpaca, duplicates) run afterwards in `apply_filters`."""
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

    # -- results -----------------------------------------------------------------------------------
    def _unfinished(self, key: str) -> bool:
        """A usable evolution whose answer (or judgement) was never sent: the expert budget ended first."""
        if self.journal.get("answer", key) is None:
            return True
        return self.filters.no_info_gain and self.journal.get("judge", key) is None

    def records(self) -> list[dict]:
        """Every evolution in seed and step order, with lineage, answer and (if already known) drop reason.
        Under a budget cap, an evolution that was never sent is no record, and one whose answer or judgement
        was never sent is dropped as `budget_capped`."""
        if self.mode == "none":
            return self._seed_records()
        out = []
        for seed in self.seeds:
            for step in range(1, self.steps + 1):
                key = record_key(seed.id, step)
                evolved = self.journal.get("evolve", key)
                if evolved is None and self.cap is not None:
                    continue
                answer = self.journal.get("answer", key) or {}
                rec = {
                    "id": key, "seed_id": seed.id, "step": step, "operator": evolved["operator"],
                    "parent_id": evolved["parent_id"], "parent_instruction": evolved["parent"],
                    "instruction": evolved["instruction"] or "",
                    "input": "" if self.merge_input else seed.input,
                    "output": answer.get("output") or "",
                }
                capped = self.cap is not None and evolved["instruction"] is not None and self._unfinished(key)
                reason = BUDGET_CAPPED if capped else self.drop_reason(key)
                if reason:
                    rec["drop_reason"] = reason
                out.append(rec)
        return out

    def _seed_records(self) -> list[dict]:
        """Mode none: one record per answered seed (a seed whose answer was never sent is no record)."""
        out = []
        for seed in self.seeds:
            key = record_key(seed.id, 0)
            answer = self.journal.get("answer", key)
            if answer is None and self.cap is not None:
                continue
            out.append({"id": key, "seed_id": seed.id, "step": 0, "operator": "none", "parent_id": seed.id,
                        "parent_instruction": "", "instruction": start_text(seed, self.merge_input),
                        "input": "" if self.merge_input else seed.input,
                        "output": (answer or {}).get("output") or "",
                        **({} if answer is not None else {"drop_reason": ANSWER_FAILED})})
        return out

    def budget_metrics(self) -> dict:
        """Under a cap: the budget, whether it ended the data, how many seeds were started out of how many."""
        if self.cap is None:
            return {}
        return {"budget_capped": self.capped, "budget/max_expert_queries": self.cap.max_queries,
                "budget/expert_queries": self.cap.spent, "seeds_configured": len(self.seeds)}

    def seeds_started(self) -> int:
        """Seeds whose generation began (all of them without a budget cap)."""
        return len(self.seeds) if self.cap is None else len(self.cap.started)

    def calls(self) -> dict[str, int]:
        """LLM requests by role/purpose as journaled: `calls/...` needed, `sent/...` not served by the cache,
        `truncated/<purpose>` answers cut off at max_tokens."""
        out: Counter = Counter()
        for kind, role in (("evolve", "expert"), ("answer", "expert"), ("judge", "reviewer")):
            for rec in self.journal.records(kind):
                if kind == "judge" and not rec["queried"]:
                    continue
                purpose = self.purpose(kind, rec["key"].rsplit("/", 1)[0])
                out[f"calls/{role}/{purpose}"] += 1
                if not rec.get("cached"):
                    out[f"sent/{role}/{purpose}"] += 1
                if rec.get("truncated"):  # cut off at max_tokens: kept, and counted
                    out[f"truncated/{purpose}"] += 1
        return dict(out)

    def cleaning(self) -> dict:
        """What `clean_rewrite` did to the journaled rewrites: `n` evolutions, `by_kind` replies that needed each
        kind of cleaning (`teams_rl.evol.cleaning.KINDS`; a reply counts once per kind), `rejected` unusable
        replies by reason, and the same per operator in `by_operator`."""
        def empty() -> dict:
            return {"n": 0, "by_kind": dict.fromkeys(CLEANING_KINDS, 0), "rejected": dict.fromkeys(REJECTIONS, 0)}

        total, per_op = empty(), {name: empty() for name in self.opset.names}
        for rec in self.journal.records("evolve"):
            for group in (total, per_op[rec["operator"]]):
                group["n"] += 1
                for kind in rec.get("cleaning") or ():
                    group["by_kind"][kind] += 1
                if rec.get("rejected_as"):
                    group["rejected"][rec["rejected_as"]] += 1
        return {**total, "by_operator": {name: c for name, c in per_op.items() if c["n"]}}


def cleaning_metrics(cleaning: dict) -> dict[str, int]:
    """Flat counts of `Generator.cleaning()`: `cleaning/<kind>` and `cleaning/rejected/<reason>` (of `cleaning/n`)."""
    return {"cleaning/n": cleaning["n"], **{f"cleaning/{k}": v for k, v in cleaning["by_kind"].items()},
            **{f"cleaning/rejected/{k}": v for k, v in cleaning["rejected"].items()}}


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
