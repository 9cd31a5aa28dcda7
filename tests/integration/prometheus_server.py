"""A real Prometheus server (Debian's `prometheus` package) for the integration tests: its own
temp dir and free port, a 1 s scrape and rule-evaluation interval, queried over its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from incstream.pipeline.broker import free_port, terminate

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"


def binary(name: str) -> str | None:
    return shutil.which(name)


def rules_with_short_for(for_s: str, dest: Path) -> Path:
    """deploy/prometheus/rules.yml with every alert's `for:` set to `for_s` and nothing else
    changed: the shipped expressions are what the test evaluates."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and "for" in rule:
                rule["for"] = for_s
    dest.write_text(yaml.safe_dump(rules, sort_keys=False))
    return dest


class PrometheusServer:
    def __init__(self, root: Path, targets: list[str], rules: Path) -> None:
        self.root = root
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "incstream", "metrics_path": "/metrics",
                                "static_configs": [{"targets": targets}]}],
        }
        self.config = root / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> PrometheusServer:
        command = [binary("prometheus") or "prometheus", f"--config.file={self.config}",
                   f"--storage.tsdb.path={self.root / 'data'}",
                   f"--web.listen-address=127.0.0.1:{self.port}"]
        log = open(self.root / "prometheus.log", "wb")  # noqa: SIM115 (the child holds it)
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.process.returncode}; see "
                                   f"{self.root / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus was not ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector (or scalar, as one sample) `expr` returns now."""
        data = self.api("query", query=expr)
        if data["resultType"] == "vector":
            return data["result"]
        return [{"metric": {}, "value": data["result"]}]

    def firing(self) -> dict[str, list[dict]]:
        """Alerts firing now (pending ones left out), by name."""
        alerts: dict[str, list[dict]] = {}
        for alert in self.api("alerts")["alerts"]:
            if alert["state"] == "firing":
                alerts.setdefault(alert["labels"]["alertname"], []).append(alert)
        return alerts

    def wait_for(self, condition, timeout_s: float, what):
        """Poll `condition()` until it is truthy; its last value (AssertionError if none,
        saying `what`: a string, or a function giving one then)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert value, f"{what() if callable(what) else what} within {timeout_s:.0f} s"
        return value

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            terminate(process, 10.0)
