"""The CUDA C++ extension (`csrc/` + `bindings/`): find the toolkit, build just in time, load.

The extension is built by `fusedrl build-ext` or by the engine's start-up, never inside a training
step: dispatch only asks `is_loaded()`, which never compiles. `is_loaded()` does try, once, to import
an ahead-of-time build (`FUSEDRL_BUILD_CUDA=1 pip install --no-build-isolation .` makes `fusedrl._C`)
and to load a just-in-time build already in the cache whose sources and flags match these ones
(the module name carries a hash of both, so a cached build is never stale).

Two traps this module takes care of:
- `CUDA_HOME` must be the toolkit root that holds `lib64/`; torch guesses it from the `nvcc` on PATH,
  which can be a wrapper script outside the toolkit. `find_cuda_home()` checks each candidate.
- With no GPU present `TORCH_CUDA_ARCH_LIST` must be set, or cpp_extension fails with a bare
  IndexError. `build()` sets it to `9.0` (H100/H200) in that case and says so.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("fusedrl")

OPS_NAMESPACE = "fusedrl_C"
DEFAULT_ARCH_WITHOUT_GPU = "9.0"
# No -std flag: cpp_extension passes the standard that the installed torch's headers need (C++20
# for this torch; its ATen.h refuses anything older), and a flag here would override it. No
# --use_fast_math: it swaps sqrtf/logf/division for approximations that move logp at small std.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
# torch's build lock before 2.14 (cpp_extension's FileBaton, a file whose existence is the lock): a build killed
# midway (Ctrl-C, a time limit) leaves it, and every later build waits on it for ever. A build takes about a minute
# per .cu file on 2 cores: older than this, stale. (From 2.14 an OS file lock, released when its process dies.)
STALE_LOCK_S = 30 * 60

_state: dict[str, object] = {"module": None, "tried_prebuilt": False, "error": None}


def source_dirs() -> tuple[Path, Path]:
    """(csrc, bindings): the repository's folders, or the copies shipped inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for root in (here.parent, here.parent / "_sources"):
        if (root / "csrc").is_dir() and (root / "bindings").is_dir():
            return root / "csrc", root / "bindings"
    raise FileNotFoundError(f"CUDA sources not found next to {here} (looked for csrc/ and bindings/)")


def sources() -> list[Path]:
    csrc, bindings = source_dirs()
    return sorted(csrc.glob("*.cu")) + sorted(bindings.glob("*.cpp"))


def _has_toolkit(root: Path) -> bool:
    return (root / "bin" / "nvcc").is_file() and any(
        (root / lib).is_dir() and any((root / lib).glob("libcudart.so*")) for lib in ("lib64", "lib")
    )


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root (holding bin/nvcc and lib64/libcudart.so), or None without nvcc."""
    candidates: list[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
        # A wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) names the real toolkit.
        try:
            text = Path(nvcc).read_text(errors="ignore")[:4096]
        except OSError:
            text = ""
        for word in text.split():
            word = word.strip("'\"")
            if word.endswith("/bin/nvcc"):
                candidates.append(Path(word).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in candidates:
        if _has_toolkit(root):
            return root.resolve()
    return None


def arch_list() -> str:
    """The TORCH_CUDA_ARCH_LIST a build uses: the environment's, the visible GPUs', or 9.0."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_ARCH_WITHOUT_GPU


def module_name(archs: str | None = None) -> str:
    """`fusedrl_C_<hash>`: the hash covers sources, flags, arch list and torch/CUDA versions."""
    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    csrc, _ = source_dirs()
    for header in sorted(csrc.glob("*.cuh")) + sorted(csrc.glob("*.h")):
        digest.update(header.read_bytes())
    digest.update(" ".join(CXX_FLAGS + NVCC_FLAGS).encode())
    digest.update((archs or arch_list()).encode())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}".encode())
    return f"{OPS_NAMESPACE}_{digest.hexdigest()[:12]}"


def cache_dir() -> Path:
    root = os.environ.get("FUSEDRL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fusedrl"
    )
    return Path(root) / "extensions"


def is_loaded() -> bool:
    """True when the extension's ops are registered in this process. Never compiles anything."""
    if _state["module"] is not None:
        return True
    if not _state["tried_prebuilt"]:
        _state["tried_prebuilt"] = True
        _try_prebuilt()
    return _state["module"] is not None


