"""Trainer configs: dataclasses whose fields carry their help text and checks, read from YAML/TOML files and
command-line options, validated before anything heavy happens.

A trainer config is a tree of dataclasses. Leaves are declared with `field(default, help, check=...)`;
sections (`model`, `lora`, `sampling`, `optim`, `run`, ...) with `section(Cls, help)`:

    @dataclass
    class OptimConfig:
        lr: float = field(1e-4, "learning rate", check=gt(0))
        betas: tuple[float, float] = field((0.9, 0.999), "Adam betas")

    @dataclass
    class GRPOConfig:
        model: str | None = field(None, "diffusers model path or hub id; none: the embedded tiny model")
        scheduler: Literal["sde", "cps"] = field("sde", "SDE step kind")
        optim: OptimConfig = section(OptimConfig, "optimizer")
        run: RunConfig = section(RunConfig, "run length, logging and checkpoint cadence")

    cfg = load_config(GRPOConfig, "grpo.yaml", overrides={"optim.lr": 3e-5})   # -> GRPOConfig, validated

Supported field types: int, float, str, bool, pathlib.Path, Literal[...] (choices), X | None, tuple[X, ...],
tuple[X, Y], list[X], dict[str, X] (YAML/TOML mappings; a JSON string on the command line), Any, and nested
dataclasses. Values are checked strictly (an int field refuses 0.5 and True; a str field refuses 123: quote it),
with two conveniences: ints are accepted for float fields, and strings that parse as floats are accepted for
float fields, because PyYAML reads `lr: 1e-4` (no dot) as the string "1e-4".

Every problem is reported at once, in one `ConfigError`, each line naming the field path (`optim.lr`), with a
did-you-mean for unknown keys. Cross-field checks go in the dataclass's `__post_init__`: a ValueError raised
there is reported against that section's path.

Layers are merged in order, later wins: dataclass defaults < each mapping given to `build_config` (e.g. a run
folder's saved config < a --config file < command-line options). Keys may be nested (`{"optim": {"lr": 1}}`) or
dotted (`{"optim.lr": 1}`).

On the command line (`add_arguments`) every leaf is an option named by its dotted path, exactly as in the
file: `--optim.lr 1e-4`, `--run.checkpoint_every 50`, `--lora.target_modules to_q to_k` (sequences take
several values), `--model none` (Optional fields take "none"), `--run.progress / --no-run.progress` (bools).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "Check",
    "ConfigError",
    "add_arguments",
    "between",
    "build_config",
    "config_diff",
    "config_errors",
    "config_yaml",
    "dump_config",
    "field",
    "flatten",
    "ge",
    "gt",
    "iter_fields",
    "leaf_paths",
    "load_config",
    "model_loading_errors",
    "overrides_from_args",
    "read_config_file",
    "resume_ok_fields",
    "section",
]

C = TypeVar("C")
_DEST_PREFIX = "config:"  # argparse dest of a config option: "config:optim.lr"


class ConfigError(ValueError):
    """A config problem (or several). `errors` holds (field path, message) pairs; str() lists them all."""

    def __init__(self, errors: list[tuple[str, str]] | str, header: str = "invalid config"):
        self.errors = [("", errors)] if isinstance(errors, str) else list(errors)
        self.header = header
        lines = [f"{path}: {msg}" if path else msg for path, msg in self.errors]
        super().__init__(lines[0] if len(lines) == 1 and not header else f"{header}:\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------------------------------- declaring


@dataclasses.dataclass(frozen=True)
class Check:
    """A value check with the message shown when it fails (`fn(value) -> bool`; True means valid)."""

    fn: Callable[[Any], bool]
    message: str
    finite: bool = False  # also refuse inf and NaN, saying so

    def __call__(self, value: Any) -> bool:
        return (not self.finite or _finite(value)) and bool(self.fn(value))

    def message_for(self, value: Any) -> str:
        return f"must be a finite number ({self.message})" if self.finite and not _finite(value) else self.message


@contextlib.contextmanager
def config_errors(path: str) -> Iterator[None]:
    """Errors found while reading what config field `path` names (a prompt file, a reward's options) become a
    ConfigError naming the field: a message and exit status 2, not a traceback and advice to resume."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        raise ConfigError([(path, str(exc))]) from exc


@contextlib.contextmanager
def model_loading_errors(model_field: str, lora_field: str | None = None,
                         text_lora_field: str | None = None) -> Iterator[None]:
    """Loading the model a config names: a model that cannot be found or read (an OSError from from_pretrained: a
    wrong path or hub id, no network) and LoRA targets the model lacks (peft's NoMatchingPeftModuleError) become
    ConfigErrors naming the field, not tracebacks (`text_lora_field` for the text encoders' targets: the loader
    marks those errors `text_encoder = True`)."""
    try:
        yield
    except OSError as exc:
        raise ConfigError([(model_field, f"could not be loaded: {exc}")]) from exc
    except ValueError as exc:
        if lora_field is not None and type(exc).__name__ == "NoMatchingPeftModuleError":
            field_ = text_lora_field if getattr(exc, "text_encoder", False) and text_lora_field else lora_field
            raise ConfigError([(field_, str(exc))]) from exc
        raise


def _finite(value: Any) -> bool:
    """False for inf and NaN (an `optim.lr inf` run trained to non-finite weights without a word)."""
    return not isinstance(value, float) or math.isfinite(value)


def gt(bound: float) -> Check:
    """Check: value > bound (finite)."""
    return Check(lambda v: v > bound, f"must be > {bound}", finite=True)


def ge(bound: float) -> Check:
    """Check: value >= bound (finite)."""
    return Check(lambda v: v >= bound, f"must be >= {bound}", finite=True)


def between(lo: float, hi: float, *, inclusive: bool = True) -> Check:
    """Check: lo <= value <= hi (or lo < value < hi with inclusive=False)."""
    if inclusive:
        return Check(lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}]")
    return Check(lambda v: lo < v < hi, f"must be in ({lo}, {hi})")


