"""A small local HTTP endpoint for the on-device app (stdlib ``http.server``, one thread per request).

Bound to 127.0.0.1 by default: it has no authentication, so it is for apps on the same
device only (the config refuses a non-loopback bind unless ``http.allow_remote``).

Routes (JSON in and out; every error is ``{"error": "..."}`` with a 4xx/5xx status):

- ``GET  /health``        ``{"status": "ok", "device_id", "bundle_version", ...}``
- ``GET  /state``         the device state summary (counters, φ shapes and norms, store counts)
- ``POST /interactions``  body: one event, a list of events, or ``{"events": [...]}``; an event is
  ``{"event_id": str, "kind": "impression"|"click"|"interaction", "item": int, "ts": float?}``.
  200 with ``{"added", "duplicates", "pruned", "rejected": []}`` when every event was stored
  (or already was); 422 with the same body when some were rejected (the valid ones are stored;
  resending the whole batch is safe: ingestion is idempotent on ``event_id``).
- ``POST /rank``          body ``{"candidates": [item ids], "k": int?}`` ->
  ``{"items": [...best first], "scores": [...], "bundle_version", "phi_source"}``.

Bad JSON or a wrong shape is a 400 naming the problem; a body over 1 MiB is a 413; an
unexpected exception in a handler is a 500 and is logged — the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from dccl.errors import DcclError

log = logging.getLogger("dccl.edge.http")

MAX_BODY = 1 << 20
MAX_CANDIDATES = 10_000


class Service(Protocol):
    """What the endpoint needs from the agent (``edge_agent.agent.Agent`` implements it)."""

    def health(self) -> dict[str, Any]: ...
    def state_summary(self) -> dict[str, Any]: ...
    def ingest(self, events: list[Any]) -> Any: ...          # returns an IngestResult
    def rank(self, candidates: list[int], k: int | None = None) -> dict[str, Any]: ...


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_events(body: Any) -> list[Any]:
    if isinstance(body, dict) and "events" in body:
        if set(body) != {"events"}:
            raise BadRequest(400, f"unexpected keys {sorted(set(body) - {'events'})}; expected only 'events'")
        body = body["events"]
    elif isinstance(body, dict):
        body = [body]
    if not isinstance(body, list):
        raise BadRequest(400, "body must be an event object, a list of events, or {\"events\": [...]}")
    return body


def parse_rank(body: Any) -> tuple[list[int], int | None]:
    if not isinstance(body, dict) or "candidates" not in body:
        raise BadRequest(400, 'body must be {"candidates": [item ids], "k": optional int}')
    extra = set(body) - {"candidates", "k"}
    if extra:
        raise BadRequest(400, f"unknown key(s) {sorted(extra)}")
    cands, k = body["candidates"], body.get("k")
    if not isinstance(cands, list) or not cands:
        raise BadRequest(400, "candidates must be a non-empty list of item ids")
    if len(cands) > MAX_CANDIDATES:
        raise BadRequest(400, f"{len(cands)} candidates: at most {MAX_CANDIDATES} per request")
    for i, c in enumerate(cands):
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise BadRequest(400, f"candidates[{i}] = {json.dumps(c)}: must be an item id >= 1")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise BadRequest(400, f"k = {json.dumps(k)}: must be an integer >= 1")
    return cands, k


class _Handler(BaseHTTPRequestHandler):
    server_version = "dccl-edge"
    protocol_version = "HTTP/1.1"
    timeout = 15                       # a stalled client cannot hold a thread forever

    @property
    def service(self) -> Service:
        return self.server.service    # type: ignore[attr-defined]

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, obj: Any) -> None:
        data = json.dumps(obj, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise BadRequest(411, "chunked bodies are not supported; send Content-Length")
        if length is None:
            raise BadRequest(411, "Content-Length required")
        try:
            n = int(length)
        except ValueError:
            raise BadRequest(400, f"bad Content-Length {length!r}") from None
        if n < 0:
            raise BadRequest(400, f"bad Content-Length {length!r}")
        if n > MAX_BODY:
            self.close_connection = True       # don't read a huge body just to discard it
            raise BadRequest(413, f"body of {n} bytes is over the {MAX_BODY}-byte limit")
        raw = self.rfile.read(n)
        if len(raw) < n:
            self.close_connection = True
            raise BadRequest(400, f"body truncated: got {len(raw)} of {n} bytes")
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest(400, "body is not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise BadRequest(400, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        routes = {("GET", "/health"), ("GET", "/state"), ("POST", "/interactions"), ("POST", "/rank")}
        try:
            if (method, path) not in routes:
                if any(p == path for _, p in routes):
                    allowed = ", ".join(m for m, p in routes if p == path)
                    raise BadRequest(405, f"{method} {path}: method not allowed (use {allowed})")
                raise BadRequest(404, f"no route {path}; routes: GET /health, GET /state, "
                                      "POST /interactions, POST /rank")
            if path == "/health":
                self._send(200, self.service.health())
            elif path == "/state":
                self._send(200, self.service.state_summary())
            elif path == "/interactions":
                res = self.service.ingest(parse_events(self._read_json())).as_dict()
                self._send(422 if res["rejected"] else 200, res)
            else:
                cands, k = parse_rank(self._read_json())
                self._send(200, self.service.rank(cands, k))
        except BadRequest as exc:
            self._error(exc.status, str(exc))
        except DcclError as exc:          # e.g. no bundle yet, item outside the catalogue
            self._error(400 if method == "POST" else 503, str(exc))
        except Exception as exc:          # noqa: BLE001 - the server must outlive any request
            log.exception("internal error on %s %s", method, path)
            self._error(500, f"internal error: {type(exc).__name__}: {exc}")

    def do_GET(self) -> None:         # noqa: N802 (http.server naming)
        self._dispatch("GET")

    def do_POST(self) -> None:        # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:         # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:      # noqa: N802
        self._dispatch("DELETE")


class EdgeHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0):
        self.service = service
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start_background(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                             name="dccl-edge-http", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def make_server(service: Service, host: str = "127.0.0.1", port: int = 0) -> EdgeHttpServer:
    """Bind the endpoint; raises DcclError naming the address when it cannot."""
    try:
        return EdgeHttpServer(service, host, port)
    except OSError as exc:
        raise DcclError(f"http {host}:{port}: cannot bind ({exc.strerror or exc})") from None
