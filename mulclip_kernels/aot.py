"""Ahead-of-time compile check of every Triton kernel for sm_80 (A100) and sm_90 (H100), no GPU needed.

Each Triton module listed in `MODULES` provides `aot_kernel_configs()`: a list of dicts with
keys name, fn (the `@triton.jit` function), signature (parameter -> Triton type, "constexpr" for
constexpr parameters), constexprs, num_warps and num_stages, one per kernel specialisation that
its host code ("auto", or any autotuning) can launch on a GPU, and optionally divisible_by_16:
the integer parameters that the host guarantees to be multiples of 16 (Triton specialises them
so at run time; list them so the compiled code is the one that runs). Every entry is compiled with
`triton.compile` for each architecture in `ARCHS`; the ptxas that Triton ships reports registers
and spills of the PTX, and the compiled metadata gives the shared memory per block. A
configuration that spills or needs more shared memory than the architecture allows fails the
check, so that it gets fixed or removed.

    python -m mulclip_kernels.aot --out docs/triton_kernels.md [--json results.json] [--check]

Pointer arguments are compiled as 16-byte aligned (`tt.divisibility`), as Triton specialises them
for PyTorch allocations at run time; integer arguments are compiled unspecialised except those in
divisible_by_16. Run it without
TRITON_INTERPRET=1: interpreted kernels cannot be compiled.
"""
import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

MODULES = (
    "mulclip_kernels.ops.triton_word_patch",
    "mulclip_kernels.ops.triton_subcaption_patch",
)


@dataclass(frozen=True)
class Arch:
    capability: int
    gpu_name: str  # ptxas --gpu-name, as Triton targets it
    shared_limit: int  # bytes of shared memory one block may use (opt-in maximum)
    label: str


# CUDA C Programming Guide, "Technical Specifications per Compute Capability": maximum shared
# memory per thread block 163 KB on 8.0 and 227 KB on 9.0 (of 164 / 228 KB per SM).
ARCHS = (
    Arch(80, "sm_80", 163 * 1024, "sm_80 (A100)"),
    Arch(90, "sm_90a", 227 * 1024, "sm_90 (H100)"),
)
MAX_REGISTERS = 255  # per thread


@dataclass
class Result:
    module: str
    kernel: str
    arch: int
    dtype: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    shared_limit: int
    mma_instructions: int  # tensor-core instructions in the PTX (mma / wgmma)
    tf32_instructions: int  # of which take TF32 operands: fp32 dots that are not IEEE

    @property
    def ok(self) -> bool:
        return (self.spill_stores == 0 and self.spill_loads == 0 and self.shared_bytes <= self.shared_limit
                and self.registers <= MAX_REGISTERS)


def module_available(name: str) -> bool:
    """Whether the module's file exists (a Triton module another change may not have added yet)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def entry_dtype(signature: Dict[str, str]) -> str:
    """The data dtype of a specialisation: its non-fp32 floating pointer type, else fp32 (or "-")."""
    types = {t[1:] for t in signature.values() if t.startswith("*") and t[1:] in ("fp16", "bf16", "fp32", "fp64")}
    low = sorted(types - {"fp32"})
    return ",".join(low) if low else ("fp32" if types else "-")


def entry_config(entry: dict) -> str:
    constexprs = ", ".join(f"{k}={v}" for k, v in entry["constexprs"].items() if not _is_dtype(v))
    return f"{constexprs}; warps={entry['num_warps']}, stages={entry['num_stages']}"


def _is_dtype(value) -> bool:
    import triton.language as tl

    return isinstance(value, tl.dtype)


def _ptxas_report(ptx: str, arch: Arch) -> Tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack frame bytes) from `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch.capability).path, "-v", f"--gpu-name={arch.gpu_name}", path,
                              "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    stack, stores, loads = (int(x) for x in spills.groups())
    return int(registers.group(1)), stores, loads, stack


def compile_entry(module: str, index: int, capability: int) -> Result:
    """Compile entry `index` of `module.aot_kernel_configs()` for one architecture."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    entry = importlib.import_module(module).aot_kernel_configs()[index]
    arch = next(a for a in ARCHS if a.capability == capability)
    fn, signature = entry["fn"], entry["signature"]
    divisible = set(entry.get("divisible_by_16", ()))
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, kind in signature.items() if kind.startswith("*") or name in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=entry["constexprs"], attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": entry["num_warps"], "num_stages": entry["num_stages"]})
    ptx = compiled.asm["ptx"]
    registers, stores, loads, stack = _ptxas_report(ptx, arch)
    mma = [line for line in ptx.splitlines() if re.match(r"\s*(wgmma\.mma_async|mma\.sync)", line)]
    return Result(module=module, kernel=entry["name"], arch=capability, dtype=entry_dtype(signature),
                  config=entry_config(entry), registers=registers, spill_stores=stores, spill_loads=loads,
                  stack_bytes=stack, shared_bytes=int(compiled.metadata.shared), shared_limit=arch.shared_limit,
                  mma_instructions=len(mma), tf32_instructions=sum(".tf32" in line for line in mma))


