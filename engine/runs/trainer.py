"""`Trainer`: what a trainer module exposes so that `fusedrl train NAME` can run it.

    # fusedrl/engine/diffusion/grpo.py
    TRAINER = Trainer("diffusion-grpo", DiffusionGRPOConfig, train, "GRPO on diffusers image models")

`run(config, run)` receives the validated config and an open `Run` (folder created, resume checkpoint found,
not yet loaded); it returns None or an exit code. Keep heavy imports (diffusers, transformers) inside `run`
so that `fusedrl train NAME --help` stays fast. The CLI adds `--config`, `--out`, `--resume`,
`--allow-change` and `--dry-run` itself: a config must not have top-level fields of those names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Trainer:
    """A registered trainer: its CLI name, config dataclass, entry point and one-line help."""

    name: str
    config: type
    run: Callable[[Any, Any], int | None]
    help: str
    description: str = ""  # longer text for `fusedrl train NAME --help`
