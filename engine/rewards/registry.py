"""The reward registry: `load_reward(name, path=None, **kw)` builds a registered reward.

Each reward module registers a factory `factory(path=None, **kw) -> Reward` under its name with
`@register_reward("name")`. Names are case-insensitive and "-" equals "_" ("PickScore", "jpeg-compressibility").
Factories import transformers only when called, so importing this package stays light.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Reward

_FACTORIES: dict[str, Callable[..., Reward]] = {}


def _key(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"reward name must be a str; got {type(name).__name__}")
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


def available_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_FACTORIES)


def load_reward(name: str, path: str | None = None, **kw) -> Reward:
    """Builds the reward registered as `name`.

    Args:
        name: a registered name (`available_rewards()`).
        path: where the weights are: a local directory or file, or a hub id (see each reward's factory);
            None means the reward's default (for learned rewards, the published hub id; rule-based rewards
            take no path).
        **kw: the factory's options (device, dtype, autocast_dtype, max_batch_size, value_range, ...).

    Raises:
        ValueError: unknown name (the message lists the known ones).
        FileNotFoundError: weights missing (the message says what was looked for and where).
    """
    key = _key(name)
    if key not in _FACTORIES:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(available_rewards())}")
    reward = _FACTORIES[key](path=path, **kw)
    reward.name = key
    return reward