def field(default: Any = dataclasses.MISSING, help: str = "", *, check: Check | Callable[[Any], bool] | None = None,
          resume_ok: bool = False, metavar: str | None = None) -> Any:
    """A config leaf: `dataclasses.field` with metadata.

    default:   the default value (lists, dicts and other mutable values are deep-copied per instance); leave it out
               for a required field.
    help:      one line for `--help` (the default is appended there automatically).
    check:     a `Check` (`gt(0)`, `between(0, 1)`, `Check(fn, "must be ...")`) or a plain `fn(value) -> bool`;
               skipped when the value is None.
    resume_ok: the field may differ when a run is resumed (total steps, logging cadence, ...); other changes are
               refused by `Run(resume=True)` unless named in its `allow_changed`.
    """
    metadata = {"help": help, "check": check, "resume_ok": resume_ok, "metavar": metavar}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, help: str = "") -> Any:
    """A nested config section (a dataclass whose every field has a default)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"section() takes a dataclass; got {cls!r}")
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


# ---------------------------------------------------------------------------------------------- introspection


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One field of a config class, as `iter_fields` yields it."""

    path: str  # dotted path, e.g. "optim.lr"
    name: str
    type: Any  # resolved type hint
    field: dataclasses.Field
    is_section: bool

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def default(self) -> Any:
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return dataclasses.MISSING


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, include_extras=False)
    except NameError as exc:  # an annotation names something not importable at module level
        raise TypeError(f"cannot resolve the type hints of config class {cls.__qualname__}: {exc}") from exc


