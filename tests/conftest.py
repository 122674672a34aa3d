import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    torch.set_num_threads(1)
    # and so do the processes the tests start (notebook kernels, CLI runs, runs killed mid-way):
    # a kernel on two threads beside the other worker ran a notebook 10× slower than alone
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

# The files that take longest, first: `make test` hands whole files to its workers in collection
# order (--dist loadfile --no-loadscope-reorder), so a long file started last would run on alone
LONGEST_FIRST = ("test_sequential.py", "test_nle.py", "test_notebooks.py", "test_accuracy.py", "test_lfvi.py")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a file and among the other files is kept
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="gpu: CUDA is not available")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _clear_pyro_state():
    import pyro

    pyro.clear_param_store()
    yield
