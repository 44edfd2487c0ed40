"""LoRA fine-tuning through `peft`: settings, wrapping the model, and how the result is saved and loaded.

`finetune.lora.enabled=true` trains low-rank adapters (rank `r`, scale `alpha / r`, `dropout`) on
`target_modules` instead of every weight. `save: merged` (default) folds the adapters into the base weights and
saves an ordinary checkpoint, which every later stage loads as any model; `save: adapter` saves only the adapter
(`adapter_config.json` + `adapter_model.safetensors`, a few MB): evaluate and privacy then load the base model
named in the adapter config and apply it (`teams_rl.models.load_causal_lm`, lm-eval's `peft=` model argument).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from teams_rl import config as C
from teams_rl.errors import TeamsRLError

SAVE_MODES = ("merged", "adapter")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    save: str = "merged"

    @classmethod
    def from_config(cls, finetune_cfg) -> LoraSettings | None:
        """`finetune.lora` checked (None when disabled or absent)."""
        node = {"finetune": finetune_cfg}
        if C.get(finetune_cfg, "lora") is None or not C.boolean(node, "finetune.lora.enabled", default=False):
            return None
        modules = C.string_list(node, "finetune.lora.target_modules", optional=True) or list(cls.target_modules)
        return cls(r=C.integer(node, "finetune.lora.r", minimum=1),
                   alpha=C.integer(node, "finetune.lora.alpha", minimum=1),
                   dropout=C.number(node, "finetune.lora.dropout", minimum=0.0, below=1.0),
                   target_modules=tuple(modules),
                   save=C.choice(node, "finetune.lora.save", SAVE_MODES, default="merged"))

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}


def wrap(model, settings: LoraSettings):
    """The model with trainable LoRA adapters (everything else frozen); a module name that matches nothing is
    an error naming the model's linear layers."""
    from peft import LoraConfig, get_peft_model

    linear = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                     if type(mod).__name__ == "Linear"})
    missing = [m for m in settings.target_modules if m not in linear]
    if missing:
        raise TeamsRLError(f"finetune.lora.target_modules {missing} are not layers of this model "
                           f"(its linear layers: {', '.join(linear)})")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_final(model, tokenizer, folder: Path, settings: LoraSettings) -> None:
    """Write the fine-tuned result into `folder`: merged weights (an ordinary checkpoint) or the adapter only."""
    if settings.save == "merged":
        merged = model.merge_and_unload()
        merged.save_pretrained(str(folder))
    else:
        model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
