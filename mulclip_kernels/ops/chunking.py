"""How the lean PyTorch paths split work: chunks whose largest intermediates stay bounded."""
import os

# Elements of the largest per-chunk intermediate; about 16 MiB in fp32. Larger chunks are
# faster on CPU, smaller ones leaner; MULCLIP_CHUNK_ELEMENTS overrides it.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def chunk_slices(rows: int, elements_per_row: int):
    """Slices over `rows` such that each chunk holds at most the budget (at least one row)."""
    budget = int(os.environ.get("MULCLIP_CHUNK_ELEMENTS", DEFAULT_CHUNK_ELEMENTS))
    step = max(1, budget // max(1, elements_per_row))
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]
