"""Building a CrossModalNet where several threads may build one at once.

A network's initial weights come from torch's generator, which is one per process: a thread
that builds any module while another builds a seeded one shifts the other's stream (the
simulator drives several runs from threads, and its results changed with the machine's load).
Every construction in code that may run beside another thread's (the simulator's driver and
workers, the server) goes through here and takes one lock, so a seeded network depends on its
seed alone."""

from __future__ import annotations

import threading

import torch
from crossfed.common.model.model_config import ModelConfig
from crossfed.common.model.network import CrossModalNet

_TORCH_GENERATOR = threading.Lock()


def seeded_model(config: ModelConfig, seed: int) -> CrossModalNet:
    """A network whose initial weights depend on ``config`` and ``seed`` only (what the
    server starts a run from); the caller's generator state is left as it was."""
    with _TORCH_GENERATOR, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CrossModalNet(config)


def model_to_load(config: ModelConfig) -> CrossModalNet:
    """A network whose weights are about to be replaced (a global model, a worker's cached
    network): its random initialisation is irrelevant, but it still draws from the generator,
    so it takes its turn."""
    with _TORCH_GENERATOR:
        return CrossModalNet(config)
