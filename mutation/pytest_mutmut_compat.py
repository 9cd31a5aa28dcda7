"""pytest plugin loaded only in `./dev mutate` runs (mutation/mutate.py passes `-p`).

1. mutmut 3.7.0 (the newest release that accepts our click<8.4) records which test reached a
   mutated function with ``item._nodeid``, an attribute pytest 9 no longer has (mutmut 3.8
   reads ``item.nodeid``). Give every item the old attribute.
2. Hypothesis tests draw new examples on every run, so one mutant could be killed in one run
   and survive the next. Derandomize them, and keep no example database, so a mutation run is
   repeatable and its score comparable before and after new tests.
"""

from __future__ import annotations

import pytest

try:
    from hypothesis import settings

    settings.register_profile("mutmut", derandomize=True, database=None)
    settings.load_profile("mutmut")
except ImportError:  # pragma: no cover - hypothesis is in requirements-dev.lock
    pass


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not hasattr(item, "_nodeid"):
            item._nodeid = item.nodeid  # type: ignore[attr-defined]
