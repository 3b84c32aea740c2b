"""The webhook endpoint (FastAPI): `POST /webhook` takes Hub webhook deliveries, `GET /health` says it is up.

A delivery is answered as soon as it is checked and recorded: 401 for a missing or wrong secret, 400 for a body hubc
cannot read (over 1 MB, malformed JSON, payload version other than 3), 200 with the reason for one that asks for
nothing, 202 when it is recorded for the dispatcher. Nothing slow happens here: no Hub call, no job.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from hubplugin.watch.config import WatchConfig
from hubplugin.watch.errors import PayloadError
from hubplugin.watch.events import Ignored, classify
from hubplugin.watch.queue import JobQueue

__all__ = ["MAX_BODY", "create_app"]

MAX_BODY = 1 << 20
"""Largest delivery read (1 MB); Hub payloads are a few kB."""
DRAIN_LIMIT = 4 * MAX_BODY
"""Largest refused body still read to its end (and discarded) before the answer."""


async def _read_body(request: Request) -> bytes | None:
    """The body, or None when it is over MAX_BODY (kept no further than that). A body up to DRAIN_LIMIT is read to
    its end and discarded: a sender that writes its whole request before reading the answer (most HTTP clients) then
    gets the 400 and its reason instead of a connection reset; a larger one is answered at once."""
    length = request.headers.get("content-length")
    declared = int(length) if length is not None and length.isdigit() else None
    if declared is not None and declared > DRAIN_LIMIT:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_LIMIT:
            return None
        if size <= MAX_BODY:
            chunks.append(chunk)
    return b"".join(chunks) if size <= MAX_BODY else None


def create_app(config: WatchConfig, queue: JobQueue, secret: str, log: logging.Logger) -> FastAPI:
    """The endpoint for `config`, recording deliveries in `queue`; `secret` is the webhook's secret."""
    app = FastAPI(title="hubc watch", docs_url=None, redoc_url=None, openapi_url=None)
    expected = secret.encode()

    def answer(status: int, body: dict, message: str) -> JSONResponse:
        log.info("%d %s", status, message)
        return JSONResponse(body, status_code=status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        given = request.headers.get("x-webhook-secret")
        if given is None:
            given = request.query_params.get("secret")
        if given is None or not hmac.compare_digest(given.encode(), expected):
            reason = "missing" if given is None else "wrong"
            return answer(401, {"error": f"{reason} webhook secret"},
                          f"refused: {reason} secret (X-Webhook-Secret or ?secret=)")
        body = await _read_body(request)
        if body is None:
            return answer(400, {"error": f"body over {MAX_BODY} bytes"}, f"refused: body over {MAX_BODY} bytes")
        try:
            decision = classify(body, config.watches)
        except PayloadError as exc:
            return answer(400, {"error": str(exc)}, f"refused: {exc}")
        if isinstance(decision, Ignored):
            return answer(200, {"status": "ignored", "reason": decision.reason},
                          f"ignored: {decision.reason}")
        own = await run_in_threadpool(queue.own_push, decision.repo, decision.sha)
        if own is not None:
            return answer(200, {"status": "ignored", "reason": own}, f"ignored: {own}")
        new = await run_in_threadpool(queue.add_delivery, decision.repo, decision.sha)
        ref = f"{decision.repo}@{decision.sha}"
        return answer(202, {"status": "queued" if new else "duplicate", "repo": decision.repo, "sha": decision.sha},
                      f"{'recorded' if new else 'duplicate of a recorded delivery'}: {ref}")

    return app
