#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels that the GPU machine lacks (it has no
# internet; its image has torch, Triton, transformers, peft, accelerate): the peers the benchmarks
# compare against and the libraries the drop-in tests use. They go to .whl/ (ignored by git), which
# the device call carries and benchmarks/gpu_check.sh installs into /tmp/site.
#
#   benchmarks/fetch_wheels.sh            # then: run with carry=[".whl"], command benchmarks/gpu_check.sh ...
#
# The image has pandas, pyarrow, fsspec, xxhash and aiohttp (device tool's KINDS.md), not datasets, dill
# or multiprocess: those three come too (< 1 MB), so that trl.trainer.utils imports there (the backward of
# TRL's fused LM head imports it; the 2026-11-27 H200 run lacked it). fusedrl/bench/trl_peer.py keeps
# that backward working even where they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" "trl==1.16.0" "diffusers==0.42.1" "importlib-metadata" \
    "zipp" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
du -sh .whl
