"""Builds role clients from config. Roles that share a backend config share one loaded model."""

from __future__ import annotations

import json
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from teams_rl import config as C
from teams_rl.errors import TeamsRLError
from teams_rl.llm.accounting import Budget, RoleAccount
from teams_rl.llm.cache import RequestCache
from teams_rl.llm.client import Backend, LLMClient

ROLES = ("instructor", "reviewer", "expert")


class LLMPool:
    """Lazily builds one `LLMClient` per role; keeps accounts alive across stages for the run manifest."""

    def __init__(self, cfg: DictConfig, cache_path: str | Path | None):
        self.cfg = cfg
        self.cache = RequestCache(cache_path) if cache_path else None
        self._backends: dict[str, Backend] = {}
        self._clients: dict[str, LLMClient] = {}
        self._failures = None

    def client(self, role: str) -> LLMClient:
        if role in self._clients:
            return self._clients[role]
        role_cfg = self.cfg.get(role)
        if role_cfg is None:
            raise TeamsRLError(f"no LLM configured for role '{role}' (set the '{role}=' config group)")
        backend_cfg = C.plain(role_cfg.backend)
        key = json.dumps(backend_cfg, sort_keys=True)
        if key not in self._backends:
            try:
                self._backends[key] = instantiate(backend_cfg)
            except Exception as err:  # instantiate wraps user errors; unwrap to one line
                cause = err.__cause__ or err
                if isinstance(cause, TeamsRLError):
                    raise cause from None
                raise
        backend = self._backends[key]
        price = role_cfg.get("price") or {}
        budget = role_cfg.get("budget") or {}
        client = LLMClient(
            role,
            backend,
            sampling=dict(C.plain(role_cfg.get("sampling")) or {}),
            cache=self.cache,
            account=RoleAccount(
                role=role,
                model=backend.model_id,
                prompt_usd_per_1k=float(price.get("prompt_usd_per_1k") or 0.0),
                completion_usd_per_1k=float(price.get("completion_usd_per_1k") or 0.0),
            ),
            budget=Budget(role=role, max_queries=budget.get("max_queries"), max_usd=budget.get("max_usd")),
        )
        client.failures = self._failures
        self._clients[role] = client
        return client

    def dtypes(self, roles) -> dict[str, str]:
        """{role: the dtype its model runs in} for `roles` whose backend is a local model (`dtype_used`)."""
        return {role: c.backend.dtype_used for role, c in self._clients.items()
                if role in roles and getattr(c.backend, "dtype_used", None)}

    def attach_failures(self, failures) -> None:
        """Every client (now and later) books its failed requests on `failures` (None: detach)."""
        self._failures = failures
        for client in self._clients.values():
            client.failures = failures

    def accounting(self) -> dict[str, dict]:
        """Per-role accounting of the roles that sent or looked up anything (clients built only to check the
        config before the run are left out)."""
        return {role: c.account.summary() for role, c in self._clients.items() if c.account.by_purpose}

    def close(self) -> None:
        for backend in self._backends.values():
            close = getattr(backend, "close", None)
            if close:
                close()
        if self.cache is not None:
            self.cache.close()
