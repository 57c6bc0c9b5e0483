"""`sol serve`: the OpenAI API over Sol's models (FastAPI + uvicorn + sse-starlette).

app.py builds the app; one module per endpoint family holds its routes (info: health, models and
tokenize; chat; completions; embeddings); served.py is what they share, generate.py the engine requests
that chat and completions both make, chat_prompt.py messages into a prompt, protocol.py the request
fields and errors, constrain.py constrained decoding, log.py the request log."""
