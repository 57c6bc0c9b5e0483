"""`sol serve`: the OpenAI API over Sol's models (FastAPI + uvicorn + sse-starlette)."""
