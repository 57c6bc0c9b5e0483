"""Judging models: `sol eval` (perplexity, multiple choice, exact answers), results kept per model, and
`sol compare` (several models on one prompt) with blind votes rated by Elo.

- tasks.py:      reading the data files, each bad line named file:line
- choice.py:     multiple choice scored as lm-evaluation-harness scores it
- perplexity.py: strided perplexity over a text
- exact.py:      greedy chat answers that must contain the right answer
- run.py:        one entry point with progress and a cancel flag (the CLI and the GUI both call it)
- results.py:    where results are kept, and reading them back across a model's lineage
- compare.py:    several models answering one prompt at once
- ratings.py:    win rates and Elo (with its uncertainty) from votes
"""
