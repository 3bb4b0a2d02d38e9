import os

import torch

# Triton reads TRITON_INTERPRET when a kernel module is imported. Without a GPU the kernels can
# only run in the interpreter on CPU tensors, so it is switched on before anything imports them;
# with a GPU they compile, and the interpreter tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_addoption(parser):
    parser.addoption(
        "--bench-scale", choices=["cpu", "gpu"], default=None,
        help="shape sweep to run: 'cpu' (small, CI) or 'gpu' (the paper's shapes); default: gpu when CUDA is available",
    )


def bench_scale(config) -> str:
    return config.getoption("--bench-scale") or ("gpu" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    """Modules define CASES = {"cpu": [...], "gpu": [...]} of pytest.param; tests take `case_params`."""
    if "case_params" in metafunc.fixturenames:
        metafunc.parametrize("case_params", metafunc.module.CASES[bench_scale(metafunc.config)])
