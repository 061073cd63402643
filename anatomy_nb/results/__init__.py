"""Readers of every stage's artifact. Nothing here imports torch: a run directory can be opened,
read, plotted and reported on a machine without it (``results.run.RunDir`` is the way in)."""
