"""The `fusedrl` command line.

    fusedrl info        versions, GPU / CUDA / nvcc presence, and which backends serve each op
    fusedrl build-ext   compile (or load the cached build of) the CUDA extension
    fusedrl bench       microbenchmarks: device ceilings, then every op vs eager / torch.compile
"""

from __future__ import annotations

import argparse
import logging
import platform
import subprocess
import sys


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
    try:
        forced = dispatch.forced_backend()
    except ValueError as exc:
        print(f"  {dispatch.ENV_BACKEND:<20} invalid: {exc}")
        return 2
    print(f"  {dispatch.ENV_BACKEND:<20} {forced.value if forced else 'unset (auto)'}")
    table = dispatch.availability()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"== ops (backends for {device} tensors; chosen in the order cuda, triton, torch)")
    for op, row in table.items():
        print(f"  {op}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
