"""fastdarts: a fast DARTS for PyTorch.

``kernels/`` installs as ``fastdarts.kernels``. torch is not pinned: GPU machines run
torch 2.11 with triton 3.6, CPU machines 2.14 with triton 3.8.

The optional C++ extension ``fastdarts._C`` (csrc/) is built with torch.utils.cpp_extension
when torch is importable at build time (``pip install -e . --no-build-isolation``); a CUDA
build adds csrc/*.cu when CUDA is available (or FORCE_CUDA=1, for a machine without a GPU).
A failed CUDA compile falls back to the extension without CUDA, a failed C++ compile (no
compiler) to a pure-Python install, where the fast ops fall back to Triton or the reference;
pip shows why with -v. Where that must not happen, FASTDARTS_REQUIRE_EXT=1 (or FORCE_CUDA=1,
for the CUDA part) makes a failed compile fail the install. FASTDARTS_SKIP_EXT=1 skips the
build. MAX_JOBS and TORCH_CUDA_ARCH_LIST are read by torch's build as usual.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _say(message: str) -> None:
    print(f"fastdarts setup: {message}", file=sys.stderr)


def _cpu_flags() -> list[str]:
    """AVX2 + FMA when the build machine has them (FASTDARTS_NO_AVX2=1 to leave them out):
    at::vec then uses SLEEF's vector exp/tanh, 4-6x faster than its portable fallback. The
    extension then runs only on CPUs with AVX2, like a -march=native build."""
    if os.environ.get("FASTDARTS_NO_AVX2") == "1":
        return []
    try:
        cpu = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    if "avx2" in cpu and "fma" in cpu:
        return ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


_CXX = ["-O3", "-g0", *_cpu_flags()]


def _extensions() -> tuple[list, dict]:
    """The extension modules and build command, or none (with the reason printed)."""
    if os.environ.get("FASTDARTS_SKIP_EXT") == "1":
        _say("FASTDARTS_SKIP_EXT=1: not building the C++ extension (pure Python install)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        _say(
            f"torch is not importable in the build environment ({e}); installing pure Python. "
            "To build the C++ extension: pip install -e . --no-build-isolation"
        )
        return [], {}

    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))
    cuda_sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cu"))
    cpu_ext = CppExtension("fastdarts._C", sources, extra_compile_args={"cxx": _CXX})
    required = os.environ.get("FASTDARTS_REQUIRE_EXT") == "1"
    forced = os.environ.get("FORCE_CUDA") == "1"

    class OptionalBuildExtension(BuildExtension):
        """A failed CUDA compile retries without CUDA; a failed C++ compile leaves a working
        pure-Python install (unless the environment requires the extension)."""

        def run(self):
            cuda = self.extensions[0] is not cpu_ext
            reason = self._build()
            if reason is not None and cuda and forced:
                raise reason
            if reason is not None and cuda:
                _say(f"could not build the CUDA extension ({reason}); building it without CUDA")
                self._without_cuda()
                reason = self._build()
            if reason is not None:
                self._pure_python(reason)

        def _build(self) -> Exception | None:
            """The build, or why it failed (a compiler missing or failing, a bad
            TORCH_CUDA_ARCH_LIST)."""
            inplace = self.inplace
            try:
                super().run()
            except Exception as e:
                if required:
                    raise
                return e
            finally:
                self.inplace = inplace  # setuptools' run() clears it while it builds
            return None

        def _without_cuda(self) -> None:
            """The same module without CUDA, with what finalising the options set on the CUDA
            one (setuptools' per-extension state, "_"-named), and a fresh compiler (run()
            made the option an object, patched for nvcc)."""
            failed = self.extensions[0]
            for name, value in vars(failed).items():
                if name.startswith("_"):
                    setattr(cpu_ext, name, value)
            self.ext_map = {k: cpu_ext if v is failed else v for k, v in self.ext_map.items()}
            self.extensions, self.compiler = [cpu_ext], None

        def _pure_python(self, reason: Exception) -> None:
            said = ""
            if self.inplace:  # an earlier build's module would load in this one's place
                stale = Path(self.get_ext_fullpath(cpu_ext.name))
                said = f", removed the earlier build's {stale.name}" if stale.exists() else ""
                stale.unlink(missing_ok=True)
            _say(f"could not build the C++ extension ({reason}); installing pure Python{said}")

    want_cuda = torch.cuda.is_available() or forced
    ext = cpu_ext
    if cuda_sources and want_cuda and CUDA_HOME is not None:
        ext = CUDAExtension(
            "fastdarts._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": _CXX, "nvcc": ["-O3"]},
            define_macros=[("FASTDARTS_WITH_CUDA", None)],
        )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastdarts",
    version="0.1.0",
    description="Fast DARTS (differentiable architecture search) for PyTorch",
    packages=[*find_packages(include=["fastdarts", "fastdarts.*"]), "fastdarts.kernels"],
    package_dir={"fastdarts.kernels": "kernels"},
    python_requires=">=3.10",
    # The oldest torch tested (the fp32_precision API the search uses came in 2.9).
    install_requires=["torch>=2.11", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "cifar": ["torchvision"],
        "test": ["pytest", "ruff", "torchvision"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
