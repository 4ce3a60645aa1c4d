"""`Run`: the run folder every trainer writes, and resuming it.

    out_dir/
        config.yaml       the resolved config (rewritten on resume, with the allowed changes)
        train.log         plain text: `2025-01-31 12:00:01 step=12 reward_mean=0.41 loss=-0.0123`, plus messages
                          and the "fusedrl" logger's warnings while the run is open
        metrics.csv       a row per `log()` call, a column per metric (see metrics.py)
        metrics.png       metric curves (rewards by default), redrawn at each checkpoint, `plot()` and close
        tensorboard/      TensorBoard event files (when the `tensorboard` package is installed)
        samples/          sample-image grids, `step-00000050.png` (`save_image_grid(step, ..., tag="samples")`), or
                          text samples, `step-00000050.jsonl` (`save_text_samples`)
        checkpoints/      `step-XXXXXXXX/` folders and a `latest` pointer (see checkpoint.py)

Steps are numbered from 1; `start_step` is the number of steps already done (0, or the step of the checkpoint
a resumed run starts from); `steps()` yields start_step + 1 .. total_steps and drives the progress bar.

Resuming (`Run(out_dir, config, resume=True)`): the highest complete checkpoint is found; metrics.csv rows
logged after it are deleted and TensorBoard purges its events after it, because the steps after the last
checkpoint are recomputed (a killed run loses no checkpointed step and logs no step twice). The config must
equal the saved one except for fields declared `resume_ok=True` (total steps, logging cadence) and fields named
in `allow_changed`; otherwise a ConfigError names each differing field. With no checkpoint yet, the run starts
again from step 0 (metrics cleared). Resuming a folder with no config.yaml is an error (a mistyped --out would
otherwise start a whole new run).

Starting a new run (resume=False) in a folder that holds a run refuses, unless that run saved no checkpoint (it
stopped at a bad option or crashed early): then it starts over there, as --resume would, with the new config.

Several processes: pass `rank` (default: $RANK, else 0). Only rank 0 writes anything; on other ranks `log`,
`save_checkpoint`, `save_image_grid` and `plot` do nothing, while `load_checkpoint` works on every rank. Each
rank restores the RNG state rank 0 saved; a multi-process trainer derives per-rank streams from (seed, rank,
step) or passes its own `rng=` (e.g. gathered per-rank states) to `save_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import (
    ConfigError,
    build_config,
    config_diff,
    config_yaml,
    dump_config,
    field,
    flatten,
    ge,
    gt,
    leaf_paths,
    resume_ok_fields,
)
from . import checkpoint as ckpt_io
from .atomic import atomic_write_text
from .checkpoint import Checkpoint
from .metrics import RESERVED, MetricsCSV, reward_summary, to_float
from .rng import capture_rng, restore_rng

log = logging.getLogger("fusedrl")

CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
METRICS_FILE = "metrics.csv"
PLOT_FILE = "metrics.png"
TB_DIR = "tensorboard"
CKPT_DIR = "checkpoints"
SAMPLES_DIR = "samples"


class RunError(RuntimeError):
    """A run folder cannot be used as asked (e.g. it already holds a run and resume was not requested)."""


@dataclasses.dataclass
class RunConfig:
    """The `run` section shared by every trainer: length, seed, cadence of logging / eval / checkpoints."""

    steps: int = field(100, "optimisation steps in total", check=gt(0), resume_ok=True)
    seed: int = field(0, "seed for torch, numpy and Python's random (sampling noise derives from it)")
    log_every: int = field(1, "log metrics every N steps", check=gt(0), resume_ok=True)
    eval_every: int = field(0, "evaluate (and save a sample grid) every N steps; 0: never", check=ge(0),
                            resume_ok=True)
    checkpoint_every: int = field(50, "save a checkpoint every N steps and after the last; 0: only after the last",
                                  check=ge(0), resume_ok=True)
    keep_checkpoints: int = field(2, "keep the newest N checkpoints; 0: keep all", check=ge(0), resume_ok=True)
    tensorboard: bool = field(True, "write TensorBoard event files (needs the tensorboard package)",
                              resume_ok=True)
    progress: bool = field(True, "show a progress bar", resume_ok=True)
    cuda_extension: bool = field(True, "on a GPU, build (once, about a minute per kernel file; cached under "
                                 "~/.cache/fusedrl or $FUSEDRL_CACHE_DIR) or load fusedrl's CUDA kernels before the "
                                 "model loads; false: a cached build if there is one, else the Triton kernels",
                                 resume_ok=True)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")



def _clear_unsaved_run(out_dir: Path) -> list[str]:
    """Remove what a run that saved no checkpoint left in `out_dir` (its metrics, plot, TensorBoard events, sample
    grids; train.log stays and goes on); the names removed."""
    from .atomic import remove_tree

    removed = []
    for name in (METRICS_FILE, PLOT_FILE, TB_DIR, SAMPLES_DIR, CKPT_DIR):
        path = out_dir / name
        if path.is_dir():
            remove_tree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _check_fields(config_type: type, paths: set[str]) -> None:
    """ConfigError naming each of `paths` (--allow-change FIELD) that is no field of `config_type`: a typo would
    allow nothing and refuse the change it meant to allow, or pass a resume it should not."""
    import difflib

    if not dataclasses.is_dataclass(config_type):
        return
    leaves = leaf_paths(config_type)
    errors = []
    for path in sorted(paths - set(leaves)):
        close = difflib.get_close_matches(path, leaves, n=1, cutoff=0.6)
        errors.append(("--allow-change", f"{path!r} is no field of the config"
                       + (f"; did you mean {close[0]!r}?" if close else "")))
    if errors:
        raise ConfigError(errors)

class Run:
    """The run folder of one training run (see the module docstring for its layout and resume rules).

    out_dir:          the run folder (created).
    config:           the resolved config dataclass (written to config.yaml, compared on resume).
    resume:           continue the run in out_dir; False refuses a folder that already holds a run.
    total_steps, keep_checkpoints, tensorboard, progress: default to `config.run`'s fields when the config has
                      a `run: RunConfig` section, else 0 (no bar total), 0 (keep all), True, True.
    allow_changed:    dotted field paths that may differ from the saved config on resume.
    rank:             process rank (default $RANK or 0); only rank 0 writes.
    progress_keys:    metrics shown on the progress bar (default: the first four of each `log` call).
    plot_keys:        metrics drawn in metrics.png (default: those with "reward" in the name, else losses).
    """

    def __init__(self, out_dir: str | Path, config: Any, *, resume: bool = False, total_steps: int | None = None,
                 allow_changed: Iterable[str] = (), rank: int | None = None, keep_checkpoints: int | None = None,
                 tensorboard: bool | None = None, progress: bool | None = None,
                 progress_keys: Sequence[str] | None = None, plot_keys: Sequence[str] | None = None):
        self.out_dir = Path(out_dir)
        self.config = config
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
        self.is_main = self.rank == 0
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))  # recorded in checkpoints
        run_cfg = getattr(config, "run", None)
        run_cfg = run_cfg if isinstance(run_cfg, RunConfig) else None

        def pick(value: Any, name: str, fallback: Any) -> Any:
            if value is not None:
                return value
            return getattr(run_cfg, name) if run_cfg is not None else fallback

        self.total_steps = int(pick(total_steps, "steps", 0))
        self.keep_checkpoints = int(pick(keep_checkpoints, "keep_checkpoints", 0))
        self.progress_keys = list(progress_keys) if progress_keys is not None else None
        self.plot_keys = list(plot_keys) if plot_keys is not None else None
        self.start_step = 0
        self.checkpoint_path: Path | None = None
        self._closed = False
        self._log_fh = None
        self._log_handler: logging.Handler | None = None
        self._tb = None
        self._bar = None
        self._metrics: MetricsCSV | None = None
        self._started_over: list[str] = []

        allow_changed = set(allow_changed)
        _check_fields(type(config), allow_changed)
        self.allow_changed = frozenset(allow_changed)
        changes = self._prepare_folder(resume, allow_changed)
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / CONFIG_FILE, config_yaml(config))
        self._log_fh = open(self.out_dir / LOG_FILE, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._attach_logger()
        self._metrics = MetricsCSV(self.out_dir / METRICS_FILE)
        ckpt_io.prune_checkpoints(self.out_dir / CKPT_DIR, 0)  # clear temporaries left by a crash
        if self._started_over:
            self.info(f"started over: {self.out_dir} held a run that saved no checkpoint (cleared: "
                      f"{', '.join(self._started_over)})")
        if resume:
            dropped = self._metrics.truncate_after(self.start_step)
            where = f"checkpoint {self.checkpoint_path}" if self.checkpoint_path else "the beginning (no checkpoint)"
            self.info(f"resumed at step={self.start_step} from {where}; dropped {dropped} metric rows logged after "
                      f"it (those steps are recomputed)")
            for path, (old, new) in changes.items():
                self.info(f"config changed on resume: {path}: {old!r} -> {new!r}")
        else:
            self.info(f"started run in {self.out_dir} (total steps: {self.total_steps or 'unknown'})")
        if pick(tensorboard, "tensorboard", True):
            self._open_tensorboard(purge_step=self.start_step + 1 if resume else None)
        if pick(progress, "progress", True):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps or None, initial=self.start_step, unit="step",
                             dynamic_ncols=True, desc=self.out_dir.name)

    # ------------------------------------------------------------------------------------------ set-up

    @classmethod
    def resume(cls, out_dir: str | Path, config: Any, **kwargs: Any) -> Run:
        """`Run(out_dir, config, resume=True, **kwargs)`."""
        return cls(out_dir, config, resume=True, **kwargs)

    @staticmethod
    def saved_config(out_dir: str | Path) -> dict[str, Any] | None:
        """The config saved in a run folder (config.yaml) as a nested dict, or None when there is none."""
        path = Path(out_dir) / CONFIG_FILE
        if not path.exists():
            return None
        from ..config import read_config_file

        return read_config_file(path)

    def _prepare_folder(self, resume: bool, allow_changed: set[str]) -> dict[str, tuple[Any, Any]]:
        """Check the folder against `resume`; on resume, compare configs and find the checkpoint."""
        existing = [n for n in (CONFIG_FILE, METRICS_FILE, CKPT_DIR) if (self.out_dir / n).exists()]
        if not resume:
            if existing and self.is_main:
                if self.has_checkpoint or not (self.out_dir / CONFIG_FILE).is_file():
                    raise RunError(f"{self.out_dir} already holds a run ({', '.join(existing)}); resume it "
                                   "(--resume / resume=True) or choose another output folder")
                # a run that stopped before its first checkpoint (a bad option, a crash): nothing to resume from;
                # start over in its folder, as --resume would, with the new config
                self._started_over = _clear_unsaved_run(self.out_dir)
            return {}
        saved = self.saved_config(self.out_dir)
        if saved is None:
            raise RunError(f"nothing to resume in {self.out_dir} (no {CONFIG_FILE}): check --out, or start a new run "
                           "without --resume")
        try:
            saved_cfg = build_config(type(self.config), saved)
        except ConfigError as exc:
            raise ConfigError(exc.errors, header=f"the config saved in {self.out_dir / CONFIG_FILE} does not "
                              f"fit {type(self.config).__name__}") from exc
        changes = config_diff(saved_cfg, self.config)
        allowed = resume_ok_fields(type(self.config)) | allow_changed
        refused = {p: d for p, d in changes.items() if p not in allowed}
        if refused:
            raise ConfigError([(p, f"saved {old!r}, now {new!r}") for p, (old, new) in refused.items()],
                              header=f"cannot resume {self.out_dir} with a different config (allow a change "
                              "with --allow-change FIELD / allow_changed=)")
        found = ckpt_io.latest_checkpoint(self.out_dir / CKPT_DIR)
        if found is not None:
            self.start_step, self.checkpoint_path = found
        return changes

    @property
    def has_checkpoint(self) -> bool:
        """Whether the folder holds a complete checkpoint (what --resume continues from)."""
        return ckpt_io.latest_checkpoint(self.out_dir / CKPT_DIR) is not None

    def _attach_logger(self) -> None:
        handler = logging.StreamHandler(self._log_fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handler.setLevel(logging.INFO)
        log.addHandler(handler)
        self._log_handler = handler

    def _open_tensorboard(self, purge_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except (ImportError, ModuleNotFoundError) as exc:
            self.info(f"TensorBoard events not written ({exc}); pip install tensorboard")
            return
        self._tb = SummaryWriter(log_dir=str(self.out_dir / TB_DIR), purge_step=purge_step)

    # ------------------------------------------------------------------------------------------ the loop

    def load_checkpoint(self, *, map_location: str | torch.device = "cpu", restore_rng_state: bool = True,
                        generators: Mapping[str, torch.Generator] | None = None,
                        weights_only: bool = True) -> Checkpoint | None:
        """The checkpoint a resumed run starts from (None on a fresh run), with the RNG states restored
        (torch, CUDA, numpy, random, and `generators` by name). Call it after building the model and optimizer
        (their random initialisation must not consume the restored streams) and before the first step."""
        if self.checkpoint_path is None:
            return None
        ckpt = ckpt_io.read_checkpoint(self.checkpoint_path, map_location=map_location, weights_only=weights_only)
        if restore_rng_state and ckpt.rng is not None:
            restore_rng(ckpt.rng, generators)
        return ckpt

    def _flat_config(self) -> dict[str, Any] | None:
        if not dataclasses.is_dataclass(self.config):
            return None
        return {path: (value if isinstance(value, (int, float, str, bool, type(None))) else str(value))
                for path, value in flatten(dump_config(self.config)).items()}

    def check_world_size(self, *, per_process_batch: str | None = None, samples_follow_rank: bool = False) -> None:
        """On resuming with another number of processes than the run that saved the checkpoint: refuse, or say what
        changes. Call it before building anything (it reads the checkpoint's state.json only).

        per_process_batch: the config field (dotted) that sets a per-process batch: the global batch would change
            with the process count, so the resume is refused (ConfigError) unless that field is in allow_changed.
        samples_follow_rank: each process draws its own samples; the run goes on with the same global batch, and a
            train.log line says that the samples from here on differ from an uninterrupted run.
        Otherwise the change is only noted in train.log. Checkpoints that did not record it are not checked."""
        meta = {} if self.checkpoint_path is None else ckpt_io.read_meta(self.checkpoint_path)
        saved, now = meta.get("world_size"), self.world_size
        if saved is None or saved == now:
            return
        where = (f"resumed on {now} process{'es' * (now != 1)}; checkpoint {self.checkpoint_path.name} was saved by "
                 f"{saved}")
        if per_process_batch is not None:
            value = self._flat_config()[per_process_batch]
            old = (meta.get("config") or {}).get(per_process_batch, value)  # what the checkpoint trained with
            if saved * old != now * value:
                if per_process_batch not in self.allow_changed:
                    hint = ""
                    if (saved * value) % now == 0:
                        hint = (f"pass --{per_process_batch} {saved * value // now} --allow-change {per_process_batch} "
                                f"to keep them, or ")
                    raise ConfigError([(per_process_batch, f"{where}: {per_process_batch} = {value} per process made "
                                        f"{saved * value} samples per step, {now * value} now; {hint}--allow-change "
                                        f"{per_process_batch} to accept the change")], header="cannot resume")
                self.info(f"{where}: {saved * old} -> {now * value} samples per step ({per_process_batch} "
                          f"{old} -> {value} per process)")
                return
        if samples_follow_rank:
            self.info(f"{where}: same global batch, but each process samples its own share, so the samples from here "
                      f"on differ from those of an uninterrupted run on {saved}")
        else:
            self.info(f"{where}: same global batch and samples")

    def steps(self) -> Iterator[int]:
        """Yield the steps still to do, start_step + 1 .. total_steps; advances the progress bar after each."""
        if self.total_steps <= 0:
            raise ValueError("Run.steps() needs total_steps (or config.run.steps) > 0")
        for step in range(self.start_step + 1, self.total_steps + 1):
            yield step
            if self._bar is not None:
                self._bar.update(1)

    def every(self, step: int, n: int) -> bool:
        """True when a cadence of `n` steps falls on `step`: n > 0 and (step % n == 0 or `step` is the last
        step). n <= 0 never fires; use `is_last(step)` for "only after the last step"."""
        return n > 0 and (step % n == 0 or step == self.total_steps)

    def is_last(self, step: int) -> bool:
        """True at the run's last step (total_steps)."""
        return step == self.total_steps

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record metrics of `step`: a metrics.csv row, a train.log line, TensorBoard scalars, the bar's postfix.
        Values: numbers or one-element tensors (`.item()` is called here; that synchronizes a GPU)."""
        values = {}
        for name, value in metrics.items():
            if name in RESERVED:
                raise ValueError(f"metric name {name!r} is reserved (metrics.csv has a {name!r} column)")
            values[name] = to_float(name, value)
        if not self.is_main:
            return
        self._metrics.append(step, values, time.time())
        self._log_fh.write(f"{_now()} step={step} " + " ".join(f"{k}={v:.6g}" for k, v in values.items()) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
        if self._bar is not None:
            keys = self.progress_keys if self.progress_keys is not None else list(values)[:4]
            self._bar.set_postfix({k: f"{values[k]:.4g}" for k in keys if k in values}, refresh=False)

    def info_reward_summary(self, key: str = "reward_mean") -> None:
        """Write how `key` moved over the run (first steps vs last steps, `reward_summary`) to train.log and the
        console, when metrics.csv has it."""
        if not self.is_main:
            return
        self._metrics.sync()
        summary = reward_summary(self.out_dir / METRICS_FILE, key)
        if summary:
            self.info(summary)

    def info_peak_memory(self, device: Any) -> None:
        """On a CUDA device: write its peak allocated memory (`torch.cuda.max_memory_allocated`) to train.log."""
        device = torch.device(device)
        if device.type == "cuda":
            self.info(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")

    def info(self, message: str) -> None:
        """Write a message line to train.log and to the console (above the progress bar)."""
        if not self.is_main:
            return
        if self._log_fh is not None:
            self._log_fh.write(f"{_now()} {message}\n")
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def save_checkpoint(self, step: int, tensors: Mapping[str, torch.Tensor] | None = None,
                        state: Mapping[str, Any] | None = None, objects: Mapping[str, Any] | None = None, *,
                        rng: Mapping[str, Any] | None = None,
                        generators: Mapping[str, torch.Generator] | None = None,
                        write_extra: Callable[[Path], None] | None = None) -> Path | None:
        """Save the state after `step` atomically (see checkpoint.py) and prune to the newest N.

        tensors: model / LoRA / EMA weights (safetensors); state: JSON-serializable trainer state (data
        position, counters); objects: optimizer / scheduler / scaler state dicts (torch.save); rng: defaults to
        `capture_rng(generators)`; write_extra(folder): more files inside the checkpoint. metrics.csv and
        train.log are fsynced first, and metrics.png is redrawn. Returns the folder (None on ranks != 0)."""
        if not self.is_main:
            return None
        self._metrics.sync()
        self._log_fh.flush()
        os.fsync(self._log_fh.fileno())
        rng = dict(rng) if rng is not None else capture_rng(generators)
        path = ckpt_io.write_checkpoint(self.out_dir / CKPT_DIR, step, tensors, state, objects, rng, write_extra,
                                        world_size=self.world_size, config=self._flat_config())
        removed = ckpt_io.prune_checkpoints(self.out_dir / CKPT_DIR, self.keep_checkpoints)
        self._log_fh.write(f"{_now()} checkpoint step={step} path={path}"
                           + (f" pruned={','.join(p.name for p in removed)}" if removed else "") + "\n")
        if self._tb is not None:
            self._tb.flush()
        self.plot()
        return path

    def save_image_grid(self, step: int, images: Any, captions: Sequence[str] | None = None, *,
                        tag: str = "samples", nrow: int | None = None) -> Path | None:
        """Save images [B, 3, H, W] in [0, 1] (tensor or array) as a captioned grid `<tag>/step-XXXXXXXX.png`
        (and as a TensorBoard image under `tag`). Returns the PNG path (None on ranks != 0)."""
        if not self.is_main:
            return None
        from .atomic import atomic_write
        from .images import make_image_grid

        grid = make_image_grid(images, captions, nrow)
        path = atomic_write(self.out_dir / tag / f"{ckpt_io.step_dir_name(step)}.png",
                            lambda p: grid.save(p, format="PNG"))
        if self._tb is not None:
            import numpy as np

            self._tb.add_image(tag, np.asarray(grid), step, dataformats="HWC")
        return path

    def save_text_samples(self, step: int, rows: Sequence[Mapping[str, Any]], *, tag: str = "samples") -> Path | None:
        """Save rows (JSON objects: prompt, completion, reward, ...) as `<tag>/step-XXXXXXXX.jsonl`, a line each
        (and the first few as a TensorBoard text under `tag`). Returns the path (None on ranks != 0)."""
        if not self.is_main:
            return None
        import json

        from .atomic import atomic_write_text

        text = "".join(json.dumps(dict(row), ensure_ascii=False, default=str) + "\n" for row in rows)
        path = atomic_write_text(self.out_dir / tag / f"{ckpt_io.step_dir_name(step)}.jsonl", text)
        if self._tb is not None and rows:
            lines = [f"{row.get('prompt', '')!r} -> {row.get('completion', '')!r} (reward {row.get('reward')})"
                     for row in rows[:8]]
            self._tb.add_text(tag, "\n\n".join(lines), step)
        return path

    def plot(self, keys: Sequence[str] | None = None) -> Path | None:
        """Redraw metrics.png from metrics.csv (keys: default `plot_keys`). Skipped without matplotlib."""
        if not self.is_main:
            return None
        from .plots import plot_metrics

        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            if not getattr(self, "_warned_plot", False):
                self._warned_plot = True
                self.info("metrics.png not drawn: pip install matplotlib")
            return None
        self._metrics.sync()
        return plot_metrics(self.out_dir / METRICS_FILE, self.out_dir / PLOT_FILE,
                            keys if keys is not None else self.plot_keys, title=self.out_dir.name)

    # ------------------------------------------------------------------------------------------ closing

    def close(self, error: BaseException | None = None) -> None:
        """Flush and close everything (idempotent); notes in train.log how the run ended."""
        if self._closed:
            return
        self._closed = True
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if error is not None:
            what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"stopped by {type(error).__name__}"
            self.info(f"{what}: {error}; " + (
                "continue with --resume (steps after the last checkpoint are recomputed)" if self.has_checkpoint else
                "no checkpoint was saved: run the command again (the same --out starts over)"))
        try:
            self.plot()
        except Exception as exc:  # a failed plot must not hide the run's own outcome
            self.info(f"metrics.png not drawn: {exc}")
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._metrics is not None:
            self._metrics.close()
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler = None
        if self._log_fh is not None:
            self._log_fh.write(f"{_now()} closed\n")
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)

    def __repr__(self) -> str:
        return f"Run({str(self.out_dir)!r}, step {self.start_step}/{self.total_steps}, rank {self.rank})"


__all__ = ["CKPT_DIR", "CONFIG_FILE", "LOG_FILE", "METRICS_FILE", "PLOT_FILE", "Run", "RunConfig", "RunError",
           "TB_DIR"]
