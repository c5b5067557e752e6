"""Build of rnnext and its extension rnnext._C (torch.utils.cpp_extension, ninja).

RNNEXT_CUDA selects the CUDA part: "1" forces it on (an error when nvcc or a CUDA build of
torch is missing), "0" forces it off, unset or "auto" builds it when both are present.
Build against the installed torch: pip install --no-build-isolation -e .
"""

import glob
import os

from setuptools import setup

# torch finds the CUDA toolkit through CUDA_HOME, else through the nvcc on PATH; a wrapper
# script on PATH would point it at the wrong folder, so the standard location comes first.
if not os.environ.get("CUDA_HOME") and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME on import)

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


def _nvidia_wheel_dirs(sub: str) -> list[str]:
    """Folders of the nvidia wheels that a CUDA build of torch installs (cuBLAS headers and
    libraries live there when the CUDA toolkit itself lacks them)."""
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = []
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "cu[0-9]*", sub)))
        found += sorted(glob.glob(os.path.join(root, "nvidia", "cublas", sub)))
    return [path for path in found if os.path.isdir(path)]


def _cublas_include_args() -> list[str]:
    """The cuBLAS headers from the nvidia wheels when the CUDA toolkit lacks them, searched
    after the toolkit's own folder (-isystem): the wheel's copies of the runtime headers are
    incomplete."""
    toolkit = os.path.join(cpp_extension.CUDA_HOME or "", "include", "cublas_v2.h")
    if os.path.exists(toolkit):
        return []
    return [arg for folder in _nvidia_wheel_dirs("include") for arg in ("-isystem", folder)]


def _cublas_link_args() -> list[str]:
    """Links cuBLAS and cuBLASLt by path where a wheel provides them (libtorch_cuda loads the
    same libraries), else by name from the toolkit."""
    args = []
    for name in ("cublas", "cublasLt"):
        found = [
            path
            for folder in _nvidia_wheel_dirs("lib")
            for path in sorted(glob.glob(os.path.join(folder, f"lib{name}.so*")))
        ]
        args.append(found[0] if found else f"-l{name}")
    return args


def _extension():
    cpu_sources = _sources("rnnext.cpp", "common/*.cpp", "cpu/*.cpp")
    # -fno-math-errno and -fno-trapping-math (torch's own flags) let GCC vectorise the
    # pointwise passes. -fopenmp is what makes at::parallel_for parallel at all: ATen's
    # header defines INTRA_OP_PARALLEL only under _OPENMP, and without it every parallel_for
    # compiled here runs on one thread. It links the libgomp.so.1 that torch already loads.
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fno-math-errno", "-fno-trapping-math"]
    cxx_flags += ["-fopenmp"]
    link_flags = ["-fopenmp"]
    if _want_cuda():
        sources = cpu_sources + _sources("cuda/*.cpp", "cuda/*.cu")
        return cpp_extension.CUDAExtension(
            "rnnext._C",
            sources,
            define_macros=[("RNNEXT_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags + _cublas_include_args(),
                "nvcc": ["-O3"] + _cublas_include_args(),
            },
            extra_link_args=link_flags + _cublas_link_args(),
        )
    return cpp_extension.CppExtension(
        "rnnext._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
