"""The labelling server: a Starlette app over a :class:`~mmalign.annotate.store.LabelStore`, run by uvicorn.

Routes (JSON unless noted)::

    GET  /                      the page (static/index.html; ``?token=`` sets the token cookie)
    GET  /api/next?annotator=ID the item to label now and the progress counter
    POST /api/label             {label_id, annotator, item, choice, segments?, elapsed_ms}
    POST /api/undo              {annotator, label_id}
    GET  /media/{item}/{0|1}    media a or b of an item (by manifest index, never by path)

Safety: every request passes :class:`Guard` (token when one is set, per-client rate limit, body size
limit, Host header check on loopback against DNS rebinding); POST bodies must be ``application/json``
(which a cross-site form cannot send without a CORS preflight this server never grants) and are
validated by pydantic models that forbid unknown fields. A rejected request changes nothing.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from pathlib import Path
from typing import Any, Literal

from mmalign.annotate.items import Item
from mmalign.annotate.store import Conflict, LabelStore
from mmalign.config import ConfigError

STATIC = Path(__file__).parent / "static"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ID_PATTERN = r"^[A-Za-z0-9_.@+-]{1,64}$"
LABEL_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
TOKEN_COOKIE = "mmalign_annotate_token"


def require_server_deps() -> None:
    try:
        import pydantic  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"`mmalign annotate serve` needs {err.name}: pip install 'mmalign[annotate]'"
        ) from err


def _models():
    from pydantic import BaseModel, ConfigDict, Field

    class LabelIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        label_id: str = Field(pattern=LABEL_ID_PATTERN)
        annotator: str = Field(pattern=ID_PATTERN)
        item: str = Field(min_length=1, max_length=80)
        choice: Literal["left", "right", "tie", "skip"]
        segments: list[Literal["left", "right", "tie"]] | None = Field(default=None, max_length=2000)
        elapsed_ms: int = Field(ge=0, le=7 * 24 * 3600 * 1000)

    class UndoIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        annotator: str = Field(pattern=ID_PATTERN)
        label_id: str = Field(pattern=LABEL_ID_PATTERN)

    return LabelIn, UndoIn


class Guard:
    """ASGI middleware: access token, Host check, per-client token-bucket rate limit, body size limit.

    Args:
        app: the wrapped ASGI app.
        token: required on every request when set (``?token=``, ``Authorization: Bearer``, ``X-Token``
            header or the cookie the page sets).
        rate: sustained requests per second per client address (burst: twice that).
        max_body: largest request body in bytes.
        allowed_hosts: Host header names accepted (``None``: any, when a token protects the server).
    """

    def __init__(self, app, *, token: str | None, rate: float, max_body: int, allowed_hosts: set[str] | None):
        self.app, self.token, self.rate, self.max_body = app, token, rate, max_body
        self.allowed_hosts = allowed_hosts
        self.buckets: dict[str, tuple[float, float]] = {}

    async def _reply(self, send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _allow(self, client: str) -> bool:
        now = time.monotonic()
        tokens, last = self.buckets.get(client, (2 * self.rate, now))
        tokens = min(2 * self.rate, tokens + (now - last) * self.rate)
        if len(self.buckets) > 10_000:  # forget idle clients
            self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60}
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            return False
        self.buckets[client] = (tokens - 1, now)
        return True

    def _token_ok(self, scope) -> bool:
        from urllib.parse import parse_qs

        if self.token is None:
            return True
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = []
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given += query.get("token", [])
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        if "x-token" in headers:
            given.append(headers["x-token"])
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == TOKEN_COOKIE:
                given.append(value)
        return any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None:
            host = headers.get("host", "")
            name = (
                host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            )
            if name not in self.allowed_hosts:
                return await self._reply(
                    send, 400, f"Host {host!r} not allowed (the server is bound to loopback)"
                )
        client = (scope.get("client") or ("?", 0))[0]
        if not self._allow(client):
            return await self._reply(send, 429, "too many requests; slow down")
        if not self._token_ok(scope):
            return await self._reply(
                send, 401, "missing or wrong access token (open the URL the server printed)"
            )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._reply(send, 413, f"request body over {self.max_body} bytes")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited_receive, send)


class BodyTooLarge(Exception):
    """Raised by the guarded ``receive`` once a body without Content-Length outgrows the limit."""


def item_payload(store: LabelStore, item: Item, annotator: str) -> dict[str, Any]:
    """What the page needs to show an item; which side holds media a stays on the server."""
    flip = store.flipped(annotator, item.id)
    left, right = (1, 0) if flip else (0, 1)
    return {
        "id": item.id,
        "prompt": item.prompt,
        "kind": item.kind,
        "left": f"media/{item.id}/{left}",
        "right": f"media/{item.id}/{right}",
        "segments": item.segments,
        "duration": item.duration,
    }


def create_app(
    store: LabelStore,
    *,
    token: str | None = None,
    rate: float = 100.0,
    max_body: int = 65536,
    allowed_hosts: set[str] | None = None,
):
    """The Starlette app wrapped in :class:`Guard`."""
    from pydantic import ValidationError
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.routing import Route

    LabelIn, UndoIn = _models()
    page = (STATIC / "index.html").read_text()
    annotator_re = re.compile(ID_PATTERN)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def index(request: Request):
        response = HTMLResponse(
            page,
            headers={
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )
        if token is not None:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    async def next_item(request: Request):
        annotator = request.query_params.get("annotator", "")
        if not annotator_re.match(annotator):
            return error(422, "annotator: 1-64 letters, digits or _.@+-")
        item = store.next_item(annotator)
        return JSONResponse(
            {
                "item": item_payload(store, item, annotator) if item else None,
                "progress": store.progress(annotator),
            }
        )

    async def read_json(request: Request, model):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return None, error(415, "send the body as application/json")
        try:
            body = await request.body()
            return model.model_validate_json(body), None
        except BodyTooLarge:
            return None, error(413, "request body too large")
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return None, error(422, f"{where}: {first['msg']}")

    async def label(request: Request):
        data, bad = await read_json(request, LabelIn)
        if bad is not None:
            return bad
        try:
            rec, new = store.submit(
                label_id=data.label_id,
                annotator=data.annotator,
                item_id=data.item,
                choice=data.choice,
                segments=data.segments,
                elapsed_ms=data.elapsed_ms,
            )
        except KeyError:
            return error(404, f"item {data.item!r} is not in the manifest")
        except Conflict as err:
            return error(409, str(err))
        except ValueError as err:
            return error(422, str(err))
        except OSError as err:  # the page keeps the label and retries
            return error(503, f"cannot write the labels file: {err}")
        return JSONResponse(
            {"ok": True, "new": new, "label_id": rec["label_id"], "progress": store.progress(data.annotator)}
        )

    async def undo(request: Request):
        data, bad = await read_json(request, UndoIn)
        if bad is not None:
            return bad
        try:
            item = store.undo(annotator=data.annotator, label_id=data.label_id)
        except KeyError:
            return error(404, f"no label {data.label_id!r} by {data.annotator!r}")
        except OSError as err:
            return error(503, f"cannot write the labels file: {err}")
        return JSONResponse(
            {
                "ok": True,
                "item": item_payload(store, item, data.annotator),
                "progress": store.progress(data.annotator),
            }
        )

    async def media(request: Request):
        item = store.by_id.get(request.path_params["item"])
        side = request.path_params["side"]
        if item is None or side not in ("0", "1"):
            return error(404, "no such item medium")
        path = item.media[int(side)]
        if not Path(path).is_file():
            return error(404, "the file listed in the manifest is gone")
        return FileResponse(
            path, headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
        )

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/next", next_item, methods=["GET"]),
        Route("/api/label", label, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/media/{item}/{side}", media, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    return Guard(app, token=token, rate=rate, max_body=max_body, allowed_hosts=allowed_hosts)


def serve(
    store: LabelStore,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    rate: float = 100.0,
    max_body: int = 65536,
) -> None:
    """Bind, print the URL (with the token) and serve until interrupted."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as err:  # in use, not this machine's address, out of 0-65535
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there: {err}") from None
    sock.listen(2048)  # connections made once the URL is printed wait in the backlog until uvicorn accepts
    port = sock.getsockname()[1]
    allowed = LOOPBACK if host in LOOPBACK else None
    app = create_app(store, token=token, rate=rate, max_body=max_body, allowed_hosts=allowed)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/" + (
        f"?token={token}" if token else ""
    )
    print(
        f"mmalign annotate: {len(store.items)} items, overlap {store.overlap}, labels -> {store.path}",
        flush=True,
    )
    if host in ("0.0.0.0", "::"):
        print(
            "listening on all interfaces; give annotators this machine's address with the token", flush=True
        )
    print(f"open {url}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
