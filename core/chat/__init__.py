"""A conversation: the session and its tool loop (session), and the SQLite store that keeps
conversations, settings and the model registry (store)."""
