"""The evaluation harness: how well attributions predict what training data does (`python -m precompute
evaluate ...`, cli.py).

Shared by both benchmarks: retrain.py (the one training recipe and its model cache), metrics.py (the LDS,
TRAK section 2, with bootstrap intervals), baselines.py (pixel, embedding, random), ceiling.py (how much of
a retraining truth is signal), counterfactual.py (Journey-TRAK's counterfactual test on the digits) and
label_agreement.py. digits/: the LDS benchmark on sklearn's 8x8 digits, every method from cached features.
shipped/: the shipped model's benchmark, scored through index directories: its ground truth (truth.py,
ground_truth.py with shared seeds), lds.py, step_quality.py and step_counterfactual.py.
"""
