"""The LDS benchmark on sklearn's 8x8 digits (`python -m precompute evaluate lds --benchmark digits`): lds.py
runs it; config.py, ground_truth.py (queries and f_j(q)), scores.py (every method from cached features),
defaults.py and studies.py (the shipped default and the side studies), report.py (tables and plot)."""
