"""Shared test helpers: the debug model shape, a skip marker for GPU-only tests, and a free port for the tests'
process groups."""

import socket

import pytest
import torch

from spec.config import ModelConfig, load_job_config

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent GPU machine)")


@pytest.fixture
def debug_model_config() -> ModelConfig:
    return load_job_config(None, []).model


def free_port() -> int:
    """A free TCP port on loopback for a spawned test's process group (gloo or NCCL)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
