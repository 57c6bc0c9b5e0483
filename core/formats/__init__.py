"""Files a model lives in: Sol and Hugging Face folders (checkpoint), GGUF (gguf_io), what every reader
returns and checks (loaded), the tokenizer and chat templates (tokenizer, template_limits), and the
registry of where models are found on disk (registry)."""
