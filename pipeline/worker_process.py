"""A worker as a separate OS process: how the demo and the integration tests run one.

The worker is started exactly as a deployment would start it (`incstream worker ...`), so
what the tests exercise is the real thing: its own event loop, RocksDB directory, web port
and signal handling.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from incstream.pipeline.broker import free_port, terminate


@dataclass
class WorkerProcess:
    broker_url: str
    data_dir: Path
    partitions: int = 4
    web_port: int = 0  # 0: pick a free one
    log_path: Path | None = None
    app_id: str = "incstream"
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}/metrics"

    def start(self) -> WorkerProcess:
        if not self.web_port:
            self.web_port = free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "incstream.pipeline.cli", "worker",
            "--broker", self.broker_url,
            "--data-dir", str(self.data_dir),
            "--web-port", str(self.web_port),
            "--partitions", str(self.partitions),
            "--app-id", self.app_id,
            *self.extra_args,
        ]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", **self.env}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def scrape(self, timeout_s: float = 5.0) -> str:
        """The worker's /metrics page, as Prometheus would read it."""
        with urllib.request.urlopen(self.metrics_url, timeout=timeout_s) as response:
            return response.read().decode("utf-8")

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        """Block until /metrics answers (the web server starts once the app is up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker exited with code {self.process.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                self.scrape(timeout_s=1.0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.3)
        raise TimeoutError(f"worker did not serve {self.metrics_url} within {timeout_s:.0f} s")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until /ready says 200: partitions assigned, table restored, consuming."""
        url = f"http://127.0.0.1:{self.web_port}/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker exited with code {self.process.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass  # not serving yet, or 503: not ready
            time.sleep(0.3)
        raise TimeoutError(f"worker was not ready ({url}) within {timeout_s:.0f} s")

    def stop(self, grace_s: float = 30.0) -> tuple[int | None, float]:
        """SIGTERM, SIGKILL after `grace_s`. Returns (exit code, seconds it took to exit)."""
        process, self.process = self.process, None
        if process is None:
            return None, 0.0
        started = time.monotonic()
        code = terminate(process, grace_s)
        return code, time.monotonic() - started

    def wait_exit(self, timeout_s: float) -> int | None:
        """Wait for the process to end by itself; its exit code (None: still running)."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to flush or commit anything."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
