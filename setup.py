"""Build of rnnext and its extension rnnext._C (torch.utils.cpp_extension, ninja).

RNNEXT_CUDA selects the CUDA part: "1" forces it on (an error when nvcc or a CUDA build of
torch is missing), "0" forces it off, unset or "auto" builds it when both are present.
Build against the installed torch: pip install --no-build-isolation -e .
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns: str) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join("csrc", pattern)))
    return found


def _want_cuda() -> bool:
    choice = os.environ.get("RNNEXT_CUDA", "auto").strip().lower()
    if choice not in ("auto", "0", "1"):
        raise SystemExit(f"RNNEXT_CUDA must be 'auto', '0' or '1', got {choice!r}")
    available = cpp_extension.CUDA_HOME is not None and _torch_has_cuda()
    if choice == "1" and not available:
        raise SystemExit(
            "RNNEXT_CUDA=1 needs nvcc (CUDA_HOME) and a CUDA build of torch; "
            f"found CUDA_HOME={cpp_extension.CUDA_HOME!r}, torch CUDA={_torch_cuda_version()!r}"
        )
    return available if choice == "auto" else choice == "1"


def _torch_cuda_version():
    import torch

    return torch.version.cuda


def _torch_has_cuda() -> bool:
    return _torch_cuda_version() is not None


def _extension():
    cpu_sources = _sources("rnnext.cpp", "common/*.cpp", "cpu/*.cpp")
    # -fno-math-errno and -fno-trapping-math (torch's own flags) let GCC vectorise the
    # pointwise passes; -fopenmp-simd honours their `omp simd` loops without OpenMP itself.
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fno-math-errno", "-fno-trapping-math"]
    cxx_flags += ["-fopenmp-simd"]
    if _want_cuda():
        sources = cpu_sources + _sources("cuda/*.cpp", "cuda/*.cu")
        return cpp_extension.CUDAExtension(
            "rnnext._C",
            sources,
            define_macros=[("RNNEXT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    return cpp_extension.CppExtension(
        "rnnext._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
