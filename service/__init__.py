"""The HTTP service: FastAPI over MetaNet (`create_app`, `python -m service`, `metanet serve`)."""

import os

# torch's CPU thread team (OpenMP) spins while it waits for its members by default. The service's
# other threads (the event loop, image decoding) then take cores from a spinning team, and a
# model call slows down several-fold (measured: a 1-image classify went from 4.5 ms to 17 ms on 2
# cores beside one other busy process). Passive waiting gives the cores back. Set before torch
# loads its OpenMP runtime; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