def unavailable_reason() -> str | None:
    if is_loaded():
        return None
    if _state["error"]:
        return str(_state["error"])
    if find_cuda_home() is None:
        return "no CUDA toolkit (nvcc) found, so the CUDA extension cannot be built"
    return "the CUDA extension is not built yet (run `fusedrl build-ext`)"


def _try_prebuilt() -> None:
    """Import an ahead-of-time build, or a matching cached JIT build, if one exists."""
    if importlib.util.find_spec("fusedrl._C") is not None:
        try:
            _state["module"] = importlib.import_module("fusedrl._C")
            return
        except (ImportError, OSError) as exc:
            _state["error"] = f"fusedrl._C failed to load: {exc}"
    if not torch.cuda.is_available():
        return  # nothing to run it on; a build-only check calls build() directly
    try:
        name = module_name()
    except (FileNotFoundError, RuntimeError):
        return
    built = cache_dir() / name / f"{name}.so"
    if built.is_file():
        try:
            torch.ops.load_library(str(built))
            _state["module"] = str(built)
        except (ImportError, OSError) as exc:
            _state["error"] = f"cached extension {built} failed to load: {exc}"


def build(verbose: bool = False) -> Path:
    """Compile (or reuse) the extension with ninja, link it, and register its ops in this process.

    Returns the path of the built shared library. Raises RuntimeError with the reason when there
    is no toolkit or the compile fails.
    """
    if is_loaded():
        # Loading a second build (or the JIT build next to `fusedrl._C`) would register the
        # fusedrl_C namespace twice, which torch refuses.
        return loaded_path()
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("cannot build the CUDA extension: no CUDA toolkit found (nvcc, lib64/libcudart.so)")
    os.environ["CUDA_HOME"] = str(cuda_home)
    archs = arch_list()
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if not torch.cuda.is_available():
            log.info("fusedrl: no GPU visible; building for TORCH_CUDA_ARCH_LIST=%s", archs)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = str(cuda_home)  # read at call time; its import-time guess may be wrong
    name = module_name(archs)
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(build_dir)
    csrc, _ = source_dirs()
    started = time.perf_counter()
    print(f"fusedrl: building the CUDA extension {name} for sm {archs} in {build_dir} "
          "(about a minute per .cu file on 2 cores) ...", file=sys.stderr, flush=True)
    try:
        path = cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources()],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS,
            extra_include_paths=[str(csrc)],
            build_directory=str(build_dir),
            verbose=verbose,
            is_python_module=False,
        )
    except Exception as exc:
        _state["error"] = f"building the CUDA extension failed: {exc}"
        raise RuntimeError(_state["error"]) from exc
    print(f"fusedrl: CUDA extension ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    _state["module"] = str(path)
    _state["error"] = None
    return Path(path)


def clear_stale_lock(build_dir: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Where torch's build lock is a FileBaton: remove `build_dir`'s lock when it is older than `max_age_s` (True
    then); a younger one is another build's, which the build then waits for: say so, naming the file. Where it is an
    OS file lock (torch >= 2.14; the file stays after a build, unlocked) there is nothing to clear."""
    from torch.utils import cpp_extension

    if not hasattr(cpp_extension, "FileBaton"):
        return False
    lock = Path(build_dir) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > max_age_s:
        log.warning("fusedrl: removing the stale build lock %s (%.0f min old: a build that was killed left it)",
                    lock, age / 60)
        lock.unlink(missing_ok=True)
        return True
    print(f"fusedrl: waiting for the build that holds {lock} ({age:.0f} s old); if no build is running, "
          "delete that file", file=sys.stderr, flush=True)
    return False


def loaded_path() -> Path | None:
    """The shared library whose ops are registered in this process, or None."""
    module = _state["module"]
    if module is None:
        return None
    return Path(module if isinstance(module, str) else module.__file__)


def ops():
    """`torch.ops.fusedrl_C` (raises when the extension is not loaded)."""
    if not is_loaded():
        raise RuntimeError(unavailable_reason())
    return getattr(torch.ops, OPS_NAMESPACE)
