"""The process: the app factory (`app`), its live parts and their life cycle (`runtime`), the
server under uvicorn (`server`, `wire`), several server processes on one port (`supervisor`), logs
and metrics.
"""
