import os

# Triton reads this when a kernel module is imported: kernels must run in the interpreter on
# CPU tensors, so it is set before anything imports them.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
