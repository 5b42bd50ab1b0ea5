"""Fixtures shared by several test modules. pytest finds them here, so no test imports a fixture by hand.

The helpers behind them (checkpoint writers, the fake engine, server wrappers, SSE checks) stay importable from
tests/model_fixtures.py, tests/engine_fixtures.py and tests/service_fixtures.py.

Markers: `server` marks a test that starts a server subprocess (`ServerProcess`); `make test-fast` deselects
them. Starting one from an unmarked test fails, so the fast loop cannot silently grow slow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests import service_fixtures


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Set before any of the item's fixtures run, module-scoped ones included (they start most servers).
    service_fixtures.CURRENT_TEST = item


# -- engine: a tiny GlmMoeDsa checkpoint with MTP weights and a tokenizer, and transformers as the oracle ----------
@pytest.fixture(scope="session")
def engine_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint shared by the engine tests (tests/engine_fixtures.py: TINY)."""
    from tests.engine_fixtures import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("engine_ckpt"))


@pytest.fixture(scope="session")
def hf_oracle(engine_ckpt: Path) -> Any:
    """transformers' GlmMoeDsaForCausalLM on `engine_ckpt`, fp32 eager."""
    from tests.engine_fixtures import hf_model

    return hf_model(engine_ckpt)


@pytest.fixture
def draft_inputs(monkeypatch: pytest.MonkeyPatch) -> dict[int, dict]:
    """What the MTP layer hands each drafting sequence (its output at the last valid position), per proposer and
    (request, computed positions): it reads every MTP entry before it, so a missing or wrong one changes it."""
    from service.engine.speculative import MTPProposer

    seen: dict[int, dict] = {}
    original = MTPProposer._draft

    def spy(self, seqs, z, max_model_len):
        for s, row in zip(seqs, z, strict=True):
            seen.setdefault(id(self), {})[(s.request_id, s.num_computed_tokens)] = row.clone()
        return original(self, seqs, z, max_model_len)

    monkeypatch.setattr(MTPProposer, "_draft", spy)
    return seen


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box OpenMP spin-waits cost 10x.
    Engine modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- service: model directories, and the real app around an engine in a thread --------------------------------------
@pytest.fixture(scope="session")
def fake_model_dir() -> Path:
    """Tokenizer files and a config.json: enough for FakeAsyncEngine and for `--model` of a fake-engine server."""
    return service_fixtures.shared_fake_model_dir()


@pytest.fixture(scope="session")
def tiny_glm_ckpt() -> Path:
    """A random GlmMoeDsa checkpoint named `tiny-glm` with the fake model's tokenizer, for the real engine behind
    HTTP (end-to-end and reliability tests); the same directory bench/soak_load.py makes."""
    from tests.soak.servers import shared_tiny_checkpoint

    return shared_tiny_checkpoint()


@pytest.fixture(scope="session")
def thread_server(fake_model_dir: Path) -> Callable[..., Any]:
    """A factory: `with thread_server(engine={"step_s": 0.01}, max_queue_size=1) as s:` serves the real app in a
    thread of this process (`s.engine`, `s.ctx` and `s.base_url` for the test). `engine` is FakeAsyncEngine's
    keywords, or an engine object to serve as is; `model_dir` defaults to `fake_model_dir`; every other keyword is
    a Settings field."""

    @contextmanager
    def serve(engine: dict[str, Any] | Any = None, model_dir: Path | None = None,
              **settings: Any) -> Iterator[service_fixtures.ServerThread]:
        model_dir = model_dir or fake_model_dir
        if engine is None or isinstance(engine, dict):
            engine = service_fixtures.FakeAsyncEngine(model_dir, **(engine or {}))
        with service_fixtures.ServerThread(engine, model_dir, **settings) as server:
            yield server

    return serve
