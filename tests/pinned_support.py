"""Digests of released values pinned bit for bit, per machine kind.

A pinned digest covers float results of vectorized kernels (torch's float64 ``log1p``/``cos``/
``sin`` of the CSPRNG's Gaussians, MKL's float32 GEMMs of DP-SGD): other CPUs pick other
kernels, which round otherwise, so the same code releases other bits there (the design says
so: a crash resume on another CPU model may be refused as "resume diverged"). Each digest is
the one its test recorded on the machine it was written on, and :data:`COUNTERPARTS` holds the
same draws' digest on an Intel Xeon with AVX-512 (Sapphire Rapids class: MKL's and torch's
AVX-512 kernels), from the same code (the DP-SGD ones also from the recording's own
``privacy/dpsgd.py``, loaded beside the current one: equal there too): a change to what is
released changes both, so speed work still cannot move a released value unnoticed on either
kind. On a third machine kind the test fails naming this machine's digest and kernels: record
it as a counterpart after the equivalence tests (fused against Opacus, the sampler against its
formula) pass there.
"""

from __future__ import annotations

import numpy as np
import torch

#: recorded digest -> the same draws' digest on an Intel Xeon with AVX-512
COUNTERPARTS: dict[str, str] = {
    "5535faaeb2c0bdb1df4df3b0a3400e8131c69acc11ff7f60166ba17a682fe2d4":
        "08bae1712958c5b95e83add301999f7658c93dc3733fa0d214ec8cfe318e9821",
    "8f6283a942f8f88a516924a4b3d970775567edfd3690cd0f46f5ec3ff6cd3ee2":
        "0caea2e7e06a1b6e6de41003c86cacd8a1ef8d0d8fbd57a16f9e8b1ddd46cf02",
    "5ccd690f93e5ad66468f817467b6cbd114dcdfd7ad99b20fdd666a0386bd72fd":
        "1d2ab2d706528a6f90c8a7d350ed77262bf501f25019cbf7fbf7c3ae4d5d7a8f",
    "361caabd6b98a4b1a7c236b2d69b0b3066daa06ed6ad27bfb9b7045d423b01a7":
        "1fcdc9b5cbeef42aff690d6b1808fe6c43911cb4bdec7dfa79f8f25ca8828f6a",
    "777672f118d41d8bf9b9a8f466bf3bdf0ec494f9af15312ce5064ebd90645086":
        "37f669851f4e8105c3fdde738f083188a1c91238ccfa99cdac87da77cf854a2a",
    "d80d41bd3e3692961cfa5f9f22e7da290e6f064dca789e0b7f0d37f8b16b00fb":
        "446593b928b243300c05eac66c39d609feeb163f60f5313a81d99e671526b786",
    "bc88da60dca14225e8c31923d67039106a508f58b507b8c171a7efc46a880614":
        "449bbe4e8bf01bb97a3dcdc988011d514d86c4e22b1e5e6177cc396b98e7bb5e",
    "20f4b87f754b4b654bcb02f620a0406f32fe44007f48db41aa09139aeec1252c":
        "708bfd8c0c7e8b99ed20015d3e60e753c3954193241e48acc2d6285530247951",
    "8f798c8b739c67d862ef8c46643069e3bc5005a3b550fb93ac9fe4b9b5085dea":
        "beea6b958673bd799e17ad91cfdb04ae1454c53c23d1ffd89609e54142cae81c",
    "f8602c761f0f831cec315bfe21869c78de78682bc2a5a22031c2a232da4662ac":
        "ead34336747ec4da99a411e93eae3886fd2cdec9d5632de96969fea3e564893e",
}


def kernels() -> str:
    """This machine's kernel choice, as a test failure names it."""
    return (f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, numpy "
            f"{np.__version__}, torch {torch.__version__}")


def assert_pinned(got: str, recorded: str, what: str = "released values") -> None:
    """AssertionError unless ``got`` is ``recorded`` or its counterpart on the other machine
    kind (:data:`COUNTERPARTS`)."""
    if got == recorded or got == COUNTERPARTS.get(recorded):
        return
    raise AssertionError(
        f"{what}: digest {got} is neither the recording's {recorded} nor its counterpart on "
        f"the other machine kind {COUNTERPARTS.get(recorded)} ({kernels()})")
