import os
from collections.abc import Iterator

import pytest
import torch

# Tests run on 2-core CI machines; keep each process to one intra-op thread so parallel
# work (helpers, subprocesses) does not oversubscribe the cores.
torch.set_num_threads(1)
# the same for the processes tests start (CLI runs, Flower's apps): every core already runs a
# test worker, and idle OpenMP threads spinning beside them cost CPU time
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

# DP runs keep their private keys in a key store outside the run directory, by default under
# the user's home; tests use a throw-away home for those stores instead.
if "SECURE_FEDORA_KEYSTORE_HOME" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _KEYSTORE_HOME = tempfile.mkdtemp(prefix="secure-fedora-test-keystores-")
    os.environ["SECURE_FEDORA_KEYSTORE_HOME"] = _KEYSTORE_HOME
    atexit.register(shutil.rmtree, _KEYSTORE_HOME, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_under_pytest_basetemp(tmp_path_factory: pytest.TempPathFactory
                                           ) -> Iterator[None]:
    """What the code under test makes with ``tempfile`` in this process (an Experiment's run
    directory when none is given, scratch folders) goes under pytest's own temporary tree,
    which pytest prunes, instead of piling up in the system's /tmp."""
    import tempfile

    before = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
    try:
        yield
    finally:
        tempfile.tempdir = before


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` or ``deploy`` run first (in their collected order, the others'
    order kept): xdist hands out tests in collection order, and one of these minute-long
    runs collected last (the examples, README's recipe) kept one worker busy while the other
    had nothing left to take."""
    first = [item for item in items
             if item.get_closest_marker("slow") or item.get_closest_marker("deploy")]
    if first:
        chosen = {id(item) for item in first}
        items[:] = first + [item for item in items if id(item) not in chosen]
