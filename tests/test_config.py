"""engine.config: dataclass configs from YAML/TOML files and CLI options, validated with errors naming the field."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from fusedrl.engine.config import (
    Check,
    ConfigError,
    add_arguments,
    between,
    build_config,
    config_diff,
    dump_config,
    field,
    gt,
    load_config,
    overrides_from_args,
    read_config_file,
    resume_ok_fields,
    section,
)


@dataclass
class Optim:
    lr: float = field(1e-4, "learning rate", check=gt(0))
    betas: tuple[float, float] = field((0.9, 0.999), "Adam betas")
    clip: float | None = field(1.0, "gradient-norm clip; none: off")


@dataclass
class Lora:
    rank: int = field(8, "LoRA rank", check=Check(lambda v: v & (v - 1) == 0, "must be a power of two"))
    targets: list[str] = field(["to_q", "to_k"], "modules to adapt")

    def __post_init__(self):
        if not self.targets:
            raise ValueError("targets must name at least one module")


@dataclass
class Cfg:
    model: str | None = field(None, "model path or hub id; none: the embedded tiny model")
    scheduler: Literal["sde", "cps"] = field("sde", "SDE step kind")
    noise_level: float = field(0.7, "SDE noise level a", check=between(0, 1))
    steps: int = field(10, "denoising steps", check=gt(0), resume_ok=True)
    cfg_scale: float = field(4.5, "guidance scale (100% = plain)")
    ema: bool = field(False, "keep an EMA of the weights")
    out: Path = field(Path("x"), "a path")
    extra: dict[str, float] = field({}, "reward kwargs")
    optim: Optim = section(Optim, "optimizer")
    lora: Lora = section(Lora, "LoRA")


def test_defaults_and_independent_mutable_defaults():
    a, b = build_config(Cfg), build_config(Cfg)
    assert a == Cfg() and a.optim.betas == (0.9, 0.999) and a.lora.targets == ["to_q", "to_k"]
    a.lora.targets.append("to_v")
    assert b.lora.targets == ["to_q", "to_k"]


def test_yaml_and_toml_files_with_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    # PyYAML reads 3e-5 (no dot) as a string: float fields accept it
    y.write_text("scheduler: cps\noptim:\n  lr: 3e-5\n  betas: [0.8, 0.9]\nlora: {rank: 4}\nmodel: null\n")
    cfg = load_config(Cfg, y, overrides={"optim.lr": 1e-3, "lora": {"targets": ["proj"]}})
    assert cfg.scheduler == "cps" and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.lora == Lora(rank=4, targets=["proj"]) and cfg.model is None
    t = tmp_path / "c.toml"
    t.write_text('steps = 3\n[optim]\nlr = 2e-4\nclip = 0.5\n[extra]\nw = 1\n')
    cfg = load_config(Cfg, t)
    assert cfg.steps == 3 and cfg.optim.lr == 2e-4 and cfg.optim.clip == 0.5 and cfg.extra == {"w": 1.0}
    assert load_config(Cfg, y).optim.lr == 3e-5


def test_errors_name_every_bad_field_at_once():
    with pytest.raises(ConfigError) as info:
        build_config(Cfg, {"optim": {"lrr": 1, "betas": [0.9], "clip": "x"}, "lr": 1, "steps": 0.5,
                           "ema": "yes", "scheduler": "sd", "noise_level": 2, "model": 3,
                           "lora": {"rank": 6}, "nosuch": 1})
    errors = dict(info.value.errors)
    assert "did you mean 'optim.lr'" in errors["optim.lrr"]
    assert "did you mean 'optim.lr'" in errors["lr"]  # a leaf name given at the wrong level
    assert errors["nosuch"] == "unknown key"
    assert "expected 2 values" in errors["optim.betas"]
    assert "expected a number" in errors["optim.clip"]
    assert "expected an integer" in errors["steps"]
    assert "true or false" in errors["ema"]
    assert "did you mean 'sde'" in errors["scheduler"]
    assert errors["noise_level"] == "must be in [0, 1]; got 2.0"
    assert "quote it" in errors["model"]
    assert errors["lora.rank"] == "must be a power of two; got 6"
    assert str(info.value).startswith("invalid config:\n  ")
    assert "optim.lrr: unknown key; did you mean 'optim.lr'?" in str(info.value)
    with pytest.raises(ConfigError, match=r"nlvl: unknown key; did you mean 'noise_level'\?"):
        build_config(Cfg, {"nlvl": 0.5})  # an abbreviation
    with pytest.raises(ConfigError) as info:
        build_config(Cfg, {"optim": {"x": 1}})
    assert "did you mean 'optim'" not in str(info.value)  # a section is no suggestion for a key with a value


def test_check_and_strictness_details():
    with pytest.raises(ConfigError, match=r"optim.lr: must be > 0; got -1.0"):
        build_config(Cfg, {"optim.lr": -1})
    for bad in (float("inf"), float("nan"), "inf"):  # > 0, yet no learning rate (gt / ge refuse non-finite values)
        with pytest.raises(ConfigError, match=r"optim.lr: must be a finite number \(must be > 0\); got (inf|nan)"):
            build_config(Cfg, {"optim.lr": bad})
    with pytest.raises(ConfigError, match="steps: expected an integer; got True"):
        build_config(Cfg, {"steps": True})
    with pytest.raises(ConfigError, match="expected a section"):
        build_config(Cfg, {"optim": 3})
    with pytest.raises(ConfigError, match=r"lora: targets must name at least one module"):
        build_config(Cfg, {"lora.targets": []})
    assert build_config(Cfg, {"steps": 4.0}).steps == 4 and build_config(Cfg, {"optim.clip": None}).optim.clip is None


def test_required_field():
    @dataclass
    class Req:
        n: int = field(help="required")

    with pytest.raises(ConfigError, match="n: required"):
        build_config(Req)
    assert build_config(Req, {"n": 2}).n == 2


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config file type"):
        read_config_file(tmp_path / "c.ini")
    with pytest.raises(ConfigError, match="cannot read"):
        read_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [")
    with pytest.raises(ConfigError, match="cannot parse"):
        read_config_file(bad)
    lst = tmp_path / "l.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        read_config_file(lst)
    (tmp_path / "e.yaml").write_text("")
    assert read_config_file(tmp_path / "e.yaml") == {}


def test_dump_roundtrip_and_diff():
    cfg = build_config(Cfg, {"optim.lr": 0.5, "lora.targets": ["a"]})
    dumped = dump_config(cfg)
    assert dumped["optim"]["betas"] == [0.9, 0.999] and dumped["out"] == "x"
    assert build_config(Cfg, dumped) == cfg
    other = dataclasses.replace(cfg, steps=3, optim=dataclasses.replace(cfg.optim, lr=0.25))
    assert config_diff(cfg, other) == {"optim.lr": (0.5, 0.25), "steps": (10, 3)}
    assert resume_ok_fields(Cfg) == {"steps"}


def test_argparse_options_help_and_overrides(capsys):
    parser = argparse.ArgumentParser(prog="t")
    add_arguments(parser, Cfg)
    args = parser.parse_args(["--optim.lr", "3e-4", "--ema", "--optim.betas", "0.8", "0.95", "--model", "none",
                              "--scheduler", "cps", "--lora.targets", "a", "b", "--optim.clip", "none",
                              "--extra", '{"w": 2}'])
    over = overrides_from_args(args)
    assert over == {"optim.lr": 3e-4, "ema": True, "optim.betas": [0.8, 0.95], "model": None, "scheduler": "cps",
                    "lora.targets": ["a", "b"], "optim.clip": None, "extra": {"w": 2}}
    cfg = build_config(Cfg, over)
    assert cfg.optim.betas == (0.8, 0.95) and cfg.ema is True
    assert overrides_from_args(parser.parse_args(["--no-ema"])) == {"ema": False}
    assert overrides_from_args(parser.parse_args([])) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--scheduler", "ode"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--optim.lr FLOAT learning rate (default: 0.0001)" in out
    assert "--ema, --no-ema keep an EMA of the weights (default: False)" in out
    assert "guidance scale (100% = plain)" in out
    assert "optim options:" in out and "--lora.targets [STR ...]" in out


def test_model_loading_errors_name_the_field():
    from fusedrl.engine.config import model_loading_errors

    class NoMatchingPeftModuleError(ValueError):  # peft's, matched by name (engine.config imports no peft)
        pass

    fields = ("model.model", "lora.target_modules")
    with pytest.raises(ConfigError, match=r"model.model: could not be loaded: no model_index.json"), \
            model_loading_errors(*fields):
        raise OSError("no model_index.json")
    with pytest.raises(ConfigError, match=r"lora.target_modules: Target modules \{'to_qq'\} not found"), \
            model_loading_errors(*fields):
        raise NoMatchingPeftModuleError("Target modules {'to_qq'} not found")
    with pytest.raises(ValueError, match="something else"), model_loading_errors(*fields):  # others pass through
        raise ValueError("something else")
