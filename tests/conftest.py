import os

import torch

# Tests run on 2-core CI machines; keep each process to one intra-op thread so parallel
# work (helpers, subprocesses) does not oversubscribe the cores.
torch.set_num_threads(1)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
