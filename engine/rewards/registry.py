"""The reward registry: `load_reward(name, path=None, **kw)` builds a registered reward.

Each reward module registers a factory `factory(path=None, **kw) -> Reward` under its name with
`@register_reward("name")`. Names are case-insensitive and "-" equals "_" ("PickScore", "jpeg-compressibility").
Factories import transformers only when called, so importing this package stays light.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Reward
from .function import FunctionReward, is_function_spec, parse_function_spec

_FACTORIES: dict[str, Callable[..., Reward]] = {}


def _key(name: str) -> str:
    """The registry key of a reward name; a function reference ('file.py:fn', 'module:fn') is kept as written."""
    if not isinstance(name, str):
        raise TypeError(f"reward name must be a str; got {type(name).__name__}")
    if is_function_spec(name):
        return name.strip()
    return name.strip().lower().replace("-", "_")


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: registers `factory(path=None, **kw) -> Reward` under `name` (a second registration of the
    same name raises ValueError)."""

    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        key = _key(name)
        if key in _FACTORIES and _FACTORIES[key] is not factory:
            raise ValueError(f"a reward named {key!r} is already registered ({_FACTORIES[key].__module__})")
        _FACTORIES[key] = factory
        return factory

    return deco


def check_reward_name(name: str) -> str:
    """The registry key of `name` if it names a registered reward or a reward function whose file exists ('file.py:fn';
    a 'module:fn' is imported only when loaded); else ValueError saying what is known."""
    key = _key(name)
    if is_function_spec(key):
        try:
            parse_function_spec(key, f"reward {name!r}")
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None
        return key
    if key not in _FACTORIES:
        raise ValueError(f"unknown reward {name!r}; known: {', '.join(available_rewards())}, or a function "
                         "'file.py:function' / 'module:function'")
    return key


def available_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_FACTORIES)


def load_reward(name: str, path: str | None = None, **kw) -> Reward:
    """Builds the reward registered as `name`.

    Args:
        name: a registered name (`available_rewards()`), or an image reward function 'file.py:function' /
            'module:function' (`FunctionReward`: its options are differentiable, device and ImageReward's).
        path: where the weights are: a local directory or file, or a hub id (see each reward's factory);
            None means the reward's default (for learned rewards, the published hub id; rule-based rewards
            take no path).
        **kw: the factory's options (device, dtype, autocast_dtype, max_batch_size, value_range, ...).

    Raises:
        ValueError: unknown name (the message lists the known ones).
        FileNotFoundError: weights missing (the message says what was looked for and where).
    """
    key = _key(name)
    if is_function_spec(key):
        if path is not None:
            raise ValueError(f"reward {key!r} is a function and takes no path (got {path!r})")
        reward = FunctionReward(key, **kw)
    elif key in _FACTORIES:
        reward = _FACTORIES[key](path=path, **kw)
    else:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(available_rewards())} (or a function: "
                         "'file.py:function' / 'module:function')")
    reward.name = key
    return reward