def iter_fields(cls: type, prefix: str = "") -> Iterator[FieldInfo]:
    """Every field of a config class, depth first: a section, then its fields (paths dotted)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = prefix + f.name
        is_section = dataclasses.is_dataclass(tp) and isinstance(tp, type)
        yield FieldInfo(path, f.name, tp, f, is_section)
        if is_section:
            yield from iter_fields(tp, path + ".")


def resume_ok_fields(cls: type) -> set[str]:
    """Dotted paths of the fields declared `resume_ok=True` (they may change when a run is resumed)."""
    return {fi.path for fi in iter_fields(cls) if not fi.is_section and fi.field.metadata.get("resume_ok")}


# ---------------------------------------------------------------------------------------------- coercion


class _Invalid(Exception):
    """Raised inside coercion; carries the (sub)path and message."""

    def __init__(self, path: str, message: str):
        self.path, self.message = path, message


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert `value` (from YAML/TOML/JSON/CLI) to type `tp`, strictly; raise _Invalid naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except _Invalid as exc:
                problems.append(exc)
        if len(problems) == 1:
            raise problems[0]
        raise _Invalid(path, f"expected {_describe(tp)}; {_got(value)}")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _Invalid(path, f"must be one of {', '.join(repr(a) for a in args)}; got {value!r}{hint}")
    if tp is type(None):
        if value is None:
            return None
        raise _Invalid(path, f"expected none; {_got(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(path, f"expected true or false; {_got(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Invalid(path, f"expected an integer; {_got(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _Invalid(path, f"expected a number; {_got(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid(path, f"expected a string; {_got(value)} (quote it in the file)")
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Invalid(path, f"expected a path; {_got(value)}")
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise _Invalid(path, f"expected a list ({_describe(tp)}); {_got(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Invalid(path, f"expected {len(args)} values ({_describe(tp)}); got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Invalid(path, f"expected a mapping; {_got(value)}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, path): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _Invalid(path, f"expected a section (mapping of {tp.__name__} fields); {_got(value)}")
        raise AssertionError("sections are built by _build")  # pragma: no cover
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Invalid(path, f"expected {tp.__name__}; {_got(value)}")
    raise TypeError(f"config field {path}: unsupported type {tp!r}")


# ---------------------------------------------------------------------------------------------- building


def _expand_dotted(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """{"optim.lr": 1} -> {"optim": {"lr": 1}} (recursively); nested mappings are expanded too. A key with a colon
    is kept whole: it names a reward function ("rewards.py:score", e.g. in reward.options), whose dots are a file's."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError([(where, f"keys must be strings; got {key!r}")])
        if isinstance(value, Mapping):
            value = _expand_dotted(value, where)
        head, _, rest = key.partition(".")
        if rest and ":" not in key:
            value = _expand_dotted({rest: value}, where)
        else:
            head = key
        if head in out and isinstance(out[head], Mapping) and isinstance(value, Mapping):
            out[head] = _merge(out[head], value)
        else:
            out[head] = value
    return out


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _all_paths(cls: type) -> list[str]:
    return [fi.path for fi in iter_fields(cls)]


def leaf_paths(cls: type) -> list[str]:
    """The dotted paths of `cls`'s fields that hold values (sections left out)."""
    return [fi.path for fi in iter_fields(cls) if not fi.is_section]


def _subsequence(short: str, long: str) -> bool:
    """The characters of `short` appear in `long` in order (`nme` in `name_or_path`)."""
    rest = iter(long)
    return len(short) >= 2 and all(ch in rest for ch in short)


