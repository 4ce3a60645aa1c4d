"""The `fusedrl` command line.

    fusedrl info        versions, GPU / CUDA / nvcc presence, and which backends serve each op
    fusedrl build-ext   compile (or load the cached build of) the CUDA extension
    fusedrl bench       microbenchmarks: device ceilings, then every op vs eager / torch.compile
    fusedrl train       train a model: `fusedrl train --help` lists the trainers, `fusedrl train NAME --help`
                        documents every option of one
"""

from __future__ import annotations

import argparse
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path


def _versions() -> list[tuple[str, str]]:
    import torch

    import fusedrl

    rows = [("fusedrl", fusedrl.__version__), ("python", platform.python_version()), ("torch", torch.__version__),
            ("torch CUDA runtime", str(torch.version.cuda))]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except Exception as exc:  # report, do not fail: info exists to diagnose broken installs
        rows.append(("triton", f"unavailable ({exc})"))
    return rows


def _nvcc_version(cuda_home) -> str:
    try:
        out = subprocess.run([str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed to run ({exc})"
    release = [line for line in out.splitlines() if "release" in line]
    return release[-1].strip() if release else out.strip()


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from fusedrl.kernels import cuda_ext, dispatch

    print("== versions")
    for name, value in _versions():
        print(f"  {name:<20} {value}")
    print("== devices")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i}  {props.name}  sm_{props.major}{props.minor}  {props.total_memory / 2**30:.0f} GiB")
    else:
        print("  no CUDA device (torch.cuda.is_available() is False): CPU tensors use the torch backend")
    cuda_home = cuda_ext.find_cuda_home()
    print(f"  nvcc                 {'not found' if cuda_home is None else _nvcc_version(cuda_home)}")
    print(f"  CUDA toolkit         {cuda_home or 'not found'}")
    print(f"  CUDA extension       {'loaded' if cuda_ext.is_loaded() else cuda_ext.unavailable_reason()}")
    print(f"  TRITON_INTERPRET     {'1 (Triton runs on the CPU)' if dispatch.triton_interpreting() else 'off'}")
    from fusedrl.kernels.logprobs import hidden_op

    settings = (  # (variable, its reader, how its value is shown); a reader raises ValueError on a bad value
        (dispatch.ENV_BACKEND, dispatch.forced_backend, lambda forced: forced.value if forced else "unset (auto)"),
        (hidden_op.ENV_STRATEGY, hidden_op.strategy,
         lambda strategy: f"{strategy} (token_logprobs on Triton: {', '.join(hidden_op.STRATEGIES)}; auto: chunked "
                          "on CUDA with torch >= 2.8, else fused)"),
    )
    for name, read, show in settings:
        try:
            value = read()
        except ValueError as exc:
            print(f"  {name:<20} invalid: {exc}")
            return 2
        print(f"  {name:<20} {show(value)}")
    table = dispatch.availability()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"== ops (backends for {device} tensors, and the order auto-dispatch tries them in on CUDA tensors)")
    for op, row in table.items():
        spec = dispatch.OPS[op]
        print(f"  {op}  (auto: {', '.join(b.value for b in spec.auto_order if b in spec.backends)})")
        for backend, reason in row.items():
            print(f"    {backend:<7} {'yes' if reason is None else 'no: ' + reason}")
    return 0


