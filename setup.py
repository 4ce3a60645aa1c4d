"""Build script.

`kernels/` and `engine/` are top-level folders installed as `fusedrl.kernels` and `fusedrl.engine`
(DESIGN.md, Layout). The CUDA sources in `csrc/` and `bindings/` ship as package data under
`fusedrl/_sources/` so that an installed wheel can still build the extension just in time.

The CUDA extension `fusedrl._C` is compiled ahead of time only when `FUSEDRL_BUILD_CUDA=1`
(`FUSEDRL_BUILD_CUDA=1 pip install --no-build-isolation .`, which needs torch and nvcc present);
otherwise nothing here imports torch, so `pip install -e .` works on a machine with no GPU and no nvcc.
"""

import glob
import os

from setuptools import find_packages, setup

packages = find_packages(include=["fusedrl", "fusedrl.*"])
packages += ["fusedrl.kernels"] + [f"fusedrl.kernels.{p}" for p in find_packages("kernels")]
packages += ["fusedrl.engine"] + [f"fusedrl.engine.{p}" for p in find_packages("engine")]
packages += ["fusedrl._sources.csrc", "fusedrl._sources.bindings"]

package_dir = {
    "fusedrl.kernels": "kernels",
    "fusedrl.engine": "engine",
    "fusedrl._sources.csrc": "csrc",
    "fusedrl._sources.bindings": "bindings",
}
package_data = {
    "fusedrl._sources.csrc": ["*.cu", "*.cuh", "*.h"],
    "fusedrl._sources.bindings": ["*.cpp"],
}

ext_modules = []
cmdclass = {}
if os.environ.get("FUSEDRL_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules.append(
        CUDAExtension(
            name="fusedrl._C",
            sources=sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("bindings/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            # The same flags as the JIT build (kernels/cuda_ext.py): no -std (torch's headers pick
            # C++20) and no --use_fast_math (its approximate division would change the numbers).
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    packages=packages,
    package_dir=package_dir,
    package_data=package_data,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
