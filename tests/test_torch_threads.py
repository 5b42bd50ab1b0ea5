"""--torch-threads: the server leaves one core to its event loop by default; the engine applies the setting."""

from __future__ import annotations

import os

import torch

from service.settings import Settings
from tests.engine_fixtures import make_engine


def test_default_leaves_one_core_for_the_event_loop(engine_ckpt):
    cfg = Settings(model=engine_ckpt).engine_config(engine_ckpt)
    assert cfg.torch_threads == max(1, (os.cpu_count() or 2) - 1)
    assert Settings(model=engine_ckpt, torch_threads=3).engine_config(engine_ckpt).torch_threads == 3


def test_engine_applies_it_on_cpu(engine_ckpt):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        make_engine(engine_ckpt, torch_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
