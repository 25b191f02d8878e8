"""lmshare benchmarks: ``python -m benchmarks`` runs them all and prints Markdown tables."""
