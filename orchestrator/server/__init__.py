"""The Sortie API server (issue 23): one FastAPI app under uvicorn, the JSON API under `/api/v1` (OpenAPI at
`/api/v1/openapi.json`). Every request is authenticated (`orchestrator.auth`) and served by the same service layer as
local mode, acting for the request's identity. `daemon.py` runs it (`sortie api start`)."""

API_VERSION = 1
VERSION_HEADER = "X-Sortie-Version"
API_HEADER = "X-Sortie-Api"
