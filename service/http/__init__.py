"""The HTTP layer: /v1's routes (`routes`), the Open Inference Protocol's /v2 (`v2`, `v2_tensors`),
the bodies (`schemas`), the error handler (`errors`), dependencies and lean routes (`deps`), body
limits (`limits`), API keys and rate limits (`tenants`), the OpenAPI schema and its docs pages
(`openapi`), the demo page (`demo`), the request log, and what the routes do (`tasks`).
"""
