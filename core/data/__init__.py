"""Training data: text corpora as token memmaps, chat / preference / prompt JSONL, synthetic generators."""
