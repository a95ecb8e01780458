"""The HTTP service: FastAPI over MetaNet (`create_app`, `python -m service`, `metanet serve`)."""

import os

# torch's CPU thread team (OpenMP, GNU libgomp in the Linux wheels) waits for work by spinning
# for GOMP_SPINCOUNT iterations (300,000 by default) before it sleeps. Spinning that long takes
# cores from the service's other threads (the event loop) and slowed a model call several-fold on
# 2 cores; sleeping at once (OMP_WAIT_POLICY=PASSIVE) pays a futex wake-up at every parallel
# region and doubled a 1-image classify (8.6 ms against 3.5 ms, in process). A short spin keeps a
# forward's back-to-back regions awake and gives the cores back within microseconds after it.
# Set before torch loads its OpenMP runtime; OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment
# wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
