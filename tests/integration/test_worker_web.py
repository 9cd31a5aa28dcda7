"""The worker's web port serves /metrics, /live and /ready and nothing else: no route gives out
document text (Faust's /table/<table>/<key>/ once returned a document's whole state). /ready is
false until table recovery has finished, and the state gauges are right the moment it is true
after a restart that recovers the table from its changelog (held events included: the gauge
once went to -1 after a restart).
"""

from __future__ import annotations

import ast
import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib

import pytest
from kafka_tools import produce_raw
from prom import metric

from incstream.pipeline.topic_reader import TopicReader
from incstream.state.document import MAGIC

pytestmark = pytest.mark.integration

SECRET = f"secret-{uuid.uuid4().hex}"
DOCS = {f"web-doc-{i}": f"Private draft {i}: {SECRET} do not share. " * 3 for i in range(3)}
GAPPED = "web-gapped"  # rev 0 applied, rev 2 held (rev 1 never sent until the end)
GAPPED_TEXT = f"gapped {SECRET}"

# Faust's built-in routes (faust-streaming 0.15.3: router, tables, production index, stats,
# graph, performance) and a few guesses, with and without a trailing slash.
PROBED = [
    "/", "/table", "/table/", "/table/documents", "/table/documents/",
    "/router", "/router/", "/router/documents", "/router/documents/",
    "/graph", "/graph/", "/stats", "/stats/", "/assignment", "/assignment/",
    "/performance", "/performance/", "/debug", "/admin", "/state", "/documents",
    "/metrics/documents", "/ready/documents", "/live/documents", "/..%2f", "/static/",
]
for doc_id in [*DOCS, GAPPED]:
    for prefix in ("/table/documents", "/router/documents", "/table/documents/key"):
        PROBED += [f"{prefix}/{doc_id}", f"{prefix}/{doc_id}/"]
    PROBED += [f"/{doc_id}", f"/documents/{doc_id}"]


def event(doc_id: str, rev: int, **fields) -> bytes:
    return json.dumps({"schema": "doc-edit/v1", "doc_id": doc_id, "rev": rev, **fields}).encode()


def reveals_text(body: bytes) -> bool:
    """The secret is in the body, as it is, escaped, or inside a stored state (zlib), also
    one given as a JSON string of a Python bytes literal (how Faust's /table/ answers)."""
    texts = [body, body.decode("unicode_escape", "replace").encode("latin-1", "replace")]
    with contextlib.suppress(ValueError, SyntaxError, UnicodeDecodeError):
        value = ast.literal_eval(json.loads(body))
        texts.append(value if isinstance(value, bytes) else str(value).encode())
    for text in list(texts):
        start = text.find(MAGIC)
        while start != -1:
            with contextlib.suppress(zlib.error):
                texts.append(zlib.decompressobj().decompress(text[start + 4:], 10**7))
            start = text.find(MAGIC, start + 1)
    return any(SECRET.encode() in text or urllib.parse.quote(SECRET).encode() in text
               for text in texts)


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def worker_with_documents(deployment):
    """A text-only worker that has stored DOCS and GAPPED (one held event)."""
    s = deployment.settings
    worker = deployment.worker(name="first", model="none").start()
    worker.wait_ready()
    reader = TopicReader(deployment.broker.bootstrap, [s.classes_topic]).start()
    try:
        for doc_id, text in DOCS.items():
            produce_raw(deployment.broker.bootstrap, s.edits_topic,
                        [(doc_id.encode(), event(doc_id, 0, snapshot=text))])
        produce_raw(deployment.broker.bootstrap, s.edits_topic,
                    [(GAPPED.encode(), event(GAPPED, 0, snapshot=GAPPED_TEXT))])
        produce_raw(deployment.broker.bootstrap, s.edits_topic, [(GAPPED.encode(), event(
            GAPPED, 2, ops=[{"retain": len(GAPPED_TEXT) + 4}, {"insert": " two"}]))])
        assert reader.wait_for(lambda: len(reader.of(s.classes_topic)) == len(DOCS) + 1, 60)
        assert reader.wait_for(
            lambda: metric(worker.scrape(), "incstream_events_total", outcome="gap") == 1, 30)
    finally:
        reader.stop()
    yield worker
    worker.stop()


def test_only_metrics_live_and_ready_are_served_and_none_gives_out_text(worker_with_documents):
    port = worker_with_documents.web_port
    served = []
    for path in PROBED:
        for method in ("GET", "POST"):
            status, body = get(port, path, method)
            assert not reveals_text(body), f"{method} {path} gave out document text"
            if status < 400:
                served.append((method, path, status, body[:100]))
    assert served == [], f"routes other than /metrics, /live, /ready answer: {served}"
    for path in ["/metrics", "/live", "/ready"]:
        status, body = get(port, path)
        assert status == 200, (path, status, body[:200])
        assert not reveals_text(body)
    page = worker_with_documents.scrape()
    assert metric(page, "incstream_documents") == len(DOCS) + 1
    assert metric(page, "incstream_held_events") == 1
    for doc_id in [*DOCS, GAPPED]:
        assert doc_id not in page  # no doc_id labels either


def test_ready_waits_for_recovery_and_the_recovered_state_is_counted(
        deployment, worker_with_documents, tmp_path):
    """A second worker with an empty data dir recovers the table from its changelog: /ready
    answers 503 first, and once it says 200 the gauges already count the recovered table."""
    s = deployment.settings
    first = worker_with_documents.scrape()
    stored_bytes = metric(first, "incstream_state_bytes")
    code, _ = worker_with_documents.stop()
    assert code == 0
    worker = deployment.worker(data_dir=tmp_path / "empty", name="second", model="none",
                               env={"INCSTREAM_LOG_FORMAT": "json"}).start()
    try:
        worker.wait_serving()
        answers = []
        while True:
            status, _ = get(worker.web_port, "/ready")
            if status == 200:
                page = worker.scrape()  # the gauges as they are the moment it is ready
                break
            answers.append(status)
            assert worker.alive()
            time.sleep(0.05)
        assert answers and set(answers) == {503}, answers
        assert get(worker.web_port, "/live")[0] == 200
        assert metric(page, "incstream_documents") == len(DOCS) + 1
        assert metric(page, "incstream_state_bytes") == stored_bytes
        assert metric(page, "incstream_held_events") == 1

        # The missing revision fills the gap: both apply, nothing is held (not -1).
        reader = TopicReader(deployment.broker.bootstrap, [s.classes_topic]).start()
        try:
            produce_raw(deployment.broker.bootstrap, s.edits_topic, [
                (GAPPED.encode(), event(GAPPED, 1, ops=[{"retain": len(GAPPED_TEXT)},
                                                        {"insert": " one"}]))])
            assert reader.wait_for(
                lambda: {r["rev"] for r in reader.of(s.classes_topic)
                         if r["doc_id"] == GAPPED} >= {1, 2}, 60)
        finally:
            reader.stop()
        assert reader.wait_for(
            lambda: metric(worker.scrape(), "incstream_outputs_total") == 2, 30)
        page = worker.scrape()
        assert metric(page, "incstream_held_events") == 0
        assert metric(page, "incstream_documents") == len(DOCS) + 1
    finally:
        log_path = worker.log_path
        worker.stop()
    # It ran with INCSTREAM_LOG_FORMAT=json: every line it logged is one JSON record.
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert {r["logger"].split(".")[0] for r in records} >= {"faust", "incstream"}
