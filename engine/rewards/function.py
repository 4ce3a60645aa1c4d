"""Image rewards written as plain Python functions, named 'path/to/file.py:function' or 'package.module:function'
wherever a registered reward name is taken (`load_reward`, the trainers' `reward.names`):

    # my_rewards.py
    def ocr(images, prompts, metadata):        # images [b, 3, H, W] float in [0, 1] on the reward's device
        return torch.tensor([read_text(img) == m["text"] for img, m in zip(images, metadata)], dtype=torch.float)

    fusedrl train diffusion-grpo --reward.names pickscore my_rewards.py:ocr --reward.weights 1 0.5

The function gets the images (positionally, already mapped from the declared value range to [0, 1], in
micro-batches of at most `max_batch_size`) and, by keyword when its signature names them (or takes **kwargs),
`prompts` (one string per image) and `metadata` (one dict per image: the prompt row's other fields, e.g. the
GenEval / OCR targets of a .jsonl prompt file; {} where there are none). It returns one number per image (a
tensor or a list). It is treated as not differentiable unless `differentiable=True` is given (reward
backpropagation needs that, and a function that then returns scores with no gradient to the images fails).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .base import ImageReward

__all__ = ["FunctionReward", "import_function", "is_function_spec", "parse_function_spec"]


def is_function_spec(name: str) -> bool:
    """Whether a reward name is a 'module:function' / 'file.py:function' reference rather than a registered name."""
    return isinstance(name, str) and ":" in name


def parse_function_spec(spec: str, what: str = "reward function") -> tuple[str, str]:
    """(target, function) of 'package.module:function' or 'path/to/file.py:function', checked without importing
    anything: ValueError for another form, FileNotFoundError for a .py file that is not there (`what` names the
    spec in the messages)."""
    target, _, attr = spec.strip().rpartition(":")
    if not target or not attr:
        raise ValueError(f"{what}: must be 'module:function' or 'file.py:function'; got {spec!r}")
    if target.endswith(".py") and not Path(target).expanduser().is_file():
        raise FileNotFoundError(f"{what}: the file {target!r} does not exist")
    return target, attr


def import_function(spec: str, what: str = "reward function") -> Callable:
    """'package.module:function' or 'path/to/file.py:function' -> the function (errors name `what` and the spec)."""
    target, attr = parse_function_spec(spec, what)
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        # registered under a name of its own (two files named rewards.py do not collide), before it runs: dataclasses
        # and pickling look their module up in sys.modules
        name = f"_fusedrl_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
        module = sys.modules.get(name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise ValueError(f"{what}: running {target} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ValueError(f"{what}: importing {target} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{what}: {target} has no callable {attr!r}")
    return fn


class FunctionReward(ImageReward):
    """An image reward around `fn(images, [prompts=...], [metadata=...]) -> [b]` (module docstring).

    Args:
        fn: the function, or a 'module:function' / 'file.py:function' reference to import.
        differentiable: whether gradients reach the images through `fn` (default False).
        device: where `fn` gets the images (None: where they are).
        **image_kw: ImageReward's options (value_range, max_batch_size, autocast_dtype, check_range, compile).
    """

    takes_metadata = True

    def __init__(self, fn: Callable | str, *, differentiable: bool = False, device: str | torch.device | None = None,
                 **image_kw) -> None:
        if image_kw.get("compile"):
            raise ValueError("compile=True is not offered for reward functions: torch.compile would recompile for "
                             "every new prompt or metadata value; compile the model inside your function instead")
        super().__init__(**image_kw)
        if isinstance(fn, str):
            fn = import_function(fn)
        if not callable(fn):
            raise TypeError(f"fn must be callable or a 'module:function' reference; got {type(fn).__name__}")
        if not isinstance(differentiable, bool):
            raise TypeError(f"differentiable must be True or False; got {differentiable!r}")
        self.fn = fn
        self.differentiable = differentiable
        self.device = torch.device(device) if device is not None else None
        self.name = getattr(fn, "__name__", "function")
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # a builtin or extension callable: offer everything
            params = {}
        var_kw = not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._keywords = tuple(k for k in ("prompts", "metadata") if var_kw or k in params)

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str] | None,
                      metadata: list[dict] | None = None) -> torch.Tensor:
        offered = {"prompts": prompts, "metadata": metadata if metadata is not None else [{}] * len(pixels)}
        out = self.fn(pixels, **{k: offered[k] for k in self._keywords})
        scores = torch.as_tensor(out, dtype=torch.float32, device=pixels.device) if not isinstance(out, torch.Tensor) \
            else out.to(device=pixels.device, dtype=torch.float32)
        if scores.numel() != len(pixels):
            raise ValueError(f"reward function {self.name!r} returned {scores.numel()} values for {len(pixels)} images")
        if self.differentiable and pixels.requires_grad and torch.is_grad_enabled() and not scores.requires_grad:
            raise RuntimeError(f"reward function {self.name!r} was declared differentiable but returned scores with no "
                               "gradient to the images (computed under no_grad, or through .item() / numpy?)")
        return scores.reshape(-1)
