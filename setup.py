"""mixfast: fast, faithful self-supervised pretraining with image mixtures and masks.

The native module ``mixfast._C`` is built by CMake (CMakeLists.txt): CPU kernels with
OpenMP always, CUDA kernels whenever nvcc is found. ``MIXFAST_CUDA=0`` / ``=1`` forces the
CUDA part off / on; ``MIXFAST_BUILD_JOBS`` sets the parallelism (default: all cores).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cuda_option() -> str:
    value = os.environ.get("MIXFAST_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "AUTO"
    if value in ("1", "on", "true", "yes"):
        return "ON"
    if value in ("0", "off", "false", "no"):
        return "OFF"
    raise SystemExit(f"MIXFAST_CUDA must be 0, 1 or auto, got {value!r}")


def _tool(module: str, exe: str) -> str:
    """The cmake / ninja executable of the build environment's Python package, else PATH."""
    try:
        mod = __import__(module)
        path = Path(mod.BIN_DIR) / exe
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(exe)
    if not found:
        raise SystemExit(f"mixfast: building mixfast._C needs {exe} (pip install {module})")
    return found


class CMakeBuild(build_ext):
    """Configure + build CMakeLists.txt and put _C.<abi>.so where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        cuda = _cuda_option()
        build_dir = Path(self.build_temp).resolve() / f"cmake-cuda{cuda.lower()}"
        cmake, ninja = _tool("cmake", "cmake"), _tool("ninja", "ninja")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMIXFAST_OUTPUT_DIR={out_dir}",
            f"-DMIXFAST_CUDA={cuda}",
        ]
        if os.environ.get("MIXFAST_CUDA_ARCHS"):
            configure.append(f"-DMIXFAST_CUDA_ARCHS={os.environ['MIXFAST_CUDA_ARCHS']}")
        jobs = os.environ.get("MIXFAST_BUILD_JOBS") or str(os.cpu_count() or 1)
        try:
            subprocess.run(configure, check=True)
        except subprocess.CalledProcessError:
            # A cache written by another build environment (other temporary cmake/ninja
            # paths) can refuse to reconfigure: start from a clean build folder once.
            shutil.rmtree(build_dir, ignore_errors=True)
            subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


def _long_description() -> str:
    readme = ROOT / "README.md"
    return readme.read_text(encoding="utf-8") if readme.exists() else __doc__


setup(
    name="mixfast",
    version="0.1.0",
    description="MixMask / Un-Mix self-supervised pretraining on DeepSpeed, with fused kernels",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mixfast", "mixfast.*", "kernels", "kernels.*"]),
    ext_modules=[CMakeExtension("mixfast._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        # torchvision has no CPU wheel for recent torch; mixfast/_compat.py makes the CUDA
        # wheel importable on CPU-only torch. constraints.txt pins the release whose own
        # torch pin matches ours, so it never pulls in another torch.
        "torchvision",
        "pydantic>=2.6",
        "numpy",
        "pillow",
        "scikit-learn",  # the built-in demo data set (load_digits' file ships inside it)
        "tensorboard",
        "tqdm",
        # DALI pre-training pipelines (mixfast/data/dali.py); its CPU pipelines run without a GPU.
        "nvidia-dali-cuda130",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.16"],
        # triton: the Triton kernels' parity tests run in its CPU interpreter.
        "dev": ["pytest>=8", "deepspeed>=0.16", "triton>=3.0"],
        "triton": ["triton>=3.0"],
    },
    entry_points={"console_scripts": ["mixfast-train=mixfast.train:main"]},
)
