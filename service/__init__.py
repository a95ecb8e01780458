"""The HTTP service: FastAPI over MetaNet (`create_app`, `python -m service`, `metanet serve`)."""

import os

# torch's CPU thread team (OpenMP, GNU libgomp in the Linux wheels) spins while it waits for work
# by default. Beside another busy thread (the event loop under load) a spinning team makes model
# calls several-fold slower; sleeping at once (PASSIVE) costs some latency on an idle machine but
# holds up under contention, and the engine runs small forwards on one thread, which wakes no one
# (Settings.one_thread_below_images). `python bench/omp_wait.py` (bench/results/omp-wait-*.json),
# 1-image classify p50 / p99 ms beside a busy process: passive 4.6 / 7.6, libgomp's default spin
# 7.8 / 150, GOMP_SPINCOUNT=10000 18.6 / 36.4, passive on one thread 4.0 / 5.6; alone: passive
# 6.7 / 9.5, default spin 2.8 / 4.2, passive on one thread 3.7 / 4.5.
# Set before torch loads its OpenMP runtime; OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment
# wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
