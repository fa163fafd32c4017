"""Build the alam_dist native kernels.

* ``alam_dist._C``: C++ CPU kernels (OpenMP), always built unless ALAM_NO_NATIVE=1.
* ``alam_dist._C_cuda``: CUDA kernels, built whenever ``nvcc`` is found (CUDA_HOME or
  PATH) unless ALAM_NO_CUDA=1. They compile and link on machines without a GPU, so CI
  keeps them from rotting. A failed CUDA build is a warning (the package still works on
  CPU) unless ALAM_REQUIRE_CUDA=1, which CI sets.

Neither module includes torch headers: they take raw addresses, so this build needs only
pybind11 and a compiler, and pip's build isolation never installs torch.

Environment: ALAM_CUDA_ARCH (default "75;80;90": machine code for each, plus PTX of the
newest for later GPUs), ALAM_NO_NATIVE, ALAM_NO_CUDA, ALAM_REQUIRE_CUDA.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> Path | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return Path(home)
    for candidate in (Path("/usr/local/cuda"),):
        if (candidate / "bin" / "nvcc").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]


def _cpu_extension() -> Pybind11Extension:
    return Pybind11Extension(
        "alam_dist._C",
        sources=[str(p.relative_to(ROOT)) for p in (
            CSRC / "bindings" / "cpu_module.cpp",
            CSRC / "cpu" / "codec_cpu.cpp",
            CSRC / "common" / "sizes.cpp",
        )],
        cxx_std=17,
        extra_compile_args=CPU_FLAGS,
        extra_link_args=["-fopenmp"],
    )


def _cuda_extension(cuda_home: Path) -> Pybind11Extension:
    lib_dirs = [str(cuda_home / d) for d in ("lib64", "lib") if (cuda_home / d).exists()]
    ext = Pybind11Extension(
        "alam_dist._C_cuda",
        sources=[str(p.relative_to(ROOT)) for p in (
            CSRC / "bindings" / "cuda_module.cpp",
            CSRC / "common" / "sizes.cpp",
        )],
        cxx_std=17,
        extra_compile_args=["-O3"],
        library_dirs=lib_dirs,
        libraries=["cudart_static", "rt", "dl", "pthread"],
    )
    ext.cuda_sources = [str(CSRC / "cuda" / "codec_cuda.cu")]  # type: ignore[attr-defined]
    ext.cuda_home = cuda_home  # type: ignore[attr-defined]
    return ext


class BuildExt(build_ext):
    """Compiles ``.cu`` sources with nvcc before the normal link; CUDA is optional."""

    def build_extension(self, ext):  # noqa: D401 - setuptools hook
        cuda_sources = getattr(ext, "cuda_sources", None)
        if not cuda_sources:
            return super().build_extension(ext)
        try:
            ext.extra_objects = self._nvcc(ext.cuda_home, cuda_sources)
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - reported, and fatal only when asked
            if _flag("ALAM_REQUIRE_CUDA"):
                raise
            print(f"WARNING: alam_dist CUDA kernels not built ({err}); "
                  "the CPU kernels and the reference backend still work.", file=sys.stderr)

    def _nvcc(self, cuda_home: Path, sources: list[str]) -> list[str]:
        archs = os.environ.get("ALAM_CUDA_ARCH", "75;80;90").replace(",", ";").split(";")
        archs = [a.strip() for a in archs if a.strip()]
        gencode = []
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        # PTX of the newest architecture too: GPUs newer than every listed one (e.g.
        # sm_100) JIT-compile it instead of failing with "no kernel image".
        newest = max(archs, key=int)
        gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in sources:
            obj = out_dir / (Path(src).stem + ".o")
            cmd = [str(cuda_home / "bin" / "nvcc"), "-c", src, "-o", str(obj), "-O3",
                   "-std=c++17", "-Xcompiler", "-fPIC", "--fmad=false", *gencode]
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            objects.append(str(obj))
        return objects


# Config-only ALAM (alam_dist_autoload.py): this .pth goes to the root of site-packages,
# where Python runs it at start-up. Regular wheels get it through build_py; PEP 660
# editable wheels do not run build_py for it, so editable_wheel adds it as well.
AUTOLOAD_PTH = "alam_dist_autoload.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(ROOT / AUTOLOAD_PTH), str(Path(self.build_lib) / AUTOLOAD_PTH))


class EditableWheelWithPth(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(ROOT / AUTOLOAD_PTH, Path(installation_dir) / AUTOLOAD_PTH)


def _extensions() -> list[Pybind11Extension]:
    if _flag("ALAM_NO_NATIVE"):
        return []
    exts = [_cpu_extension()]
    if _flag("ALAM_NO_CUDA") and _flag("ALAM_REQUIRE_CUDA"):
        raise RuntimeError("ALAM_NO_CUDA=1 and ALAM_REQUIRE_CUDA=1 contradict each other: unset one")
    cuda_home = None if _flag("ALAM_NO_CUDA") else _find_cuda_home()
    if cuda_home is not None:
        exts.append(_cuda_extension(cuda_home))
    elif _flag("ALAM_REQUIRE_CUDA"):
        raise RuntimeError("ALAM_REQUIRE_CUDA=1 but no nvcc was found (set CUDA_HOME)")
    return exts


setup(ext_modules=_extensions(),
      cmdclass={"build_ext": BuildExt, "build_py": BuildPyWithPth,
                "editable_wheel": EditableWheelWithPth})
