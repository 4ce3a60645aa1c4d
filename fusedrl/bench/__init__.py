"""Microbenchmarks: `fusedrl bench`.

Measures the device's ceilings (copy bandwidth; bf16 matmul on a GPU), then times every case of every
op (cases/<op>.py) on every provider (eager formula, torch.compile, fusedrl's torch / triton / cuda
backends, peers), prints a table and appends rows to a CSV (columns: report.COLUMNS).

The CLI calls `add_arguments(parser)` and then `run(args)`. This module imports nothing heavy, so
building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse

DEFAULT_CSV = "bench_out/results.csv"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `fusedrl bench` to `parser`."""
    parser.add_argument("--ops", default=None, metavar="LIST",
                        help="comma-separated ops: case modules (diffusion_step) or op names "
                        "(flow_sde_step); default: all")
    parser.add_argument("--sizes", choices=("auto", "default", "small"), default="auto",
                        help="default: real model sizes; small: seconds on a CPU (CI); auto: default on a GPU, small "
                        "on a CPU")
    parser.add_argument("--shapes", default=None, metavar="LIST",
                        help="comma-separated shapes to run, as the table prints them (e.g. 24x16x128x128); "
                        "default: every shape of the selected sizes")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: the smallest shape of each op, mode and dtype, few reps (10 on CUDA, "
                        "2 on a CPU, unless --reps), no torch.compile")
    parser.add_argument("--modes", default=None, metavar="LIST",
                        help="comma-separated modes to run (e.g. fwd,fwd+bwd); default: all")
    parser.add_argument("--providers", default=None, metavar="LIST",
                        help="comma-separated providers to run (eager, compile, torch, triton, cuda, ...); "
                        "default: all")
    parser.add_argument("--dtypes", default=None, metavar="LIST",
                        help="comma-separated dtypes of the cases that have a dtype axis (bf16, fp16, fp32, "
                        "fp64); default: bf16,fp32 on CUDA, fp32 on a CPU")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile provider (its first call compiles for ~20 s per case "
                        "on a CPU)")
    parser.add_argument("--reps", type=_positive_int, default=None, metavar="N",
                        help="timed calls per measurement (default: 100 on CUDA, 5 on CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="default: cuda when available, else cpu")
    parser.add_argument("--csv", default=DEFAULT_CSV, metavar="PATH",
                        help=f"append result rows here (header written once; default {DEFAULT_CSV})")
    parser.add_argument("--plot", default=None, metavar="DIR",
                        help="draw one PNG per op into DIR (time, %% of ceiling and peak memory vs shape, a line per "
                        "provider) from the CSV's rows of this device, and print a Markdown summary (needs "
                        "matplotlib)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after timing each provider, run it once more under torch.profiler and write where the "
                        "time goes (matmul, attention, fusedrl's Triton kernels, elementwise, ...) to DIR/profile.csv "
                        "and a report with the top kernels per call")
    parser.add_argument("--from-csv", default=None, metavar="CSV",
                        help="with --plot: draw the charts of this CSV (e.g. benchmarks/results/*.csv) without "
                        "running anything")


def run(args: argparse.Namespace) -> int:
    """Run `fusedrl bench` with parsed `args`.

    Returns the exit status: 0 ok (skips included), 1 a measurement failed, 2 bad arguments.
    """
    from .runner import run_bench

    return run_bench(args)
