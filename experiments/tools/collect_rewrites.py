"""Regenerate tests/fixtures/smollm2_rewrites.jsonl: real SmolLM2-135M-Instruct rewrites for `clean_rewrite`.

Sends exactly the first-step requests the default generate stage would send to the expert with the paper's
wording and 48-token rewrites (FIXTURE_SETTINGS: `operators=teams_rl`, the templates whose preambles and
markers the cleaning learns from; the default's own short set is `teams_rl_short`): every operator applied to each of the first N tiny seeds (input merged as with `generate.merge_input`),
`generate.evolve.max_tokens` tokens, the expert role's sampling (temperature, top_p) and the per-request seed
the engine derives from (cfg.seed, seed id, step 1). The LLM request cache is not used. Takes a few minutes
on 2 CPU cores (N=12: 72 requests). The hand-written WizardLM-style replies at the end of the fixture are kept
as they are (they are not model output; `source` says so).

    python experiments/tools/collect_rewrites.py [--seeds 12] [--out tests/fixtures/smollm2_rewrites.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_OUT = ROOT / "tests" / "fixtures" / "smollm2_rewrites.jsonl"
MODEL_SOURCE = "smollm2"


FIXTURE_SETTINGS = ("operators=teams_rl", "generate.evolve.max_tokens=48")  # the requests the fixture holds


def compose(seeds: int):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from teams_rl.config_groups import register_role_groups

    register_role_groups()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config",
                             overrides=["logger=none", f"seeds.limit={seeds}", *FIXTURE_SETTINGS])


def collect(seeds: int) -> list[dict]:
    from teams_rl.evol.evolution import evolve_request
    from teams_rl.evol.generation import GenerationSettings, record_key, stable_int, start_text
    from teams_rl.evol.operators import load_operator_set
    from teams_rl.evol.seeds import load_seeds
    from teams_rl.llm.factory import LLMPool

    cfg = compose(seeds)
    settings = GenerationSettings.from_config(cfg.generate)
    opset = load_operator_set(cfg.operators)
    pool = LLMPool(cfg, cache_path=None)  # no request cache: every reply is generated now
    expert = pool.client("expert")
    rows, requests = [], []
    step = 1
    for seed in load_seeds(cfg.seeds):
        text = start_text(seed, settings.merge_input)
        for op, name in enumerate(opset.names):
            # the engine's request for (seed, step 1) when the policy picks `op`
            requests.append(evolve_request(opset, op, text, stable_int(int(cfg.seed), seed.id, step, "evolve"),
                                           max_tokens=settings.evolve_max_tokens,
                                           temperature=settings.evolve_temperature))
            rows.append({"source": MODEL_SOURCE, "key": record_key(seed.id, step), "operator": name,
                         "kind": opset[op].kind, "instruction": text})
    start = time.perf_counter()
    completions = expert.complete(requests)
    took = time.perf_counter() - start
    sampling = {k: expert.sampling.get(k) for k in ("temperature", "top_p")}
    for row, request, completion in zip(rows, requests, completions, strict=True):
        if not completion.ok:
            raise SystemExit(f"error: request {row['key']} {row['operator']} failed: {completion.error}")
        row.update(prompt=request.messages[-1][1], reply=completion.text, seed=request.seed,
                   max_tokens=request.max_tokens, **sampling, truncated=completion.truncated)
    pool.close()
    print(f"{len(rows)} replies from {expert.model_id} in {took:.0f} s", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    kept = []  # hand-written rows survive a regeneration
    if args.out.exists():
        kept = [r for r in (json.loads(line) for line in args.out.read_text().splitlines() if line.strip())
                if r.get("source") != MODEL_SOURCE]
    rows = collect(args.seeds) + kept
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {args.out} ({len(rows) - len(kept)} model replies, {len(kept)} hand-written)", file=sys.stderr)


if __name__ == "__main__":
    main()
