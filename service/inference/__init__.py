"""Inference: the engine (`engine.Engine`), the one door between the service and the model.

It batches requests (`batcher`), admits or refuses them, and turns request images into model inputs
(`intake`, run where `decoding` says). Only this package imports `model` or torch.
"""

import os

# torch's CPU thread team (OpenMP) spins while it waits for work by default. Beside another busy
# thread (the event loop under load) a spinning team makes model calls several-fold slower, so it
# sleeps at once instead (docs/performance.md, "OpenMP wait policy"). Set before torch loads its
# OpenMP runtime; OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
