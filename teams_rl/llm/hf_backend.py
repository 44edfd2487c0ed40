"""Local transformers backend: batched, left-padded `generate` with per-request seeded sampling.

Each request is sampled from its own `torch.Generator` (seeded by the request's seed) inside a logits
processor, so a seeded request gives the same text whatever else is in its batch, and greedy requests
(temperature 0/None) give the same text batched or alone.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from teams_rl.errors import TeamsRLError
from teams_rl.llm.types import ChatRequest, Completion

log = logging.getLogger(__name__)

HALF_DTYPES = ("bfloat16", "float16", "half")
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
DEFAULT_MAX_TOKENS = 256
# A batch whose rows share at least this many leading tokens prefills them once (`shared_prefix`); SmolLM2's
# chat template alone gives ~24 (its default system prompt), the short operator prompts ~30 of ~80 tokens.
SHARED_PREFIX_MIN_TOKENS = 8


@dataclass
class _Row:
    """One request prepared for generation."""

    index: int
    ids: list[int]
    max_new: int
    temperature: float  # 0.0 means greedy
    top_p: float
    seed: int


class SeededSampler:
    """Picks each row's next token with the row's own generator (seeded by its request), so a seeded request
    gives the same text whatever else is in its batch; rows with temperature 0 are greedy.

    Sampling is by inverse CDF (one uniform draw per row and step). Top-p takes the nucleus from a `topk`
    that grows until it holds `top_p` of the mass, as a full sort of a 50k vocabulary at every step is slow on
    a CPU. As a logits processor (`__call__`) it returns logits that make the chosen token the argmax, so HF
    `generate` runs greedy; the ragged decode loop calls `pick` directly."""

    FIRST_K = 64

    def __init__(self, rows: list[_Row], device):
        import torch

        self.device = device
        self.temperature = [r.temperature for r in rows]
        self.top_p = [r.top_p for r in rows]
        self.generators = [torch.Generator(device=device).manual_seed(r.seed) if r.temperature > 0 else None
                           for r in rows]

    def pick(self, logits, rows) -> list[int]:
        """The next token of each of `rows` (original row indices) from its logits row (same order)."""
        import torch

        out = []
        for j, i in enumerate(rows):
            gen = self.generators[i]
            if gen is None:
                out.append(int(logits[j].argmax()))
                continue
            probs = torch.softmax(logits[j].float() / self.temperature[i], dim=-1)
            u = torch.rand((1,), generator=gen, device=self.device)
            if self.top_p[i] < 1.0:
                k = min(self.FIRST_K, probs.numel())
                while True:
                    top, order = probs.topk(k)
                    if k == probs.numel() or float(top.sum()) >= self.top_p[i]:
                        break
                    k = min(4 * k, probs.numel())
                cdf = top.cumsum(-1)
                cdf = cdf[: int((cdf - top < self.top_p[i]).sum())]
                pos = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=cdf.numel() - 1)
                out.append(int(order[pos[0]]))
            else:  # no top-p: the unsorted CDF will do
                cdf = probs.cumsum(-1)
                out.append(int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=probs.numel() - 1)[0]))
        return out

    def __call__(self, input_ids, scores):
        rows = [i for i, g in enumerate(self.generators) if g is not None]
        if not rows:
            return scores
        tokens = self.pick(scores[rows], rows)
        scores[rows] = float("-inf")
        scores[rows, tokens] = 0.0
        return scores


def split_generation(new_ids: list[int], stop_ids: set[int], max_new: int) -> tuple[list[int], int, str]:
    """(kept token ids, completion token count, finish reason) for one generated row: cut at the first stop
    token (counted, not kept) or at `max_new` tokens."""
    for pos, tok in enumerate(new_ids[:max_new]):
        if tok in stop_ids:
            return new_ids[:pos], pos + 1, "stop"
    kept = new_ids[:max_new]
    return kept, len(kept), "length"


def _is_oom(err: BaseException) -> bool:
    import torch

    message = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in message or "can't allocate" in message


class HFBackend:
    """A transformers causal LM answering chat requests: `tiny_llama`, `smollm2`, a checkpoint folder, a
    `.gguf` file or a hub id (loaded on the first `complete`).

    `generate_kwargs` are extra `GenerationConfig` fields (e.g. `repetition_penalty`); they are part of
    `model_id`, so cached answers never mix settings, and so are the prompt format (`chat_format`, see
    `teams_rl.llm.chat_format`; the tokenizer's own template adds nothing) and a dtype other than float32
    (`dtype: auto` is resolved here: the fast one of this machine, `teams_rl.fast_dtype`)."""

    def __init__(self, model: str, cache_dir: str | None = None, dtype: str = "float32", device: str = "auto",
                 batch_size: int = 8, max_input_tokens: int | None = None, generate_kwargs: dict | None = None,
                 show_progress: bool = True, empty_retries: int = 2, prefix_cache: int = 0,
                 prefix_min_tokens: int = 32, shared_prefix: bool = True, chat_format: str = "auto",
                 chunk_step_tokens: float | None = None, **_):
        from teams_rl.fast_dtype import check_dtype
        from teams_rl.llm.chat_format import check_chat_format

        if int(batch_size) < 1:
            raise TeamsRLError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = str(model)
        self.cache_dir = cache_dir
        self.dtype = check_dtype(dtype, "backend.dtype")
        self.device = device
        self.chat_format = check_chat_format(chat_format)
        self._template: str | None = None  # the chat template to render with (None: the tokenizer's), at load
        self.batch_size = int(batch_size)
        self.max_input_tokens = max_input_tokens
        self.generate_kwargs = dict(generate_kwargs or {})
        self.show_progress = show_progress
        self.empty_retries = int(empty_retries)
        self.shared_prefix = bool(shared_prefix)
        self.shared_prefill_saved = 0  # prompt tokens not prefilled again thanks to `shared_prefix`
        if chunk_step_tokens is not None and float(chunk_step_tokens) < 0:
            raise TeamsRLError(f"chunk_step_tokens must be >= 0 or null, got {chunk_step_tokens}")
        # one decode step's cost in prompt tokens of prefill: batches are split where padding costs more
        # (teams_rl.llm.chunks); None: chunks of batch_size
        self.chunk_step_tokens = None if chunk_step_tokens is None else float(chunk_step_tokens)
        self.chunks_run = 0
        self.prefix = None
        if int(prefix_cache) > 0:
            from teams_rl.llm.prefix_cache import PrefixCache

            self.prefix = PrefixCache(max_entries=int(prefix_cache), min_tokens=int(prefix_min_tokens))
        self.model = None
        self.tokenizer = None
        self._stop_ids: set[int] = set()
        self._check_source()
        self.device_used, self.dtype_used = self._resolve_device_dtype()
        self.model_id = f"hf/{self.model_name}" + self._settings_suffix()

    def _settings_suffix(self) -> str:
        from teams_rl.llm.chat_format import format_id

        settings = dict(self.generate_kwargs)
        if format_id(self.chat_format):
            settings["chat_format"] = format_id(self.chat_format)
        if self.dtype_used != "float32":
            settings["dtype"] = self.dtype_used
        suffix = ",".join(f"{k}={v}" for k, v in sorted(settings.items()))
        return f"?{suffix}" if suffix else ""

    def describe(self) -> str:
        return f"{self.model_id} (local transformers, {self.device_used}, {self.dtype_used})"

    # -- loading -------------------------------------------------------------------------------------
    def _gguf_path(self) -> Path | None:
        return Path(self.model_name).expanduser() if self.model_name.endswith(".gguf") else None

    def _check_source(self) -> None:
        """Fail at construction, in one line, for a missing path or (offline) a hub id that is not cached."""
        from teams_rl.models import BUILTIN, resolve_model

        gguf = self._gguf_path()
        if gguf is not None:
            if not gguf.is_file():
                raise TeamsRLError(f"GGUF file {gguf} does not exist")
        elif self.model_name not in BUILTIN:
            resolve_model(self.model_name, self.cache_dir)

    def _resolve_device_dtype(self) -> tuple[str, str]:
        """(device, dtype) to load on; `auto` takes the dtype measured fastest here (once per machine)."""
        from teams_rl.fast_dtype import resolve_dtype
        from teams_rl.models import pick_device

        device = pick_device(self.device)
        return device, resolve_dtype(self.dtype, device, self.cache_dir, "backend.dtype")

    def _load(self) -> None:
        if self.model is not None:
            return
        import torch

        from teams_rl.models import load_causal_lm

        device, dtype = self.device_used, self.dtype_used
        start = time.perf_counter()
        gguf = self._gguf_path()
        if gguf is not None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=getattr(torch, dtype))
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            model.to(device).eval()
        else:
            model, tok = load_causal_lm(self.model_name, dtype=dtype, device=device, cache_dir=self.cache_dir)
        tok.padding_side = "left"
        from teams_rl.llm.chat_format import resolve_template

        self._template = resolve_template(self.chat_format, tok)  # fails here if `tokenizer` and it has none
        self.model, self.tokenizer = model, tok
        self._stop_ids = self._find_stop_ids()
        # Drop the checkpoint's sampling defaults (e.g. a repetition penalty): an answer depends only on the
        # request and `generate_kwargs`, which is what the request cache assumes.
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig(bos_token_id=model.generation_config.bos_token_id,
                                                   eos_token_id=sorted(self._stop_ids),
                                                   pad_token_id=tok.pad_token_id)
        log.info("loaded %s on %s (%s) in %.1f s", self.model_id, device, dtype, time.perf_counter() - start)

    def _find_stop_ids(self) -> set[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        configured = self.model.generation_config.eos_token_id
        if configured is not None:
            ids.update(configured if isinstance(configured, list) else [configured])
        vocab = tok.get_vocab()
        ids.update(vocab[t] for t in CHAT_END_TOKENS if t in vocab)
        if not ids:
            raise TeamsRLError(f"{self.model_name}: the tokenizer has no EOS token to stop generation at")
        return ids

    @property
    def input_limit(self) -> int:
        if self.max_input_tokens:
            return int(self.max_input_tokens)
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 4096)

    def close(self) -> None:
        """Free the model (and its GPU memory); the next `complete` loads it again."""
        if self.prefix is not None:
            self.prefix.clear()
        if self.model is None:
            return
        self.model = self.tokenizer = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- generation ----------------------------------------------------------------------------------
    def _prompt_ids(self, request: ChatRequest) -> list[int]:
        from teams_rl.llm.chat_format import prompt_ids

        return prompt_ids(self.tokenizer, request.message_dicts(), self._template)

    def _row(self, index: int, request: ChatRequest) -> _Row:
        import torch

        temperature = float(request.temperature or 0.0)
        seed = request.seed if request.seed is not None else int(torch.randint(2**62, ()).item())
        return _Row(index=index, ids=self._prompt_ids(request),
                    max_new=int(request.max_tokens or DEFAULT_MAX_TOKENS),
                    temperature=temperature,
                    top_p=float(request.top_p) if request.top_p is not None else 1.0,
                    seed=int(seed))

    def complete(self, requests: list[ChatRequest]) -> list[Completion]:
        """Answer `requests` in order. Requests are sorted by (max_tokens, prompt length) and generated in
        chunks of at most `batch_size` (cut where padding would cost more than a chunk's decode steps, see
        `chunk_step_tokens`); a failing chunk is retried at half size down to single requests, and a
        request that still fails comes back with `error` set."""
        if not requests:
            return []
        self._load()
        results: list[Completion | None] = [None] * len(requests)
        rows = []
        for i, request in enumerate(requests):
            try:
                row = self._row(i, request)
            except Exception as err:  # e.g. a chat template rejecting the message roles
                results[i] = Completion.failed("error", f"{type(err).__name__}: {err}")
                continue
            if len(row.ids) > self.input_limit:
                results[i] = Completion.failed("prompt_too_long", f"prompt has {len(row.ids)} tokens, more than "
                                               f"the {self.input_limit} allowed (max_input_tokens)",
                                               prompt_tokens=len(row.ids))
                continue
            rows.append(row)
        rows.sort(key=lambda r: (r.max_new, len(r.ids)))
        from tqdm.auto import tqdm

        from teams_rl.llm.chunks import length_chunks

        with tqdm(total=len(rows), desc=f"generate {self.model_id}", unit="req", leave=False,
                  disable=not self.show_progress or len(rows) <= self.batch_size) as bar:
            done = 0
            while done < len(rows):  # planned again when an out-of-memory retry lowers batch_size
                size, left = self.batch_size, rows[done:]
                for start, end in length_chunks([len(r.ids) for r in left], [r.max_new for r in left], size,
                                                self.chunk_step_tokens):
                    chunk = left[start:end]
                    for row, completion in zip(chunk, self._generate_with_retry(chunk), strict=True):
                        results[row.index] = completion
                    self.chunks_run += 1
                    done += len(chunk)
                    bar.update(len(chunk))
                    if self.batch_size != size:
                        break
        self._retry_empty(rows, results)
        return results  # type: ignore[return-value]

    def _retry_empty(self, rows: list[_Row], results: list[Completion | None]) -> None:
        """An empty answer is a fault, not a result: sample again (a new seed derived from the request's, so the
        retry is as reproducible as the first try) up to `empty_retries` times, then fail as kind `empty`.
        A greedy request gives the same empty text every time, so it fails at once."""
        for attempt in range(1, self.empty_retries + 1):
            retry = [r for r in rows if r.temperature > 0 and results[r.index].ok and not results[r.index].text.strip()]
            if not retry:
                break
            again = [_Row(r.index, r.ids, r.max_new, r.temperature, r.top_p, (r.seed * 1_000_003 + attempt) % 2**62)
                     for r in retry]
            for row, completion in zip(again, self._generate_with_retry(again), strict=True):
                results[row.index] = completion
        for r in rows:
            answer = results[r.index]
            if answer.ok and not answer.text.strip():
                results[r.index] = Completion.failed(
                    "empty", f"the model answered nothing ({answer.completion_tokens} token(s), {answer.finish_reason})",
                    prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                    latency_s=answer.latency_s)

    def _generate_with_retry(self, rows: list[_Row]) -> list[Completion]:
        try:
            return self._generate(rows)
        except Exception as err:
            oom = _is_oom(err)
            if oom:
                self._free_cuda()
            if len(rows) == 1:
                log.warning("%s: generation failed: %s", self.model_id, err)
                first_line = (str(err).splitlines() or [""])[0]
                return [Completion.failed("generation", f"{type(err).__name__}: {first_line}",
                                          prompt_tokens=len(rows[0].ids))]
            half = (len(rows) + 1) // 2
            if oom and self.batch_size > half:
                log.warning("%s: out of memory at batch %d; using batch_size %d", self.model_id, len(rows), half)
                self.batch_size = half
            else:
                log.warning("%s: chunk of %d failed (%s); retrying in halves", self.model_id, len(rows), err)
            return self._generate_with_retry(rows[:half]) + self._generate_with_retry(rows[half:])

    @staticmethod
    def _free_cuda() -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate(self, rows: list[_Row]) -> list[Completion]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        tok, model = self.tokenizer, self.model
        max_new = max(r.max_new for r in rows)
        extra = dict(self.generate_kwargs)
        if "min_new_tokens" in extra:  # never more than the requests allow
            extra["min_new_tokens"] = min(int(extra["min_new_tokens"]), max_new)
        config = GenerationConfig(
            max_new_tokens=max_new, do_sample=False, num_beams=1, use_cache=True,
            eos_token_id=sorted(self._stop_ids), pad_token_id=tok.pad_token_id, **extra,
        )
        from teams_rl.llm.prefix_cache import batched_cache, shared_batch, shared_length

        rows_ids = [r.ids for r in rows]
        shared = shared_length(rows_ids) if self.shared_prefix and self.prefix is None else 0
        start, saved = time.perf_counter(), 0
        with torch.inference_mode():
            if self.prefix is not None and max(len(ids) for ids in rows_ids) > 1:
                input_ids, mask, cache = batched_cache(model, rows_ids, self.prefix, tok.pad_token_id)
                batch = {"input_ids": input_ids, "attention_mask": mask, "past_key_values": cache}
            elif shared >= SHARED_PREFIX_MIN_TOKENS:
                input_ids, mask, cache = shared_batch(model, rows_ids, shared, tok.pad_token_id)
                saved = shared * (len(rows_ids) - 1)
                batch = {"input_ids": input_ids, "attention_mask": mask, "past_key_values": cache}
            else:
                batch = tok.pad({"input_ids": rows_ids}, padding=True, return_tensors="pt")
                batch = {k: v.to(model.device) for k, v in batch.items()}
            out = model.generate(**batch, generation_config=config,
                                 logits_processor=LogitsProcessorList([SeededSampler(rows, model.device)]))
        self.shared_prefill_saved += saved  # counted once the chunk is done, not again when it is retried
        latency = (time.perf_counter() - start) / len(rows)
        new_tokens = out[:, batch["input_ids"].shape[1]:].tolist()
        completions = []
        for row, new_ids in zip(rows, new_tokens, strict=True):
            kept, n_tokens, reason = split_generation(new_ids, self._stop_ids, row.max_new)
            completions.append(Completion(
                text=tok.decode(kept, skip_special_tokens=True).strip(),
                prompt_tokens=len(row.ids), completion_tokens=n_tokens,
                latency_s=latency, finish_reason=reason,
            ))
        return completions
