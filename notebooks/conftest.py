"""The notebooks run as tests (nbmake, `make test`) the way tests/ do: against the tests' own cluster,
which their kernels find through the RAY_ADDRESS they inherit, never beside another test's `alone()`
block, and with that cluster stopped at the end. tests/conftest.py's hooks reach only the items
under tests/, so they are registered here too."""

from __future__ import annotations

import pytest

from tests.conftest import pytest_runtest_protocol, pytest_sessionfinish, session_cluster_address

__all__ = ["pytest_runtest_protocol", "pytest_sessionfinish"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The kernel starts after this: it inherits the address of the tests' own cluster."""
    session_cluster_address()
