"""Shared test helpers: the debug model shape, and a skip marker for GPU-only tests."""

import pytest
import torch

from spec.config import ModelConfig, load_job_config

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")


@pytest.fixture
def debug_model_config() -> ModelConfig:
    return load_job_config(None, []).model
