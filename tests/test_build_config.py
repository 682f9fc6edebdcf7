"""How setup.py finds the CUDA toolkit (find_cuda_home), on fake toolkits in tmp_path: no compiler runs.

setup.py is loaded as a module, not as ``__main__``, so its helpers are defined and setup() does not run.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fake nvcc executables are POSIX shell scripts")

SETUP_PY = Path(__file__).resolve().parent.parent / "setup.py"

# Stands in for nvcc: with --dryrun it prints, like nvcc, the variables of its nvcc.profile on stderr, TOP among them
# (the toolkit root as seen from the folder of the executable that really runs).
FAKE_NVCC = """#!/bin/sh
here=$(cd "$(dirname "$0")" && pwd)
case " $* " in *" --dryrun "*)
  echo "#\\$ _HERE_=$here" >&2
  echo "#\\$ TOP=$here/.." >&2
  echo "#\\$ CICC_PATH=$here/../nvvm/bin" >&2
esac
"""


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("rlhf_kernels_setup", SETUP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _toolkit(root: Path, headers: str = "include") -> Path:
    """A fake toolkit: bin/nvcc and cuda_runtime.h under ``headers`` (relative to the root)."""
    _executable(root / "bin" / "nvcc", FAKE_NVCC)
    (root / headers).mkdir(parents=True)
    (root / headers / "cuda_runtime.h").write_text("")
    return root


def _wrapper(folder: Path, target: Path) -> Path:
    """A script named nvcc in ``folder`` that runs ``target`` (what a system's /usr/local/bin/nvcc may be)."""
    return _executable(folder / "nvcc", f'#!/bin/sh\nexec {target} "$@"\n')


def test_environment_first(build, tmp_path):
    on_path = _toolkit(tmp_path / "on-path")
    env = {"CUDA_HOME": "/opt/a", "CUDA_PATH": "/opt/b", "PATH": str(on_path / "bin")}
    assert build.find_cuda_home(env) == ("/opt/a", "$CUDA_HOME")  # taken as given, even without a toolkit there
    assert build.find_cuda_home({**env, "CUDA_HOME": ""}) == ("/opt/b", "$CUDA_PATH")
    del env["CUDA_HOME"], env["CUDA_PATH"]
    assert build.find_cuda_home(env, default=str(tmp_path / "none"))[0] == str(on_path)


def test_nvcc_on_path_in_its_toolkit(build, tmp_path):
    home = _toolkit(tmp_path / "cuda-13.0")
    found, why = build.find_cuda_home({"PATH": f"{tmp_path / 'empty'}:{home / 'bin'}"}, default=str(tmp_path / "x"))
    assert found == str(home)
    assert why == f"the nvcc on PATH ({home / 'bin' / 'nvcc'})"


def test_nvcc_linked_from_another_folder(build, tmp_path):
    home = _toolkit(tmp_path / "opt" / "cuda-12.8")
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")  # /usr holds no CUDA headers
    found, why = build.find_cuda_home({"PATH": str(tmp_path / "usr" / "bin")}, default=str(tmp_path / "x"))
    assert found == str(home)
    assert f"a link to {home / 'bin' / 'nvcc'}" in why


def test_nvcc_wrapper_script(build, tmp_path):
    """A script outside the toolkit that runs the real nvcc: the folder above the script holds a bin/nvcc (the
    script itself) but no toolkit, so the root comes from nvcc's own report."""
    home = _toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "local" / "include").mkdir(parents=True)
    wrapper = _wrapper(tmp_path / "local" / "bin", home / "bin" / "nvcc")
    assert build.nvcc_top(str(wrapper)) == str(home)
    found, why = build.find_cuda_home({"PATH": str(wrapper.parent)}, default=str(tmp_path / "x"))
    assert found == str(home)
    assert why == f"the nvcc on PATH ({wrapper}) runs from there (nvcc --dryrun: TOP={home})"


def test_conda_layout(build, tmp_path):
    """conda's CUDA packages keep the headers under targets/<platform>/include."""
    env = _toolkit(tmp_path / "env", headers="targets/x86_64-linux/include")
    assert build.find_cuda_home({"PATH": str(env / "bin")}, default=str(tmp_path / "x"))[0] == str(env)


def test_default_location(build, tmp_path):
    default = _toolkit(tmp_path / "cuda")
    (tmp_path / "empty").mkdir()
    assert build.find_cuda_home({"PATH": str(tmp_path / "empty")}, default=str(default)) == (
        str(default),
        "the default location (no nvcc on PATH)",
    )
    # an nvcc that is in no toolkit and does not say where it runs from (here: it runs nothing)
    stray = _executable(tmp_path / "stray" / "nvcc", "#!/bin/sh\nexit 1\n")
    found, why = build.find_cuda_home({"PATH": str(stray.parent)}, default=str(default))
    assert (found, why) == (str(default), f"the default location (the nvcc on PATH ({stray}) is in no CUDA toolkit)")


def test_nothing_found(build, tmp_path):
    stray = _executable(tmp_path / "bin" / "nvcc", "#!/bin/sh\nexit 1\n")
    assert not build.is_cuda_toolkit(str(tmp_path))  # bin/nvcc without headers
    default = tmp_path / "cuda"
    found, why = build.find_cuda_home({"PATH": str(stray.parent)}, default=str(default))
    assert found is None
    assert (
        why
        == f"no $CUDA_HOME or $CUDA_PATH, the nvcc on PATH ({stray}) is in no CUDA toolkit, and no toolkit at {default}"
    )
    found, why = build.find_cuda_home({}, default=str(default))
    assert (found, why) == (None, f"no $CUDA_HOME or $CUDA_PATH, no nvcc on PATH, and no toolkit at {default}")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_this_machine(build):
    """With the real nvcc on PATH (whatever wraps or links it), the toolkit found holds that same compiler."""
    home, why = build.find_cuda_home({"PATH": os.environ["PATH"]})
    assert home is not None and build.is_cuda_toolkit(home), why

    def version(nvcc):
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout

    assert version(os.path.join(home, "bin", "nvcc")) == version(shutil.which("nvcc"))
