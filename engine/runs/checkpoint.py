"""Training checkpoints: one folder per step, written atomically, with keep-last-N pruning.

Layout (under the run folder's `checkpoints/`):

    step-00000120/
        tensors.safetensors   model / LoRA / EMA tensors (`tensors` argument; safetensors, loads without pickle)
        objects.pt            optimizer, LR scheduler, grad scaler state dicts (`objects`; torch.save)
        state.json            {"step", "format", "state": <trainer JSON state>, "rng": <capture_rng()>,
                              "world_size": <processes>, "config": {dotted path: value}} -
                              written last: its presence marks a complete checkpoint
        ...                   files the trainer's `write_extra(folder)` writes (e.g. diffusers LoRA weights)
    latest                    text file naming the newest checkpoint folder, for people and tools

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed into place in one
`os.replace` (and the parent folder fsynced); the `latest` pointer is updated after that, and older folders
are pruned last. A crash at any point leaves either the previous set of checkpoints or the new one. Resuming
picks the highest-numbered complete folder, so it does not depend on `latest` having been updated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_text, fsync_dir, fsync_file, remove_tree

FORMAT = 1
TENSORS = "tensors.safetensors"
OBJECTS = "objects.pt"
STATE = "state.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the step it was saved after, and what the trainer gave `save_checkpoint`."""

    step: int
    path: Path
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] | None = None
    world_size: int | None = None  # the number of processes of the run that saved it (None: not recorded)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _check_json(state: Mapping[str, Any]) -> None:
    for key, value in state.items():
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"checkpoint state[{key!r}] is not JSON-serializable ({exc}); put tensors in `tensors` "
                            "and state dicts with tensors (optimizer, scheduler) in `objects`") from exc


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint tensors[{name!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses tensors that share storage (tied weights) or views
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[name] = t
    return out


def write_checkpoint(ckpt_root: str | Path, step: int, tensors: Mapping[str, torch.Tensor] | None = None,
                     state: Mapping[str, Any] | None = None, objects: Mapping[str, Any] | None = None,
                     rng: Mapping[str, Any] | None = None,
                     write_extra: Callable[[Path], None] | None = None, world_size: int | None = None,
                     config: Mapping[str, Any] | None = None) -> Path:
    """Write checkpoint `step` under `ckpt_root` atomically and point `latest` at it; return its folder.

    tensors: name -> tensor (safetensors); state: JSON-serializable trainer state (data position, counters);
    objects: anything `torch.save` takes (optimizer/scheduler state dicts); rng: `capture_rng()`;
    write_extra(folder): writes more files into the checkpoint before it is committed; world_size: the number of
    processes of the run (read back as Checkpoint.world_size); config: the run's config as {dotted path: value}
    (JSON values), the one this checkpoint was trained with (`read_meta`)."""
    from safetensors.torch import save_file

    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0; got {step!r}")
    state = dict(state or {})
    _check_json(state)
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        if tensors:
            save_file(_cpu_tensors(tensors), str(tmp / TENSORS), metadata={"step": str(step)})
        if objects:
            torch.save(dict(objects), tmp / OBJECTS)
        if write_extra is not None:
            write_extra(tmp)
        meta = {"format": FORMAT, "step": step, "state": state, "rng": dict(rng) if rng is not None else None,
                "world_size": world_size, "config": dict(config) if config is not None else None}
        (tmp / STATE).write_text(json.dumps(meta), encoding="utf-8")
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_file(path)
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. the final step after a resume)
            remove_tree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    return final


def list_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `ckpt_root` as (step, folder), oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and (path / STATE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(ckpt_root: str | Path) -> tuple[int, Path] | None:
    """The highest-step complete checkpoint, or None."""
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    weights_only: bool = True) -> Checkpoint:
    """Load a checkpoint folder. `weights_only=False` unpickles arbitrary objects from objects.pt (trusted
    files only)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / STATE}: checkpoint format {meta.get('format')!r}; this fusedrl reads {FORMAT}")
    device = str(map_location)
    tensors = load_file(str(path / TENSORS), device=device) if (path / TENSORS).exists() else {}
    objects = {}
    if (path / OBJECTS).exists():
        objects = torch.load(path / OBJECTS, map_location=map_location, weights_only=weights_only)
    return Checkpoint(step=int(meta["step"]), path=path, tensors=tensors, state=meta.get("state") or {},
                      objects=objects, rng=meta.get("rng"), world_size=meta.get("world_size"))


def read_meta(path: str | Path) -> dict[str, Any]:
    """Checkpoint folder `path`'s state.json without its tensors and objects: "step", "state", "rng", and (where
    recorded) "world_size" and "config" ({dotted path: value} of the run that saved it)."""
    try:
        return json.loads((Path(path) / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a complete fusedrl checkpoint (cannot read {STATE}: {exc})") from exc


def prune_checkpoints(ckpt_root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (keep <= 0: keep all); return the deleted folders.
    Also removes temporary folders left by a crash during a save."""
    root = Path(ckpt_root)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp-", ".trash-")) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
    if keep <= 0:
        return removed
    for _, path in list_checkpoints(root)[:-keep]:
        remove_tree(path)
        removed.append(path)
    return removed
