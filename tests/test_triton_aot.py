"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without spills or shared-memory
overflow, and the committed table docs/triton_kernels.md is the one the tool generates.

The compilation runs `python -m mulclip_kernels.aot` in a subprocess without TRITON_INTERPRET
(conftest switches the interpreter on for this process, and interpreted kernels cannot be
compiled). No GPU is needed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mulclip_kernels import aot

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "triton_kernels.md"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "mulclip_kernels.aot", "--out", str(out / "table.md"),
                           "--json", str(out / "results.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), (out / "table.md").read_text()


def test_no_spills_and_shared_memory_within_the_arch_limit(compiled):
    results, _ = compiled
    assert results["results"], "nothing was compiled"
    limits = {arch.capability: arch.shared_limit for arch in aot.ARCHS}
    for r in results["results"]:
        where = f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['config']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where} spills"
        assert r["shared_bytes"] <= limits[r["arch"]] == r["shared_limit"], f"{where} overflows shared memory"
        assert 0 < r["registers"] <= aot.MAX_REGISTERS, where


def test_every_word_patch_kernel_for_every_arch_and_dtype(compiled):
    results, _ = compiled
    seen = {(r["kernel"], r["arch"], r["dtype"]) for r in results["results"]
            if r["module"] == "mulclip_kernels.ops.triton_word_patch"}
    width_kernels = ["_row_norm_kernel", "_recon_kernel", "_contrast_kernel", "_contrast_backward_kernel",
                     "_grad_rows_kernel"]
    for arch in aot.ARCHS:
        for dtype in ("fp32", "fp16", "bf16"):
            for kernel in width_kernels:
                assert (kernel, arch.capability, dtype) in seen
        assert ("_finalize_kernel", arch.capability, "fp32") in seen


def test_every_subcaption_patch_kernel_for_every_arch_and_dtype(compiled):
    """Every SAP kernel for every top-k width (KP = 8 .. 64), arch and dtype; 16-bit similarity
    tiles on the tensor cores."""
    results, _ = compiled
    sap = [r for r in results["results"] if r["module"] == "mulclip_kernels.ops.triton_subcaption_patch"]
    seen = {(r["kernel"], r["arch"], r["dtype"]) for r in sap}
    for arch in aot.ARCHS:
        for dtype in ("fp32", "fp16", "bf16"):
            for kernel in ("_forward_kernel", "_align_backward_kernel", "_scores_backward_kernel", "_patch_grad_kernel"):
                assert (kernel, arch.capability, dtype) in seen
            widths = {r["config"].split("KP=")[1].split(",")[0].split(";")[0] for r in sap
                      if r["kernel"] == "_forward_kernel" and r["arch"] == arch.capability and r["dtype"] == dtype}
            assert widths == {"8", "16", "32", "64"}
    for r in sap:
        if r["kernel"] == "_forward_kernel":
            assert (r["mma_instructions"] > 0) == (r["dtype"] != "fp32"), (r["config"], r["arch"], r["dtype"])


def test_fp32_dots_are_ieee_and_16_bit_dots_use_tensor_cores(compiled):
    """No TF32 tensor-core instruction in any kernel; the 16-bit WPR kernels with dots do use them."""
    results, _ = compiled
    for r in results["results"]:
        assert r["tf32_instructions"] == 0, f"{r['kernel']} sm_{r['arch']} {r['dtype']} runs TF32 dots"
    dot_kernels = {"_recon_kernel", "_contrast_kernel", "_contrast_backward_kernel", "_grad_rows_kernel"}
    for r in results["results"]:
        if r["module"] == "mulclip_kernels.ops.triton_word_patch" and r["kernel"] in dot_kernels:
            assert (r["mma_instructions"] > 0) == (r["dtype"] != "fp32"), (r["kernel"], r["arch"], r["dtype"])


def test_committed_table_is_current(compiled):
    _, table = compiled
    assert TABLE.read_text() == table, (
        "docs/triton_kernels.md is stale: regenerate it with python -m mulclip_kernels.aot --out docs/triton_kernels.md")


def test_dtype_and_config_columns():
    assert aot.entry_dtype({"x": "*bf16", "n": "*fp32", "m": "*i1", "k": "i32"}) == "bf16"
    assert aot.entry_dtype({"x": "*fp32", "m": "*i1"}) == "fp32"
    entry = dict(constexprs={"BLOCK": 64}, num_warps=4, num_stages=2)
    assert aot.entry_config(entry) == "BLOCK=64; warps=4, stages=2"
