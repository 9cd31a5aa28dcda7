"""The worker's web port: /metrics, /live and /ready, and nothing else.

Faust serves built-in routes next to an app's own pages: /table/<name>/<key>/ (a table's
stored value: for incstream, a document's full text), /router/..., an index at /, and with
debug /graph, /stats, /assignment. PrivateWeb is Faust's aiohttp server with none of them;
`build_app` selects it with `web=WEB_DRIVER_URL` (Faust's driver registry, the same one a
setuptools "faust.web.drivers" plugin fills) and also turns each of Faust's route settings off.
Bind it to 127.0.0.1 outside containers (INCSTREAM_WEB_HOST, the default).

- /metrics: the Prometheus exposition of the worker's registry;
- /live (200/503): the event loop answers (this page runs on it) and the agent makes
  progress: it has not held one event longer than INCSTREAM_LIVENESS_STALL_S, and it has
  taken an event within that time whenever the worker is ready and events wait for it;
- /ready (200/503): partitions assigned and table recovery finished, no rebalance going on,
  and the broker answers with the worker's topics (pipeline.broker_watch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import faust
from faust.web.drivers import DRIVERS
from faust.web.drivers.aiohttp import Web as AiohttpWeb
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from incstream.pipeline.metrics import WorkerMetrics


class PrivateWeb(AiohttpWeb):
    """Faust's aiohttp web server with none of Faust's built-in blueprints."""

    default_blueprints = ()
    production_blueprints = ()
    debug_blueprints = ()
    optional_blueprints = ()


DRIVERS["incstream-private"] = f"{__name__}:PrivateWeb"
WEB_DRIVER_URL = "incstream-private://"
# Faust's own switches for its routes, all off (PrivateWeb would not serve them anyway).
BUILTIN_ROUTES_OFF = {
    "web_router_enabled": False,
    "web_tables_enabled": False,
    "web_stats_enabled": False,
    "web_graph_enabled": False,
    "web_metrics_enabled": False,
}


class AgentProgress:
    """What /live judges: when the agent took and finished events, and whether events wait."""

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self.in_hand_since: float | None = None
        self.last_progress = time.monotonic()  # last event finished, or the worker got ready
        self.events_waiting = False  # the lag probe's last answer: lag on an assigned partition

    def took_event(self) -> None:
        self.in_hand_since = time.monotonic()

    def finished_event(self) -> None:
        self.in_hand_since = None
        self.last_progress = time.monotonic()

    def became_ready(self) -> None:
        """Recovery just finished: idle time before this (recovering, rebalancing) is not a
        stall."""
        self.last_progress = time.monotonic()

    def stall(self, ready: bool) -> str | None:
        """Why the agent looks stuck, or None."""
        now = time.monotonic()
        if self.in_hand_since is not None and now - self.in_hand_since > self.stall_after_s:
            return f"one event in hand for {now - self.in_hand_since:.0f} s"
        if ready and self.events_waiting and self.in_hand_since is None \
                and now - self.last_progress > self.stall_after_s:
            return f"events wait, none taken for {now - self.last_progress:.0f} s"
        return None


def is_ready(app: faust.App) -> bool:
    return app.tables.recovery.completed.is_set() and not app.rebalancing


def add_routes(app: faust.App, metrics: WorkerMetrics, progress: AgentProgress,
               broker_usable: Callable[[], bool] = lambda: True) -> None:
    """The worker's three pages."""

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        # aiohttp wants the charset outside content_type; the exposition format is UTF-8 text.
        content_type = CONTENT_TYPE_LATEST.split("; charset")[0]
        return web.bytes(generate_latest(metrics.registry), content_type=content_type)

    @app.page("/ready")
    async def ready_page(web: Any, request: Any) -> Any:
        """200 once the worker has its partitions and has restored its table (it consumes
        from here on); 503 before that, during a rebalance and while the broker does not
        answer or lacks the worker's topics. Tests send nothing before this:
        events produced while a fresh group's worker restored a non-empty changelog were
        skipped in about half the runs here (faust-streaming 0.15.3 drops what it fetches
        while tables recover and counts on a seek to the committed offset to read it again;
        with nothing committed there was none). Not fixed in the worker yet."""
        ready = is_ready(app) and broker_usable()
        return web.text("ready\n" if ready else "not ready\n", status=200 if ready else 503)

    @app.page("/live")
    async def live_page(web: Any, request: Any) -> Any:
        stall = progress.stall(is_ready(app))
        if stall is None:
            return web.text("live\n")
        return web.text(f"stalled: {stall}\n", status=503)
