"""Build of rlhf-kernels: one extension, ``rlhf_kernels._C``, compiled with ninja.

Environment switches
--------------------
RLHF_KERNELS_NO_EXT=1      skip the compiled extension (pure Python + Triton install).
RLHF_KERNELS_FORCE_CUDA=1  compile the CUDA sources even when no GPU is visible (needs a CUDA build of torch
                           and nvcc), e.g. when building inside a container.
RLHF_KERNELS_NO_CUDA=1     compile only the CPU sources.
RLHF_KERNELS_CUDA_ARCH     forwarded to TORCH_CUDA_ARCH_LIST when set (default "8.0;9.0;10.0+PTX" when nvcc and
                           torch know sm_100, else "8.0;9.0+PTX": SASS for A100/H100(/B200) and PTX of the newest
                           arch, which the driver compiles for later GPUs).

Install with ``pip install --no-build-isolation -e .``: the extension is compiled against the torch that is
already installed, so pip must not build it in an isolated environment with another torch.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvcc_archs(nvcc: str) -> set[str]:
    """The virtual architectures the nvcc at ``nvcc`` compiles for (``{"compute_80", ...}``; empty if unknown)."""
    import subprocess

    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(out.split())


def _torch_knows_arch(arch: str) -> bool:
    """Whether this torch's extension builder accepts ``arch`` in TORCH_CUDA_ARCH_LIST (sm_100 needs torch 2.7+)."""
    from torch.utils import cpp_extension

    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        cpp_extension._get_cuda_arch_flags()
        return True
    except (ValueError, AttributeError, RuntimeError):
        return False
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def default_cuda_archs(nvcc: str) -> str:
    """SASS for sm_80 and sm_90, and sm_100 when both nvcc and torch support it; PTX of the newest one."""
    if "compute_100" in _nvcc_archs(nvcc) and _torch_knows_arch("10.0"):
        return "8.0;9.0;10.0+PTX"
    return "8.0;9.0+PTX"


def _extensions():
    if _flag("RLHF_KERNELS_NO_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    link = ["-fopenmp"]

    torch_has_cuda = torch.version.cuda is not None
    nvcc_found = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    force = _flag("RLHF_KERNELS_FORCE_CUDA")
    if force and not torch_has_cuda:
        raise RuntimeError(
            "RLHF_KERNELS_FORCE_CUDA=1 but the installed torch is a CPU-only build "
            f"(torch {torch.__version__}); install a CUDA build of torch first."
        )
    use_cuda = (
        not _flag("RLHF_KERNELS_NO_CUDA") and torch_has_cuda and nvcc_found and (force or torch.cuda.is_available())
    )
    if use_cuda:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
        archs = os.environ.get("RLHF_KERNELS_CUDA_ARCH") or default_cuda_archs(nvcc)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
        print(f"rlhf-kernels: CUDA sources for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = CUDAExtension(
            "rlhf_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("RLHF_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "rlhf_kernels._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
TRAIN_REQUIRES = [
    "torch>=2.11",  # FSDP2 and torch.distributed.checkpoint's safetensors storage as checked (the kernels need 2.4)
    "transformers>=4.56",
    "datasets>=3.0",
    "tokenizers>=0.21",
    "peft>=0.15",
    "safetensors>=0.4",
    "accelerate>=1.0",
    "tqdm",
    "pyyaml",
    "matplotlib",
]

setup(
    name="rlhf-kernels",
    version="0.1.0",
    description="Fused kernels for LLM post-training (log-probs, KL, GAE, losses) and a training layer on them",
    packages=find_packages(include=["rlhf_kernels", "rlhf_kernels.*", "rlhf", "rlhf.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "ruff"],
        # the training layer (rlhf/): models, data, LoRA, configs, logging, plots
        "train": TRAIN_REQUIRES,
    },
    entry_points={"console_scripts": ["rlhf = rlhf.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
