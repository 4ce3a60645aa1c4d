"""Compile @triton.jit kernels for a GPU architecture without a GPU (ahead of time, in a child process).

The CPU interpreter (TRITON_INTERPRET=1) runs kernels as Python and misses what only the GPU
compiler rejects (e.g. a plain float global read inside a kernel, which failed on an H200 with
Triton 3.6). `triton.compile` with an explicit `GPUTarget` builds the PTX and cubin here, with the
ptxas that Triton ships, so such errors fail CI. It must run where TRITON_INTERPRET is not 1 (the
decorated functions are built at import), hence a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def stack_bytes(cubin):
    # per-thread stack frame of the compiled kernel: register spills (and local arrays) live there
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"STACK:(\d+)", out).group(1))


jobs = json.loads(sys.stdin.read())
failures = []
for job in jobs:
    module = importlib.import_module(job["module"])
    fn = getattr(module, job["kernel"])
    consts = dict(job["constexprs"])
    # an int argument of 1 is specialized to the constant 1 by a launch, unless the kernel says do_not_specialize
    kept = {fn.arg_names[a] if isinstance(a, int) else a for a in (getattr(fn, "do_not_specialize", None) or ())}
    consts.update({name: 1 for name in job.get("ones", ()) if name not in kept})
    signature = {name: ("constexpr" if name in consts else job["types"][name]) for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in job.get("divisible", ())}
    try:
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs or None)
        compiled = triton.compile(source, target=GPUTarget("cuda", job["arch"], 32), options=job.get("options"))
        shared = compiled.metadata.shared
        if job.get("max_shared") is not None and shared > job["max_shared"]:
            failures.append({"job": job, "error": f"needs {shared} bytes of shared memory, the device has "
                                                  f"{job['max_shared']}"})
        if job.get("max_stack") is not None:
            stack = stack_bytes(compiled.asm["cubin"])
            if stack > job["max_stack"]:
                failures.append({"job": job, "error": f"spills registers: {stack} bytes of stack per thread"})
    except Exception as exc:
        failures.append({"job": job, "error": f"{type(exc).__name__}: {exc}"})
print(json.dumps(failures))
"""


def compile_kernels(jobs: list[dict], timeout: int = 1200) -> list[dict]:
    """Each job: module, kernel, types {arg: "*bf16" | "i32" | "fp32" ...}, constexprs {name: value}, arch;
    optionally options (num_warps, num_stages: as the launcher passes them), max_shared (bytes: a
    compiled kernel that needs more shared memory than that fails, as its launch would on the device),
    divisible (argument names specialized as multiples of 16, as a launch with aligned tensors and
    strides specializes them), ones (int arguments passed the value 1: a launch makes them the constant 1
    unless the kernel lists them in do_not_specialize) and max_stack (bytes of stack per thread, i.e. register
    spills, allowed).

    Returns the failures (job and error); raises if the child process itself fails.
    """
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(jobs), capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the compile process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
