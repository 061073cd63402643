"""Readers of every stage's artifact. Nothing here imports torch: a run directory can be opened,
read, plotted and reported on a machine without it (``results.run.Run`` is the way in)."""
