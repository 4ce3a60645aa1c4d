"""Random-number-generator state: capture and restore torch (CPU and every CUDA device), numpy's global
generator, Python's `random`, and any named `torch.Generator`s, as JSON-serializable data, so that a resumed
run draws exactly the numbers the uninterrupted run would have drawn."""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import Mapping
from typing import Any

import torch

log = logging.getLogger("fusedrl")


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ModuleNotFoundError:
        pass
    torch.manual_seed(seed)  # seeds every CUDA device too


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The current RNG states as a JSON-serializable dict (torch CPU, CUDA devices if CUDA is initialized,
    numpy global, Python `random`, and the given named generators)."""
    state: dict[str, Any] = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ModuleNotFoundError:
        pass
    version, internal, gauss_next = random.getstate()
    state["python"] = [version, list(internal), gauss_next]
    if generators:
        state["generators"] = {name: {"device": str(g.device), "state": _b64(g.get_state())}
                               for name, g in generators.items()}
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore states captured by `capture_rng` (and the named generators, matched by name)."""
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = [_unb64(s) for s in state["cuda"]]
        n = torch.cuda.device_count()
        if len(saved) != n:
            log.warning("fusedrl: the checkpoint holds CUDA RNG states for %d devices, this process sees %d; "
                        "restoring the first %d", len(saved), n, min(n, len(saved)))
        for i, s in enumerate(saved[:n]):
            torch.cuda.set_rng_state(s, i)
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
    saved_gens = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved_gens:
            raise KeyError(f"the checkpoint has no state for generator {name!r} (it has {sorted(saved_gens)})")
        g.set_state(_unb64(saved_gens[name]["state"]))
