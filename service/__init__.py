"""The HTTP service: FastAPI over MetaNet (`metanet serve`, `python -m service`).

    process/    the app factory, the server and its supervisor, logs and metrics
    http/       routes (/v1, the Open Inference Protocol's /v2, probes, docs, the demo page)
    inference/  the engine: the one door to the model (batching, admission, image intake)
    storage/    the task store (SQLite or Redis behind one interface) and the memory cache
    settings.py, errors.py: what every package reads and raises

Dependencies point down that list (service.cli, the command line, sits on top); the import
contract in pyproject.toml (`lint-imports`) keeps them so.
"""
