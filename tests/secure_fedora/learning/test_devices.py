"""[training] device and threads: resolution, clear refusals, threads applied."""

import pytest
import torch

from secure_fedora.core.config import parse_config
from secure_fedora.learning.devices import DeviceError, clients_on, resolve_device
from secure_fedora.runtimes.inprocess import Simulation, build_clients


def cfg(**training):
    return parse_config({"methods": ["fedora", "local"], "training": {"rounds": 1, **training},
                         "data": {"num_clients": 3, "train_per_client": 8, "val_per_client": 4,
                                  "test_per_client": 4}})


def test_cpu_and_auto_resolution():
    assert resolve_device(cfg()) == torch.device("cpu")  # the default
    assert resolve_device(cfg(device="auto"), cuda_available=False) == torch.device("cpu")
    assert resolve_device(cfg(device="auto"), cuda_available=True) == torch.device("cuda")
    assert resolve_device(cfg(device="cuda"), cuda_available=True) == torch.device("cuda")
    # a configuration the GPU path does not cover stays on the CPU under auto ...
    with_fedavg = parse_config({"methods": ["fedavg"], "training": {"device": "auto"}})
    assert resolve_device(with_fedavg, cuda_available=True) == torch.device("cpu")


def test_cuda_is_refused_clearly():
    with pytest.raises(DeviceError, match="no CUDA device is visible"):
        resolve_device(cfg(device="cuda"), cuda_available=False)
    # ... and is refused, naming why, when asked for explicitly
    dp = parse_config({"methods": ["local"], "training": {"device": "cuda"},
                       "privacy": {"enabled": True, "delta": 1e-3}})
    with pytest.raises(DeviceError, match="privacy.enabled"):
        resolve_device(dp, cuda_available=True)
    with pytest.raises(DeviceError, match="fedavg"):
        resolve_device(parse_config({"methods": ["fedavg"], "training": {"device": "cuda"}}),
                       cuda_available=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_simulation_refuses_cuda_before_writing_anything(tmp_path):
    with pytest.raises(DeviceError, match="cuda"):
        Simulation(cfg(device="cuda"), tmp_path / "run").run()
    assert not (tmp_path / "run").exists()


def test_threads_are_applied_and_recorded(tmp_path):
    before = torch.get_num_threads()
    assert before != 2  # tests/conftest.py runs each test process on one thread
    seen = []
    try:
        c = cfg(threads=2)
        clients = build_clients(c)
        assert clients_on(clients, torch.device("cpu"))[0] is clients[0]  # no copy on the CPU
        sim = Simulation(c, tmp_path, clients=clients,
                         progress=lambda *_: seen.append(torch.get_num_threads()))
        assert torch.get_num_threads() == before  # nothing runs yet: nothing changed
        results = sim.run()
        assert seen and set(seen) == {2}  # every round ran on the configured threads
        assert results["compute"] == {"device": "cpu", "threads": 2}
        # the process's own thread count is back: a run in a notebook or a test process left
        # torch on training.threads for everything that came after it
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
    with pytest.raises(Exception, match="training.threads"):
        cfg(threads=0)


def test_the_gpu_path_follows_what_a_method_declares_not_its_name():
    """The GPU path covered the names 'fedora' and 'local' (a set of names), so a GPU-safe
    plug-in could not say so; it now covers every method whose class declares
    cuda_supported (a subclass inherits it), and refuses the others naming them."""
    from secure_fedora.algorithms.methods import FedAvg, Local
    from secure_fedora.core.registry import METHODS

    class GpuAvg(FedAvg):
        cuda_supported = True

    class MyLocal(Local):
        pass

    def factory(ctx, config):
        return GpuAvg(ctx)

    factory.algorithm = GpuAvg
    for name, entry in (("gpu_avg_x", GpuAvg), ("my_local_x", MyLocal), ("gpu_fact_x", factory),
                        ("cpu_avg_x", type("CpuAvg", (FedAvg,), {}))):
        METHODS.register(name, entry)
    try:
        for name in ("gpu_avg_x", "my_local_x", "gpu_fact_x"):
            for device in ("cuda", "auto"):
                run = parse_config({"methods": ["fedora", name], "training": {"device": device}})
                assert resolve_device(run, cuda_available=True) == torch.device("cuda")
        mixed = parse_config({"methods": ["gpu_avg_x", "cpu_avg_x"], "training": {"device": "cuda"}})
        with pytest.raises(DeviceError, match=r"methods \['cpu_avg_x'\] \(the GPU path covers the "
                                              r"methods declaring cuda_supported: \['local', "
                                              r"'fedora', .*'gpu_avg_x'"):
            resolve_device(mixed, cuda_available=True)
        auto = parse_config({"methods": ["cpu_avg_x"], "training": {"device": "auto"}})
        assert resolve_device(auto, cuda_available=True) == torch.device("cpu")
    finally:
        for name in ("gpu_avg_x", "my_local_x", "gpu_fact_x", "cpu_avg_x"):
            METHODS.unregister(name)
