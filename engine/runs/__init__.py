"""Run infrastructure shared by every fusedrl trainer: the run folder (`Run`: resolved config, metrics CSV and
TensorBoard, train.log, metric plots, sample grids, progress bar, atomic checkpoints with keep-last-N, exact
resume), RNG capture/restore, and the `Trainer` record that `fusedrl train` runs.

A trainer's loop:

    def train(cfg: MyConfig, run: Run) -> None:
        seed_everything(cfg.run.seed)
        model, opt = build(cfg)                              # before load_checkpoint (it restores RNG)
        ckpt = run.load_checkpoint()                         # None on a fresh run
        pos = 0
        if ckpt:
            model.load_state_dict(ckpt.tensors); opt.load_state_dict(ckpt.objects["optim"]); pos = ckpt.state["pos"]
        for step in run.steps():                             # start_step + 1 .. total, drives the progress bar
            loss, reward, pos = train_step(model, opt, pos)
            if run.every(step, cfg.run.log_every): run.log(step, {"loss": loss, "reward_mean": reward})
            if run.every(step, cfg.run.eval_every): run.save_image_grid(step, sample(model), prompts)
            if run.every(step, cfg.run.checkpoint_every) or run.is_last(step):
                run.save_checkpoint(step, model.state_dict(), {"pos": pos}, {"optim": opt.state_dict()})
"""

from .checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, read_checkpoint, write_checkpoint
from .images import make_image_grid, save_image_grid
from .metrics import read_metrics
from .plots import plot_metrics
from .rng import capture_rng, restore_rng, seed_everything
from .run import Run, RunConfig, RunError
from .trainer import Trainer

__all__ = [
    "Checkpoint",
    "Run",
    "RunConfig",
    "RunError",
    "Trainer",
    "capture_rng",
    "latest_checkpoint",
    "list_checkpoints",
    "make_image_grid",
    "plot_metrics",
    "read_checkpoint",
    "read_metrics",
    "restore_rng",
    "save_image_grid",
    "seed_everything",
    "write_checkpoint",
]
