"""The book's views of what a model sees: sentence scores (score), the logit lens (lens) and token
embeddings (embeddings). Attention capture is the Transformer's own (forward_with_attention)."""
