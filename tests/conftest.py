"""Shared fixtures: tiny random LLaVA bases written to temp dirs and loaded by the real code."""

from __future__ import annotations

import logging

import pytest
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    from service.model.presets import build_random_base

    return build_random_base(tmp_path_factory.mktemp("tiny-base"), "tiny", seed=0)


@pytest.fixture()
def tiny_base(tiny_base_dir, caplog):
    from service.model.base import load_base

    with caplog.at_level(logging.ERROR):
        return load_base(tiny_base_dir, n_slots=4, max_rank=8)


@pytest.fixture(scope="session")
def learnable_base_dir(tmp_path_factory, tiny_base_dir):
    """The tiny base with a sharper lm_head: a random model's logits are too flat for any adapter to
    make an answer likely (see tests/model/test_training.py)."""
    import torch

    from service.model.base import load_base, save_base

    base = load_base(tiny_base_dir, n_slots=0)
    with torch.no_grad():
        base.model.lm_head.weight.mul_(25)
    out = tmp_path_factory.mktemp("learnable-base")
    save_base(base, out)
    return out