def cmd_build_ext(args: argparse.Namespace) -> int:
    from fusedrl.kernels import cuda_ext

    try:
        path = cuda_ext.build(verbose=args.verbose)
    except RuntimeError as exc:
        print(f"fusedrl build-ext: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fusedrl import bench

    return bench.run(args)


TRAIN_USAGE = "fusedrl train NAME [--config FILE] [--out DIR] [--resume] [options]"


def _train_listing() -> str:
    from fusedrl import train_registry

    rows = train_registry.names()
    width = max(len(n) for n, _ in rows)
    lines = [f"usage: {TRAIN_USAGE}", "", "Trainers:"]
    lines += [f"  {name:<{width}}  {help_}" for name, help_ in rows]
    lines += ["", "`fusedrl train NAME --help` documents every option of a trainer. Options also come from a YAML or",
              "TOML file (--config FILE; keys nested by section as in a run folder's config.yaml); command-line",
              "options override the file. Each run writes a run folder (--out): config.yaml, train.log, metrics.csv,",
              "metrics.png, tensorboard/, samples/, checkpoints/; --resume continues it from its latest checkpoint."]
    return "\n".join(lines)


def build_trainer_parser(trainer) -> argparse.ArgumentParser:
    """The option parser of `fusedrl train NAME`: the run-folder options, then one option per config field."""
    from fusedrl.engine.config import add_arguments

    description = trainer.help + (f"\n\n{trainer.description}" if trainer.description else "")
    parser = argparse.ArgumentParser(
        prog=f"fusedrl train {trainer.name}", description=description,
        usage=f"fusedrl train {trainer.name} [--config FILE] [--out DIR] [--resume] [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options override --config FILE (YAML/TOML, keys nested by section), which overrides the defaults; "
        "with --resume the run folder's config.yaml is the base. Steps after the last checkpoint are recomputed "
        "on resume.")
    group = parser.add_argument_group("run folder")
    group.add_argument("--config", metavar="FILE", type=Path, help="YAML (.yaml/.yml) or TOML (.toml) file of options")
    group.add_argument("--out", metavar="DIR", type=Path,
                       help=f"run folder (default: runs/{trainer.name}-YYYYmmdd-HHMMSS; with --resume: the newest "
                       f"runs/{trainer.name}-*)")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its latest checkpoint (a run with no checkpoint restarts)")
    group.add_argument("--allow-change", nargs="+", default=[], metavar="FIELD",
                       help="with --resume: config fields (dotted, e.g. optim.lr) that may differ from the saved run")
    group.add_argument("--dry-run", action="store_true", help="validate the config, print it as YAML, and exit")
    add_arguments(parser, trainer.config)
    return parser


def _default_out(name: str, resume: bool) -> Path:
    if not resume:
        return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    found = sorted(p for p in Path("runs").glob(f"{name}-*") if p.is_dir())
    if not found:
        raise FileNotFoundError(f"--resume without --out: no run folder runs/{name}-* to resume; pass --out DIR")
    return found[-1]


def cmd_train(args: argparse.Namespace) -> int:
    from fusedrl import train_registry

    argv = list(args.train_argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_train_listing(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name.startswith("-"):
        print(f"usage: {TRAIN_USAGE}\nfusedrl train: the trainer NAME comes first (got {name!r})", file=sys.stderr)
        return 2
    try:
        trainer = train_registry.get(name)
    except train_registry.TrainerUnavailable as exc:
        print(f"fusedrl train: {exc}", file=sys.stderr)
        return 2
    opts = build_trainer_parser(trainer).parse_args(rest)

    from fusedrl.engine.config import ConfigError, build_config, config_yaml, overrides_from_args, read_config_file
    from fusedrl.engine.runs import Run, RunError

    prog = f"fusedrl train {name}"
    try:
        out = opts.out if opts.out is not None else _default_out(name, opts.resume)
        layers = [Run.saved_config(out) if opts.resume else None]
        layers.append(read_config_file(opts.config) if opts.config is not None else None)
        layers.append(overrides_from_args(opts))
        config = build_config(trainer.config, *layers)
        if opts.dry_run:
            print(config_yaml(config), end="")
            return 0
        run = Run(out, config, resume=opts.resume, allow_changed=opts.allow_change)
    except (ConfigError, RunError, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        with run:
            rc = trainer.run(config, run)
    except KeyboardInterrupt:
        again = f"continue with: fusedrl train {name} --out {out} --resume" if run.has_checkpoint else \
            "no checkpoint was saved: run the command again to start over"
        print(f"\n{prog}: interrupted; {again}", file=sys.stderr)
        return 130
    return int(rc or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedrl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="log backend choices and fallbacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, devices, and which backends serve each op")
    info.set_defaults(func=cmd_info)
    build = sub.add_parser("build-ext", help="compile the CUDA extension (cached; needs nvcc)",
                           description="Compile csrc/ + bindings/ with ninja into the cache "
                           "(~/.cache/fusedrl, or $FUSEDRL_CACHE_DIR). Without a GPU, set TORCH_CUDA_ARCH_LIST "
                           "(default 9.0).")
    build.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    build.set_defaults(func=cmd_build_ext)
    from fusedrl import bench

    bench_parser = sub.add_parser("bench", help="microbenchmarks: ceilings, then each op vs eager and compile",
                                  description="Measure the device's ceilings, then time every op case on every "
                                  "provider; print a table and append rows to a CSV.")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=cmd_bench)
    # `fusedrl train` parses its own options (they depend on the trainer, imported only when named): listed
    # here for `fusedrl --help`; main() hands everything after "train" to cmd_train.
    train = sub.add_parser("train", help="train a model (`fusedrl train --help` lists the trainers)", add_help=False)
    train.set_defaults(func=cmd_train, train_argv=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command_at is not None and argv[command_at] == "train":
        args = parser.parse_args(argv[: command_at + 1])
        args.train_argv = argv[command_at + 1:]
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
