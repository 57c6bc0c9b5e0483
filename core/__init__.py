"""Sol's headless engine. Nothing under core/ may import Qt (a test enforces it)."""