def _build(cls: type, data: Mapping[str, Any], prefix: str, errors: list[tuple[str, str]], root: type) -> Any:
    fields_ = {fi.name: fi for fi in iter_fields(cls) if "." not in fi.path}
    n_errors = len(errors)
    hints = _hints(cls)
    for key in data:
        if key not in fields_:
            path = prefix + key
            # the same name elsewhere (`lr` given at the top level) beats a similar name here, then anywhere
            # (an abbreviation, `model.nme`, is a subsequence of its field's name; sections are no suggestion for a
            # key that holds a value)
            suggestions = ([p for p in _all_paths(root) if p.rsplit(".", 1)[-1] == key]
                           or [prefix + c for c in difflib.get_close_matches(key, list(fields_), n=1, cutoff=0.6)]
                           or [prefix + c for c in fields_ if _subsequence(key, c) and not fields_[c].is_section][:1]
                           or difflib.get_close_matches(path, leaf_paths(root), n=1, cutoff=0.6))
            hint = f"; did you mean {suggestions[0]!r}?" if suggestions else ""
            errors.append((path, f"unknown key{hint}"))
    kwargs: dict[str, Any] = {}
    for name, fi in fields_.items():
        path = prefix + name
        tp = hints[name]
        if fi.is_section:
            sub = data.get(name, {})
            if isinstance(sub, tp):
                sub = dump_config(sub)
            if not isinstance(sub, Mapping):
                errors.append((path, f"expected a section (mapping of {tp.__name__} fields); {_got(sub)}"))
                continue
            value = _build(tp, sub, path + ".", errors, root)
            if value is not None:
                kwargs[name] = value
            continue
        if name not in data:
            if fi.default is dataclasses.MISSING:
                errors.append((path, "required (no default); set it in the config file or on the command line"))
            continue
        try:
            value = _coerce(data[name], tp, path)
        except _Invalid as exc:
            errors.append((exc.path, exc.message))
            continue
        check = fi.field.metadata.get("check")
        if check is not None and value is not None:
            try:
                ok = check(value)
            except Exception as exc:  # a check that cannot even run on the value is a failed check
                ok, msg = False, f"check failed with {type(exc).__name__}: {exc}"
            else:
                msg = (check.message_for(value) if isinstance(check, Check)
                       else f"failed check {getattr(check, '__name__', '')}")
            if not ok:
                errors.append((path, f"{msg}; got {value!r}"))
                continue
        kwargs[name] = value
    if len(errors) > n_errors:
        return None  # problems already recorded; report them all before constructing anything
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ cross-field checks
        message = str(exc)
        head, _, rest = message.partition(": ")
        if head in fields_ and rest:  # "train: the file ... does not exist" -> prompts.train: the file ...
            errors.append((prefix + head, rest))
        else:
            errors.append((prefix.rstrip(".") or cls.__name__, message))
        return None


def build_config(cls: type[C], *layers: Mapping[str, Any] | None) -> C:
    """Merge `layers` (nested or dotted mappings; later wins; None skipped) over `cls`'s defaults, validate,
    and return an instance of `cls`. Raises ConfigError listing every problem by field path."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"build_config takes a dataclass type; got {cls!r}")
    merged: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        if layer is None:
            continue
        if not isinstance(layer, Mapping):
            raise ConfigError([(f"<layer {i}>", f"a config must be a mapping; {_got(layer)}")])
        merged = _merge(merged, _expand_dotted(layer, f"<layer {i}>"))
    errors: list[tuple[str, str]] = []
    config = _build(cls, merged, "", errors, cls)
    if errors:
        raise ConfigError(errors)
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) config file into a (nested) dict."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError([(str(path), "unknown config file type; use .yaml, .yml, .toml or .json")], header="")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read config file: {exc.strerror or exc}")], header="") from exc
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ModuleNotFoundError as exc:
        raise ConfigError([(str(path), f"reading {suffix} files needs the package {exc.name!r}")], header="") from exc
    except Exception as exc:  # parse errors of any of the three parsers
        raise ConfigError([(str(path), f"cannot parse: {exc}")], header="") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError([(str(path), f"the top level must be a mapping of keys; got {type(data).__name__}")],
                          header="")
    return dict(data)


def load_config(cls: type[C], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """defaults < file at `path` (YAML/TOML/JSON by extension) < `overrides` (nested or dotted keys); validated.

    Raises ConfigError naming every bad field (unknown keys with a did-you-mean, wrong types, failed checks)."""
    return build_config(cls, read_config_file(path) if path is not None else None, overrides)


# ---------------------------------------------------------------------------------------------- dumping


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def dump_config(config: Any) -> dict[str, Any]:
    """The config as a nested dict of plain values (tuples -> lists, paths -> str), ready for YAML/JSON;
    `build_config(type(config), dump_config(config)) == config`."""
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise TypeError(f"dump_config takes a config dataclass instance; got {type(config).__name__}")
    return _plain(config)


def config_yaml(config: Any) -> str:
    """The config as YAML text: sections as blocks, lists of plain values inline (`betas: [0.9, 0.999]`)."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _list(dumper: yaml.SafeDumper, data: list) -> Any:
        flow = all(not isinstance(v, (list, dict)) for v in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    _Dumper.add_representer(list, _list)
    data = config if isinstance(config, Mapping) else dump_config(config)
    return yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_diff(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """Fields that differ between two configs (instances or dumped dicts): {"optim.lr": (old, new)}.
    A key present on one side only shows `dataclasses.MISSING` on the other."""
    a = flatten(dump_config(old) if not isinstance(old, Mapping) else old)
    b = flatten(dump_config(new) if not isinstance(new, Mapping) else new)
    missing = dataclasses.MISSING
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)}


