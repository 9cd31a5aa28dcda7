"""Reading a worker's /metrics page strictly: a metric that is not there is a failure, never 0."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families


def samples(page: str, name: str) -> dict[frozenset, float]:
    """Every sample called `name` (full sample name, e.g. incstream_events_total), by label set."""
    found = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == name:
                found[frozenset(sample.labels.items())] = sample.value
    return found


def metric(page: str, name: str, **labels: str) -> float:
    """The one sample `name{labels}`; AssertionError if the page does not have it."""
    found = samples(page, name)
    key = frozenset(labels.items())
    if key not in found:
        near = sorted({n for line in page.splitlines() if line.startswith(name)
                       for n in [line.split(" ")[0]]})
        raise AssertionError(f"no sample {name}{labels or ''} on the metrics page "
                             f"(have: {near[:10]})")
    return found[key]


def metric_by(page: str, name: str, label: str) -> dict[str, float]:
    """`name`'s samples keyed by the value of one label; AssertionError if there are none."""
    found = {dict(key)[label]: value for key, value in samples(page, name).items()}
    if not found:
        raise AssertionError(f"no sample {name} on the metrics page")
    return found


def wait_metric(worker, name: str, expected: float, timeout_s: float = 15.0,
                **labels: str) -> float:
    """Scrape until `name{labels}` equals `expected` (gauges are sampled every 5 s); returns the
    last value read, for the caller to assert on."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = metric(worker.scrape(), name, **labels)
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.5)
