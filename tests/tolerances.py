"""One tolerance table per dtype behind one assert helper (instead of atol= sprinkled in tests)."""

import torch

TOLERANCES = {
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1e-2},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **override) -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``actual``'s dtype."""
    tol = dict(TOLERANCES.get(actual.dtype, TOLERANCES[torch.float32]))
    tol.update(override)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)
