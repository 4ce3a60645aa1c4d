"""Loading helpers shared by the learned rewards: devices, `from_pretrained` with clear errors, tokenizers,
raw state-dict files. transformers is imported inside the functions only."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> "cuda" when available, else "cpu"."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def looks_local(path: str) -> bool:
    """True when `path` must be a local path: it exists, is absolute, starts with "." or "~", or has more than
    one "/" (a hub id is "name" or "org/name")."""
    return (os.path.exists(path) or os.path.isabs(path) or path.startswith((".", "~"))
            or path.count("/") > 1 or os.sep != "/" and os.sep in path)


def from_pretrained(cls, path: str, reward: str, what: str, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | None = None, **kw):
    """`cls.from_pretrained(path)`, in eval mode with frozen parameters, on `device`.

    Raises FileNotFoundError (what was looked for and where) when the directory or the hub id does not hold a
    model, and ValueError when the checkpoint lacks weights that `cls` needs (a checkpoint of another model:
    from_pretrained alone would initialize those at random without failing).
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{reward}: path must be a str (a local directory or a hub id); got {type(path).__name__}")
    path = os.fspath(path)
    if looks_local(path):
        path = os.path.expanduser(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{reward}: no directory {path!r}; expected the {what} saved with save_pretrained "
                                    "(config.json + model weights) there, or a hub id")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{reward}: {path!r} has no config.json; expected the {what} saved with "
                                    f"save_pretrained there (found: {sorted(os.listdir(path))[:10]})")
    try:
        model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True, **kw)
    except OSError as exc:
        raise FileNotFoundError(f"{reward}: could not load the {what} ({cls.__name__}) from {path!r}: {exc}") from exc
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{reward}: the checkpoint at {path!r} lacks {len(missing)} weights of {cls.__name__} "
                         f"(e.g. {missing[:3]}); is it a {what}?")
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(path: str, reward: str, fallback: str | None = None):
    """AutoTokenizer from `path`, else from `fallback` (e.g. the hub id the reward's authors load their processor
    from); a local directory without tokenizer files goes straight to the fallback."""
    from transformers import AutoTokenizer

    local_without = os.path.isdir(path) and not any(f.startswith(("tokenizer", "vocab")) for f in os.listdir(path))
    candidates = ([] if local_without else [path]) + ([fallback] if fallback else [])
    errors = [f"{path!r} has no tokenizer files"] if local_without else []
    for candidate in candidates:
        try:
            return AutoTokenizer.from_pretrained(candidate)
        except (OSError, ValueError) as exc:
            errors.append(f"{candidate!r}: {exc}")
    raise FileNotFoundError(f"{reward}: no tokenizer found ({'; '.join(errors)}); save one next to the model or pass "
                            "tokenizer=<directory or hub id>")


def load_state_dict_file(file: str, reward: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or of a torch pickle (.pt/.pth/.bin, loaded with weights_only=True);
    a {"state_dict": ...} or {"model": ...} wrapper is unwrapped and a DDP "module." prefix stripped."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{reward}: weights file {file!r} does not exist")
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(file)
    else:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors have many types
            raise ValueError(f"{reward}: could not read {file!r} as a torch state dict (weights_only=True): {exc}") \
                from exc
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{reward}: {file!r} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
