"""The parity rule of method section 6, shared by the tests and the benchmarks.

A fused path's error against a float64 evaluation of the reference may be at most twice the
error of the eager reference run in the same dtype, plus a stated absolute tolerance.
"""
import torch

# Stated absolute tolerances of the parity rule, per input dtype.
PARITY_ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def max_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return (x.double() - exact.double()).abs().max().item() if x.numel() else 0.0


def parity_bound(lowp_reference: torch.Tensor, exact: torch.Tensor, atol: float) -> float:
    return 2 * max_error(lowp_reference, exact) + atol


def assert_parity(name: str, fused: torch.Tensor, lowp_reference: torch.Tensor, exact: torch.Tensor, atol: float):
    """Assert the parity rule; the message gives both errors and where the worst mismatch is."""
    if fused.shape != exact.shape:
        raise AssertionError(f"{name}: shape {tuple(fused.shape)} != reference shape {tuple(exact.shape)}")
    if not torch.isfinite(fused).all():
        bad = (~torch.isfinite(fused)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int((~torch.isfinite(fused)).sum())} non-finite values, first at {bad}")
    err = max_error(fused, exact)
    bound = parity_bound(lowp_reference, exact, atol)
    if err > bound:
        diff = (fused.double() - exact.double()).abs()
        index = torch.unravel_index(diff.argmax(), diff.shape)
        raise AssertionError(
            f"{name}: max error {err:.3e} against float64 exceeds 2 x reference error "
            f"{max_error(lowp_reference, exact):.3e} + atol {atol:.1e}; "
            f"{int((diff > bound).sum())} of {diff.numel()} elements over, worst at {tuple(int(i) for i in index)}"
        )
    return err, bound
