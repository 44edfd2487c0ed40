"""Supervised fine-tuning (the paper's single SFT step): Alpaca data, DeepSpeed configs, HF Trainer, launching.

- `data`: Alpaca template, tokenisation with prompt masking, length-grouped / packed / padded batching.
- `deepspeed_config`: `conf/deepspeed/*` rendered to the dict `TrainingArguments(deepspeed=...)` takes.
- `train`: one training job (in this process, or in each rank of a launched job).
- `callbacks`: the Trainer callback that logs loss, lr and tokens/s (rank 0) and times the training loop.
- `launch`: `torchrun` / `deepspeed --no_local_rank` / `srun` relaunch of a job, and the rank entry point.
"""
