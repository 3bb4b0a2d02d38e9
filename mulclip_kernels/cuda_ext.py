"""Build and load the compiled extensions of `csrc/` on first use.

Two Python modules come from the same sources:
- the CPU module (`csrc/subcaption_patch_cpu.cpp` + `csrc/bindings.cpp`), backend "cpp": needs
  only a C++ compiler and ninja, no CUDA;
- the CUDA module (`csrc/subcaption_patch_cuda.cu` + `csrc/bindings.cpp`), backend "cuda":
  needs nvcc and, to run, a GPU.

Each is built by `torch.utils.cpp_extension.load` with ninja into a cache directory named after
a hash of its sources, flags, torch and Python versions: `$MULCLIP_KERNELS_CACHE/<name>` or
`~/.cache/mulclip_kernels/<name>`. A build therefore happens once per machine and source
version; later processes only load the library (ninja finds nothing to do).

Nothing builds at import. `is_available(device)` answers from cheap checks (compiler, ninja,
nvcc, a GPU, an earlier failed build) and is safe to call under torch.compile.
"""
import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
HEADERS = ("subcaption_patch.h",)
CPU_SOURCES = ("subcaption_patch_cpu.cpp", "bindings.cpp")
CUDA_SOURCES = ("subcaption_patch_cuda.cu", "bindings.cpp")
# Built for when no GPU is there to ask (CI compile checks): A100 and H100.
DEFAULT_CUDA_ARCHS = "8.0;9.0"

_MODULES: Dict[str, object] = {}  # "cpu" / "cuda" -> the loaded module
_ERRORS: Dict[str, str] = {}  # "cpu" / "cuda" -> why its build failed in this process


def _find_cxx() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _find_ninja() -> Optional[str]:
    """ninja on PATH, or the one the `ninja` wheel put beside this Python."""
    found = shutil.which("ninja")
    if found:
        return found
    candidate = Path(sysconfig.get_path("scripts")) / "ninja"
    return str(candidate) if candidate.exists() else None


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, /usr/local/cuda, or where nvcc lives.

    torch's own guess is nvcc's prefix, which on some machines (nvcc on PATH as a wrapper in
    /usr/local/bin) has no libcudart to link against.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


