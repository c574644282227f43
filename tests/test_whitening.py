import numpy as np
import pytest

from explorer.errors import ExplorerError
from explorer.whitening import (
    GCV_GRID,
    cholesky_factor,
    choose_lambda_gcv,
    given_lambda,
    normalize_rows,
    whiten,
)


def test_whitened_inner_product_is_the_trak_score():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(300, 20)) * rng.uniform(0.1, 5, size=20)
    lam = 0.7
    factor = cholesky_factor(phi, lam)
    queries = rng.normal(size=(5, 20))
    exact = queries @ np.linalg.solve(phi.T @ phi + lam * np.eye(20), phi.T)  # (5, 300)
    whitened = whiten(queries, factor) @ whiten(phi, factor).T
    assert np.allclose(whitened, exact, rtol=1e-4, atol=1e-6)


def test_gcv_picks_a_grid_value_at_the_curve_minimum():
    rng = np.random.default_rng(1)
    phi = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    choice = choose_lambda_gcv(phi, seed=0)
    relatives = [r for r, _ in choice.curve]
    assert choice.relative in GCV_GRID.tolist() and relatives == GCV_GRID.tolist()
    assert choice.relative == min(choice.curve, key=lambda point: point[1])[0]
    assert choice.value > 0 and choice.method == "gcv"
    assert choose_lambda_gcv(phi, seed=0).value == choice.value


def test_given_lambda_and_bad_values():
    phi = np.eye(4)
    assert given_lambda(phi, 2.0).value == pytest.approx(2.0 * 1.0)  # mean eigenvalue of I_4 is 1
    with pytest.raises(ExplorerError, match="must be > 0"):
        given_lambda(phi, 0.0)
    with pytest.raises(ExplorerError, match="all zero"):
        choose_lambda_gcv(np.zeros((20, 3)))


def test_normalize_rows_keeps_zero_rows():
    rows = normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(rows, [[0.6, 0.8], [0.0, 0.0]])
