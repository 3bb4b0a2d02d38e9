import os

import torch

# Triton reads TRITON_INTERPRET when a kernel module is imported. Without a GPU the kernels can
# only run in the interpreter on CPU tensors, so it is switched on before anything imports them;
# with a GPU they compile, and the interpreter tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
