"""Which trainers `fusedrl train NAME` can run, found without importing them.

`KNOWN` maps each built-in trainer's name to "module:ATTRIBUTE" (an `fusedrl.engine.runs.Trainer`) and its
one-line help, so that `fusedrl train --help` lists trainers without importing diffusers or transformers; the
module is imported only when that trainer is run or its `--help` is asked for. `register(trainer)` adds one at
run time (tests, plug-ins).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

KNOWN: dict[str, tuple[str, str]] = {
    "diffusion-grpo": ("fusedrl.engine.diffusion.grpo:TRAINER",
                       "GRPO (Flow-GRPO / DanceGRPO / DDPO) on diffusers image models, LoRA or full"),
    "reward-backprop": ("fusedrl.engine.diffusion.reward_backprop:TRAINER",
                        "reward backpropagation (AlignProp / DRaFT / ReFL) on diffusers image models"),
    "llm-grpo": ("fusedrl.engine.llm.grpo:TRAINER", "GRPO for Hugging Face causal LMs on the fused loss kernels"),
}

_REGISTERED: dict[str, Any] = {}


class TrainerUnavailable(LookupError):
    """The named trainer does not exist, is not written yet, or needs a package that is not installed."""


def register(trainer: Any) -> Any:
    """Register a `Trainer` under `trainer.name` (replacing a registration of the same name); returns it."""
    for attr in ("name", "config", "run", "help"):
        if not hasattr(trainer, attr):
            raise TypeError(f"register() takes a fusedrl.engine.runs.Trainer; {trainer!r} has no {attr!r}")
    _REGISTERED[trainer.name] = trainer
    return trainer


def unregister(name: str) -> None:
    """Remove a trainer added with `register` (no error when absent)."""
    _REGISTERED.pop(name, None)


def names() -> list[tuple[str, str]]:
    """(name, one-line help) of every known or registered trainer, sorted by name."""
    rows = {name: help_ for name, (_, help_) in KNOWN.items()}
    rows.update({name: t.help for name, t in _REGISTERED.items()})
    return sorted(rows.items())


def get(name: str) -> Any:
    """The `Trainer` called `name`, importing its module if needed. Raises TrainerUnavailable with a message
    fit for the user when the name is unknown (with a did-you-mean), its module does not exist yet, or a
    package it needs is missing. Other import errors (bugs) propagate."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in KNOWN:
        close = difflib.get_close_matches(name, [n for n, _ in names()], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TrainerUnavailable(f"unknown trainer {name!r}{hint} (known: {', '.join(n for n, _ in names())})")
    target, _ = KNOWN[name]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise TrainerUnavailable(f"trainer {name!r} is not available yet: this install has no module "
                                     f"{module_name}") from exc
        raise TrainerUnavailable(f"trainer {name!r} needs the package {missing.split('.')[0]!r}, which is not "
                                 "installed: pip install 'fusedrl[engine]'") from exc
    trainer = getattr(module, attr, None)
    if trainer is None:
        raise TrainerUnavailable(f"trainer {name!r} is not available yet: {module_name} defines no {attr}")
    return trainer
