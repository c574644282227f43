"""The shipped model's benchmark, scored through index directories (what the explorer serves is measured):
truth.py (the subset models and their truth files), ground_truth.py (the truth with shared seeds, `evaluate
truth`), lds.py (`evaluate shipped-lds`), step_quality.py and step_counterfactual.py (per-step queries)."""