def _compile_task(task):
    return compile_entry(*task)


def compile_all(modules=MODULES, jobs: Optional[int] = None) -> Tuple[List[Result], List[str]]:
    """Compile every entry of every available module for every arch; returns (results, missing modules)."""
    from triton import knobs

    if knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; unset it")
    present = [m for m in modules if module_available(m)]
    missing = [m for m in modules if m not in present]
    tasks = [(m, i, arch.capability) for m in present
             for i in range(len(importlib.import_module(m).aot_kernel_configs())) for arch in ARCHS]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        results = [_compile_task(t) for t in tasks]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_compile_task, tasks))
    return results, missing


def render_table(results: List[Result], missing: List[str]) -> str:
    """The committed markdown table: one row per kernel specialisation and architecture."""
    lines = [
        "# Triton kernels compiled ahead of time",
        "",
        "Generated by `python -m mulclip_kernels.aot --out docs/triton_kernels.md` (do not edit by hand):",
        "every kernel specialisation that the host code can launch on a GPU, compiled with",
        "`triton.compile` for each architecture without a GPU. Registers and spills come from the",
        "ptxas that Triton ships (`ptxas -v` on the generated PTX), shared memory from the compiled",
        "metadata; the limit is the per-block maximum of the architecture. Pointers are compiled as",
        "16-byte aligned, integers unspecialised except the row width (a multiple of 16: the host pads",
        "it). `tests/test_triton_aot.py` fails on any spill or shared memory over the limit.",
        "",
        "Modules: " + ", ".join(f"`{m}`" for m in MODULES if m not in missing) + ".",
    ]
    for m in missing:
        lines.append(f"Not present when generated (skipped): `{m}`.")
    lines += [
        "",
        "| kernel | arch | dtype | config | registers | spills (store/load bytes) | shared memory (bytes) | limit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    labels = {a.capability: a.label for a in ARCHS}
    for r in results:
        spills = f"{r.spill_stores}/{r.spill_loads}" if (r.spill_stores or r.spill_loads) else "0"
        flag = "" if r.ok else " **over**"
        lines.append(f"| `{r.kernel}` | {labels[r.arch]} | {r.dtype} | {r.config} | {r.registers} | {spills}{flag} | "
                     f"{r.shared_bytes} | {r.shared_limit} |")
    ok = sum(r.ok for r in results)
    lines += ["", f"{len(results)} compilations, {ok} within limits, {len(results) - ok} over.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown table here (default: stdout)")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any configuration spills or overflows")
    args = parser.parse_args(argv)
    results, missing = compile_all(jobs=args.jobs)
    table = render_table(results, missing)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
    else:
        print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"missing": missing, "results": [dict(asdict(r), ok=r.ok) for r in results]}, f, indent=1)
    bad = [r for r in results if not r.ok]
    for r in bad:
        print(f"over the limits: {r.kernel} sm_{r.arch} {r.dtype} {r.config}: {r.registers} registers, "
              f"spills {r.spill_stores}/{r.spill_loads} B, shared {r.shared_bytes}/{r.shared_limit} B", file=sys.stderr)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
