"""Suite-wide rules: in CI no test may skip, except one that needs a GPU.

A skipped test tests nothing, and a skip that always happens in CI (data never fetched, a
service never started) hides a broken promise for good. So when ``CI`` is true (CI runs
``.ci/run`` with CI=true) or ``INCSTREAM_NO_SKIPS=1``, every skip turns into a failure that
says why it skipped, unless the test is marked ``@pytest.mark.gpu``: CI machines have no GPU.
A ``gpu`` test is skipped automatically where CUDA is not available. Locally (neither variable
set) skips stay skips, so the suite runs offline and without ../shared.
"""

from __future__ import annotations

import os

import pytest

GPU_SKIP_REASON = "needs a CUDA GPU (none here)"


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist (`./dev test` runs 2 processes) each process gets one torch thread:
    # two processes with a thread per core each would fight over the cores. Set before any
    # test module imports torch; worker processes the tests start set their own threads.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")


def skips_forbidden() -> bool:
    flags = (os.environ.get("INCSTREAM_NO_SKIPS", ""), os.environ.get("CI", ""))
    return any(f.strip().lower() in {"1", "true", "yes"} for f in flags)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))


def _skip_reason(longrepr: object) -> str:
    text = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and skips_forbidden()
            and item.get_closest_marker("gpu") is None):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in CI, where only tests marked `gpu` may skip: "
            f"{_skip_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and skips_forbidden():  # a whole module skipped at import
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} skipped in CI, where only tests marked `gpu` "
                           f"may skip: {_skip_reason(report.longrepr)}")
