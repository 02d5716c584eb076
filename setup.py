"""Builds fastops._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and
nvcc is found. FASTOPS_CUDA=0|1 forces either way. Install with

    pip install --no-build-isolation .
"""

import glob
import os
import sys
import shutil
import sysconfig

from setuptools import setup


def find_cuda_home():
    """The CUDA toolkit root: the first candidate with the runtime headers and library. nvcc on
    PATH may be a wrapper script outside the toolkit, so its parent is only one candidate."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None,
                  "/usr/local/cuda"]
    for home in filter(None, candidates):
        if (os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
                and glob.glob(os.path.join(home, "lib*", "libcudart.so"))):
            return home
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
if "CUDA_HOME" not in os.environ and find_cuda_home():
    os.environ["CUDA_HOME"] = find_cuda_home()

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("fastops builds against an installed torch: `pip install torch` first, then "
             "`pip install --no-build-isolation .`")

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    forced = os.environ.get("FASTOPS_CUDA")
    if forced is not None and forced not in ("0", "1"):
        sys.exit(f"FASTOPS_CUDA must be 0 or 1, got {forced!r}")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if forced == "1" and not available:
        sys.exit("FASTOPS_CUDA=1 but torch is not a CUDA build or nvcc was not found "
                 f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})")
    return available if forced is None else forced == "1"


def pip_cuda_include_dirs():
    """Headers of the CUDA libraries that pip-installed torch depends on (cuBLAS, cuSPARSE, ...):
    torch's CUDA headers include them, and a bare CUDA toolkit may not have them."""
    dirs = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                 os.path.dirname(os.path.dirname(torch.__file__))}:
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted(set(dirs))


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # -fopenmp: at::parallel_for is inlined into our code and runs its threads with OpenMP (the
    # libgomp that torch already loaded); without it every kernel would run on one thread.
    cxx = ["-O3", "-fno-trapping-math", "-Wno-psabi", "-fopenmp", "-DFASTOPS_PYTHON_MODULE"]
    kwargs = dict(name="fastops._C", py_limited_api=False,
                  extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                  include_dirs=[os.path.join(HERE, "csrc")])
    if want_cuda() and cu_sources:
        # sm_90 (H100/H200) natively, plus PTX that any newer GPU can JIT, unless the user says.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        kwargs["include_dirs"] += pip_cuda_include_dirs()
        kwargs["extra_compile_args"]["cxx"] = cxx + ["-DFASTOPS_WITH_CUDA"]
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-DFASTOPS_WITH_CUDA",
                                                "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(sources=sources + cu_sources, **kwargs)
    return cpp_extension.CppExtension(sources=sources, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
