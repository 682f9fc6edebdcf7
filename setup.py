"""Build of rlhf-kernels: one extension, ``rlhf_kernels._C``, compiled with ninja.

Environment switches
--------------------
RLHF_KERNELS_NO_EXT=1      skip the compiled extension (pure Python + Triton install).
RLHF_KERNELS_FORCE_CUDA=1  compile the CUDA sources even when no GPU is visible (needs a CUDA build of torch
                           and the CUDA toolkit), e.g. when building inside a container.
RLHF_KERNELS_NO_CUDA=1     compile only the CPU sources.
RLHF_KERNELS_CUDA_ARCH     forwarded to TORCH_CUDA_ARCH_LIST when set (default "8.0;9.0;10.0+PTX" when nvcc and
                           torch know sm_100, else "8.0;9.0+PTX": SASS for A100/H100(/B200) and PTX of the newest
                           arch, which the driver compiles for later GPUs).
CUDA_HOME / CUDA_PATH      the CUDA toolkit to build with; without them, see find_cuda_home.

Install with ``pip install --no-build-isolation -e .``: the extension is compiled against the torch that is
already installed, so pip must not build it in an isolated environment with another torch.

The helpers above the ``__main__`` guard are pure: tests/test_build_config.py loads this file as a module (not as
``__main__``, so setup() does not run) to test them. pip and ``python setup.py`` run it as ``__main__``.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_HOME = "/usr/local/cuda"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def is_cuda_toolkit(home: str) -> bool:
    """Whether ``home`` is the root of a CUDA toolkit: ``bin/nvcc`` beside the runtime headers (``include/`` or,
    as in conda's layout, ``targets/<platform>/include/``)."""
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return False
    headers = [os.path.join(home, "include", "cuda_runtime.h")]
    headers += glob.glob(os.path.join(home, "targets", "*", "include", "cuda_runtime.h"))
    return any(os.path.isfile(h) for h in headers)


def nvcc_top(nvcc: str) -> str | None:
    """The toolkit root that ``nvcc`` really runs from, as nvcc itself reports it (``TOP`` in ``nvcc --dryrun``),
    so that a wrapper script (``exec /opt/cuda/bin/nvcc "$@"``) leads to its toolkit. None if nvcc cannot say."""
    cmd = [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (run.stderr + run.stdout).splitlines():
        key, _, value = line.removeprefix("#$ ").partition("=")
        if key == "TOP" and value.strip():
            return os.path.realpath(value.strip())
    return None


def find_cuda_home(environ=None, default: str = DEFAULT_CUDA_HOME) -> tuple[str | None, str]:
    """The CUDA toolkit to build with and why: ``(root or None, reason)``.

    In order: $CUDA_HOME, then $CUDA_PATH (taken as given); else the ``nvcc`` on $PATH: the folder above its
    ``bin/``, else above the file it links to, else the root nvcc reports when run (wrapper scripts), whichever
    is first a toolkit (:func:`is_cuda_toolkit`); else ``default`` (/usr/local/cuda) if it is a toolkit.
    """
    environ = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            return environ[var], f"${var}"
    nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
    if nvcc is not None:
        real = os.path.realpath(nvcc)
        for home in (os.path.dirname(os.path.dirname(nvcc)), os.path.dirname(os.path.dirname(real))):
            if is_cuda_toolkit(home):
                via = "" if real == os.path.abspath(nvcc) else f", a link to {real}"
                return home, f"the nvcc on PATH ({nvcc}{via})"
        top = nvcc_top(nvcc)
        if top is not None and is_cuda_toolkit(top):
            return top, f"the nvcc on PATH ({nvcc}) runs from there (nvcc --dryrun: TOP={top})"
        without = f"the nvcc on PATH ({nvcc}) is in no CUDA toolkit"
    else:
        without = "no nvcc on PATH"
    if is_cuda_toolkit(default):
        return default, f"the default location ({without})"
    return None, f"no $CUDA_HOME or $CUDA_PATH, {without}, and no toolkit at {default}"


def _nvcc_archs(nvcc: str) -> set[str]:
    """The virtual architectures the nvcc at ``nvcc`` compiles for (``{"compute_80", ...}``; empty if unknown)."""
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


def _cuda_toolkit() -> str | None:
    """The CUDA toolkit to compile ``csrc/cuda`` with, or None for a CPU-only extension (each decision printed).
    Exits with one line when RLHF_KERNELS_FORCE_CUDA=1 asks for what cannot be built."""
    import torch

    force = _flag("RLHF_KERNELS_FORCE_CUDA")
    if _flag("RLHF_KERNELS_NO_CUDA"):
        skip = "RLHF_KERNELS_NO_CUDA=1"
    elif torch.version.cuda is None:
        if force:
            sys.exit(
                f"rlhf-kernels: error: RLHF_KERNELS_FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build; "
                "install a CUDA build of torch first"
            )
        skip = f"torch {torch.__version__} is a CPU-only build"
    elif not (force or torch.cuda.is_available()):
        skip = "no GPU visible; RLHF_KERNELS_FORCE_CUDA=1 compiles them anyway"
    else:
        home, why = find_cuda_home()
        if home is not None and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            print(f"rlhf-kernels: CUDA toolkit {home} (from {why})")
            return home
        found = why if home is None else f"{why} gives {home}, which has no bin/nvcc"
        if force:
            sys.exit(
                f"rlhf-kernels: error: RLHF_KERNELS_FORCE_CUDA=1 but no CUDA toolkit found ({found}); "
                "set CUDA_HOME to the toolkit's root, the folder holding bin/nvcc"
            )
        skip = f"no CUDA toolkit found ({found})"
    print(f"rlhf-kernels: CPU sources only: {skip}")
    return None


def _extensions():
    if _flag("RLHF_KERNELS_NO_EXT"):
        return [], {}
    cuda_home = _cuda_toolkit()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import (and guesses from the nvcc on PATH when it is
        # unset, which a wrapper script misleads): set both so that it compiles and links with this toolkit.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    link = ["-fopenmp"]
    common = {"include_dirs": [os.path.join(ROOT, "csrc")], "extra_link_args": link}
    if cuda_home is not None:
        archs = os.environ.get("RLHF_KERNELS_CUDA_ARCH") or default_cuda_archs(os.path.join(cuda_home, "bin", "nvcc"))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
        print(f"rlhf-kernels: CUDA sources for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = cpp_extension.CUDAExtension(
            "rlhf_kernels._C",
            cpu_sources + cuda_sources,
            define_macros=[("RLHF_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension("rlhf_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


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

if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
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