# Looked up once at import (cheap), so that is_available() only reads these and torch.compile
# can trace it.
_CXX = _find_cxx()
_NINJA = _find_ninja()
_CUDA_HOME = find_cuda_home()
_HAVE_SOURCES = CSRC.is_dir()
_HAVE_PYTHON_HEADERS = (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()


def cache_root() -> Path:
    """Where builds go: $MULCLIP_KERNELS_CACHE, else $XDG_CACHE_HOME or ~/.cache, /mulclip_kernels."""
    if os.environ.get("MULCLIP_KERNELS_CACHE"):
        return Path(os.environ["MULCLIP_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mulclip_kernels"


def _toolchain_problem(kind: str) -> Optional[str]:
    if kind in _ERRORS:
        return _ERRORS[kind]
    if not _HAVE_SOURCES:
        return f"the C++ sources are missing: {CSRC} does not exist (install from a source checkout)"
    if _CXX is None:
        return "no C++ compiler found: install g++ (or clang++) or set CXX"
    if _NINJA is None:
        return "ninja not found: pip install ninja"
    if not _HAVE_PYTHON_HEADERS:
        return f"Python.h is missing from {sysconfig.get_paths()['include']}: install the Python development headers"
    if kind == "cuda" and _CUDA_HOME is None:
        return "no CUDA toolkit found (nvcc and cuda_runtime.h): install it or set CUDA_HOME"
    return None


def is_available(device) -> Tuple[bool, str]:
    """Whether the extension for `device` ("cpu" or "cuda") can be built and run here, and why not."""
    device = torch.device(device)
    if device.type == "cpu":
        problem = _toolchain_problem("cpu")
    elif device.type == "cuda":
        if torch.version.cuda is None:
            return False, "this torch is built without CUDA"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        problem = _toolchain_problem("cuda")
    else:
        return False, f"no compiled extension for device type {device.type!r}"
    return (False, problem) if problem else (True, "")


def cpu_flags() -> Tuple[List[str], List[str]]:
    """(compile, link) flags of the CPU module.

    -fopenmp turns at::parallel_for into OpenMP regions (without it they run serially); the
    module then shares the libgomp that torch has already loaded. AVX2/FMA are used when
    torch's own dispatch found them on this CPU; the flags enter the cache hash, so another CPU
    gets its own build.
    """
    compile_flags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        compile_flags += ["-mavx2", "-mfma", "-mf16c"]
    return compile_flags, ["-fopenmp"]


def cuda_archs(archs: Optional[str] = None) -> List[str]:
    """Compute capabilities to build for: `archs`, $TORCH_CUDA_ARCH_LIST, the visible GPUs, or 8.0 and 9.0."""
    spec = archs or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not spec and torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        spec = ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    spec = spec or DEFAULT_CUDA_ARCHS
    return [a for a in spec.replace(" ", ";").split(";") if a]


def gencode_flags(archs: Sequence[str]) -> List[str]:
    """nvcc -gencode flags ("9.0" -> sm_90 code, "9.0+PTX" adds compute_90 PTX)."""
    flags = []
    for arch in archs:
        number = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _cudart_link_flags(build_dir: Path) -> List[str]:
    """Extra -L so that -lcudart links where the toolkit has no libcudart.so.

    torch links against $CUDA_HOME/lib64/libcudart.so. Where that file is missing, the runtime
    that the torch wheels ship (site-packages/nvidia/.../lib, versioned name only) is linked
    through an unversioned link made in the build directory.
    """
    home = Path(_CUDA_HOME)
    if (home / "lib64" / "libcudart.so").exists() or (home / "lib" / "libcudart.so").exists():
        return []
    for site in {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}:
        for sub in ("cuda_runtime", "cu13", "cu12"):
            lib_dir = Path(site) / "nvidia" / sub / "lib"
            found = sorted(lib_dir.glob("libcudart.so*")) if lib_dir.is_dir() else []
            if found:
                link_dir = build_dir / "cudart"
                link_dir.mkdir(parents=True, exist_ok=True)
                link = link_dir / "libcudart.so"
                if not link.exists():
                    link.symlink_to(found[0])
                return [f"-L{link_dir}", f"-Wl,-rpath,{lib_dir}"]
    return []


def _digest(kind: str, sources: Sequence[str], flags: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in (*HEADERS, *sources):
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    # The torch install enters too: a build's ninja file names torch's include directory, so two
    # environments sharing one cache would otherwise rebuild each other's modules in turn.
    h.update(repr((kind, list(flags), torch.__version__, torch.version.cuda, os.path.dirname(torch.__file__),
                   sys.version_info[:2], platform.machine())).encode())
    return h.hexdigest()[:16]


def _module_name(kind: str, sources: Sequence[str], flags: Sequence[str]) -> str:
    return f"mulclip_sap_{kind}_{_digest(kind, sources, flags)}"


def _build(kind: str, sources: Sequence[str], cflags: List[str], ldflags: List[str], cuda_cflags: List[str],
           verbose: bool):
    if _CUDA_HOME and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        # cpp_extension picks its toolkit root when first imported (and warns when it guesses).
        os.environ["CUDA_HOME"] = _CUDA_HOME
    # Without a GPU, cpp_extension warns on import that it found no CUDA runtime; a CPU build
    # does not care, and a CUDA build here is a compile check.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)

    problem = _toolchain_problem(kind)
    if problem:
        raise RuntimeError(f"cannot build the {kind} extension of mulclip_kernels: {problem}")
    name = _module_name(kind, sources, cflags + ldflags + cuda_cflags)
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if kind == "cuda":
        # In case cpp_extension was imported before the environment named the toolkit.
        cpp_extension.CUDA_HOME = _CUDA_HOME
        ldflags = ldflags + _cudart_link_flags(build_dir)
    ninja_dir = str(Path(_NINJA).parent)
    if ninja_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja_dir + os.pathsep + os.environ.get("PATH", "")
    try:
        return cpp_extension.load(
            name=name, sources=[str(CSRC / s) for s in sources], extra_cflags=cflags, extra_ldflags=ldflags,
            extra_cuda_cflags=cuda_cflags or None, extra_include_paths=[str(CSRC)], build_directory=str(build_dir),
            with_cuda=kind == "cuda", verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError) as error:
        if isinstance(error, ImportError) and list(build_dir.glob(f"{name}*.so")):
            raise  # built, but this machine cannot load it (e.g. no CUDA driver): not a build error
        _ERRORS[kind] = f"building in {build_dir} failed: {error}"
        raise RuntimeError(f"building the {kind} extension of mulclip_kernels failed (see {build_dir}): {error}") from error


def load_cpu(verbose: bool = False):
    """The CPU module, built on first use (about a minute on two cores, then cached)."""
    if "cpu" not in _MODULES:
        cflags, ldflags = cpu_flags()
        _MODULES["cpu"] = _build("cpu", CPU_SOURCES, cflags, ldflags, [], verbose)
    return _MODULES["cpu"]


def cuda_build_flags(archs: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """(host compile, nvcc) flags of the CUDA module for the given compute capabilities."""
    define = ["-DMULCLIP_WITH_CUDA"]
    return ["-O3", *define], ["-O3", "-lineinfo", *define, *gencode_flags(cuda_archs(archs))]


def cuda_library_path(archs: Optional[str] = None) -> Path:
    """Where the CUDA module's shared library is (or will be) built for `archs`."""
    cflags, cuda_cflags = cuda_build_flags(archs)
    name = _module_name("cuda", CUDA_SOURCES, cflags + cuda_cflags)
    return cache_root() / name / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"


def load_cuda(archs: Optional[str] = None, verbose: bool = False):
    """The CUDA module, built on first use for `archs` (see `cuda_archs`), then cached.

    Building needs nvcc only; importing the result needs the CUDA libraries torch uses, and
    running it a GPU.
    """
    key = "cuda" if archs is None else f"cuda:{archs}"
    if key not in _MODULES:
        cflags, cuda_cflags = cuda_build_flags(archs)
        _MODULES[key] = _build("cuda", CUDA_SOURCES, cflags, [], cuda_cflags, verbose)
    return _MODULES[key]
