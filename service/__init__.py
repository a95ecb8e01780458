"""The HTTP service: FastAPI over MetaNet (`create_app`, `python -m service`, `metanet serve`)."""
