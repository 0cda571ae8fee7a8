"""Builds ddpm_fast._C with CMake (the pybind/cmake_example pattern). No torch at build time.

Environment switches (all optional):
  DDPM_FAST_CUDA=AUTO|ON|OFF      build the CUDA kernels (AUTO: when CMake finds a CUDA compiler)
  DDPM_FAST_CUDA_ARCHS="80;90"    CUDA architectures to compile for
  DDPM_FAST_REQUIRE_EXT=1         fail the install if the extension cannot be built (CI sets this)
  CMAKE_ARGS="..."                passed through to CMake
The build says what it builds (CPU kernels; CUDA kernels for which archs, or why none) before and after the
CMake run. pip shows a build's output only with `pip install -v .`; `ddpm-fast --version` tells afterwards.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name, sourcedir=""):
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


def _say(message):
    print(f"ddpm_fast: {message}", file=sys.stderr, flush=True)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            self._cmake_build(ext)
        except (OSError, subprocess.CalledProcessError) as err:
            if os.environ.get("DDPM_FAST_REQUIRE_EXT", "0") == "1":
                raise
            print(f"\n*** ddpm_fast: could not build the compiled extension ({err}).\n"
                  "*** Installing the pure-Python package; fused ops fall back to Triton or PyTorch.\n"
                  "*** Install a C++ compiler and CMake, then reinstall with `pip install .`.\n",
                  file=sys.stderr)

    def _cmake_build(self, ext):
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        cfg = "Debug" if self.debug else "Release"
        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake not found")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DDDPM_FAST_CUDA={os.environ.get('DDPM_FAST_CUDA', 'AUTO')}",
            f"-DDDPM_FAST_CUDA_ARCHS={os.environ.get('DDPM_FAST_CUDA_ARCHS', '80;90')}",
        ]
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split(" ") if a]
        if shutil.which("ninja") and not any(a.startswith("-G") for a in args):
            args += ["-G", "Ninja"]
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("DDPM_FAST_CUDA", "AUTO").upper()
        archs = os.environ.get("DDPM_FAST_CUDA_ARCHS", "80;90")
        _say("building the extension ddpm_fast._C with CMake: C++ CPU kernels, and " + (
            "no CUDA kernels (DDPM_FAST_CUDA=OFF)" if cuda == "OFF" else
            f"CUDA kernels for archs {archs} {'(required' if cuda == 'ON' else '(when nvcc is found'}; they "
            f"take most of the build time: skip them with DDPM_FAST_CUDA=OFF)"))
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)
        summary = build_temp / "ddpm_fast_build.txt"
        if summary.is_file():
            _say("built ddpm_fast._C: " + "; ".join(summary.read_text().splitlines()))


setup(ext_modules=[CMakeExtension("ddpm_fast._C")], cmdclass={"build_ext": CMakeBuild})
