"""The `offline` task set: lm-eval task YAMLs over small JSONL files written for teams_rl in the schemas
of ARC, HellaSwag, MMLU and TruthfulQA (mc2). Prompts, splits and metrics mirror the upstream lm-eval
tasks; only the data source differs. Usable from the lm-eval CLI too:
`lm_eval --model hf --model_args pretrained=PATH --include_path teams_rl/eval/tasks --tasks offline_arc_challenge`.
"""
