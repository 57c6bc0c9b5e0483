"""Making tokens: sampling and its explanation (sampling), one sequence at a time (engine), many at once
with requests joining between steps (batch), and the captured fixed-shape decode step (decode_step)."""
