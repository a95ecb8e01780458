"""The HTTP service: FastAPI over MetaNet (`create_app`, `python -m service`, `metanet serve`)."""

import os

# torch's CPU thread team (OpenMP, GNU libgomp in the Linux wheels) spins while it waits for work
# by default. Beside another busy thread (the event loop under load) a spinning team makes model
# calls several-fold slower; sleeping at once (PASSIVE) costs some latency on an idle machine but
# holds up under contention. `python bench/omp_wait.py` (bench/results/omp-wait-*.json), 1-image
# classify beside a busy process, p50 / p99: passive 7.3 / 8.8 ms, libgomp's default spin
# 7.5 / 161 ms, GOMP_SPINCOUNT=10000 37 / 44 ms; alone: passive 13.2 / 26.7 ms, default 3.1 / 6.7.
# Set before torch loads its OpenMP runtime; OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment
# wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
