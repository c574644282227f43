"""The benchmark pages that bench/report.py writes: core.py holds the page registry, the helpers and the
render / check / write functions; the page modules register their builders when imported, here, in the
order of MODULES (the order of the index page)."""

import importlib

MODULES = (
    "speed",
    "scale",
    "accuracy",
    "steps",
    "truth",
    "step_counterfactual",
    "region",
    "app",
    "fast_path",
    "journey",
    "lambda_grid",
    "methods",
)

for _name in MODULES:
    importlib.import_module(f"{__name__}.{_name}")
