"""Servers for the reliability tests: one tiny checkpoint per test process, and the real engine for in-thread
servers (tests.service_fixtures.ServerThread), whose fault hook a test can then reach."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tests.service_fixtures import make_tiny_checkpoint

SERVER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the tiny model needs no thread pool
_CACHE: dict[str, Path] = {}


def shared_tiny_checkpoint() -> Path:
    """A tiny GlmMoeDsa checkpoint written by transformers, made once per test process."""
    if "tiny" not in _CACHE:
        _CACHE["tiny"] = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="glm-serve-soak-")) / "tiny-glm")
    return _CACHE["tiny"]


def real_engine(model_dir: Path, **config: Any) -> Any:
    """The real engine, in a thread of this process, on CPU in fp32."""
    from service.engine.client import EngineClient
    from service.engine.config import EngineConfig

    return EngineClient.in_thread(EngineConfig(model=model_dir, device="cpu", dtype="float32", **config))