# ---------------------------------------------------------------------------------------------- argparse


def _none_or(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _json_value(text: str) -> Any:
    return json.loads(text)


_json_value.__name__ = "JSON"


def _cli_spec(tp: Any) -> dict[str, Any]:
    """argparse kwargs (type / nargs / choices / metavar) for a leaf type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        spec = _cli_spec(rest[0]) if len(rest) == 1 else {"type": _json_value, "metavar": "JSON"}
        if type(None) in args and "type" in spec and "choices" not in spec:
            spec["type"] = _none_or(spec["type"])
        elif type(None) in args and "choices" in spec:
            spec["choices"] = [*spec["choices"], None]
            spec["type"] = _none_or(spec["type"])
        return spec
    if origin is Literal:
        kind = type(args[0])
        return {"type": kind, "choices": list(args), "metavar": "{" + ",".join(str(a) for a in args) + "}"}
    if tp in (int, float, str) or tp is Path:
        return {"type": tp, "metavar": {int: "INT", float: "FLOAT", str: "STR"}.get(tp, "PATH")}
    if origin in (tuple, list) or tp in (tuple, list):
        elem = args[0] if args else str
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            nargs: int | str = len(args)
        else:
            nargs = "*"
        inner = _cli_spec(elem) if elem is not Any else {"type": str}
        return {"type": inner["type"], "nargs": nargs, "metavar": inner.get("metavar", "VALUE")}
    return {"type": _json_value, "metavar": "JSON"}


def add_arguments(parser: Any, cls: type, *, group_sections: bool = True) -> None:
    """Add one command-line option per leaf of config class `cls` to an argparse parser: `--name` for
    top-level fields, `--section.name` inside sections; bools as `--x / --no-x`; sequences take several
    values; Optional fields take "none". Help shows the field's help text and default. Options given on the
    command line are collected by `overrides_from_args(args)`; absent ones leave the config untouched."""
    import argparse

    groups: dict[str, Any] = {}
    for fi in iter_fields(cls):
        prefix = fi.path.rsplit(".", 1)[0] if "." in fi.path else ""
        target = groups.get(prefix, parser) if group_sections else parser
        if fi.is_section:
            if group_sections:
                title = f"{fi.path} options"
                groups[fi.path] = parser.add_argument_group(title, fi.help or None)
            continue
        default = fi.default
        shown = "required" if default is dataclasses.MISSING else f"default: {_plain(default)!r}"
        help_text = (f"{fi.help} ({shown})" if fi.help else f"({shown})").replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": _DEST_PREFIX + fi.path, "default": argparse.SUPPRESS, "help": help_text}
        tp = fi.type
        bool_like = tp is bool or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                   and set(typing.get_args(tp)) == {bool, type(None)})
        if bool_like:
            target.add_argument(f"--{fi.path}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        spec = _cli_spec(tp)
        if fi.field.metadata.get("metavar"):
            spec["metavar"] = fi.field.metadata["metavar"]
        if "choices" in spec:
            spec.pop("metavar", None)
        target.add_argument(f"--{fi.path}", **kwargs, **spec)


def overrides_from_args(args: Any) -> dict[str, Any]:
    """The config options given on the command line (parsed by a parser set up with `add_arguments`), as a
    dotted mapping for `build_config` / `load_config`'s overrides."""
    return {k[len(_DEST_PREFIX):]: v for k, v in vars(args).items() if k.startswith(_DEST_PREFIX)}
