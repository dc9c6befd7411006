"""`transferlab serve`: a small HTTP API around one model (a run directory or an exported .onnx).

    POST /predict   multipart/form-data, one or more image files (any field name) → top-k JSON;
                    ?unknown=auto|P&target_precision=0.99&sets=0.9 as `predict`'s options (abstain.py)
    GET  /health    model, classes, limits, counters
    GET  /          an upload page: pick or drop images, see each with its predictions

Untrusted input is bounded before it costs anything: the request body is counted as it arrives (413
past ``max_upload_mb``), files per request are capped, each part must declare an ``image/*`` type
(415), pixels are checked from the header before decoding (413 for decompression bombs), and a
truncated or non-image file is a 422 naming the file. A request with several files answers each file:
its labels, or its error (200 as long as one file was usable; the statuses above when none was).
Uploads are decoded from temporary files this server names; a client-supplied file name is only ever
echoed back, never used as a path. Slow or greedy clients are bounded too: request headers and bodies
have deadlines, and each client IP may hold only so many connections (429 past it).

Inference runs on one thread, one batch at a time (models are not assumed thread-safe); images that
arrive while a batch runs are scored together in the next one, so concurrent requests batch for free.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from transferlab.data.images import PIXEL_LIMIT_REASONS, ImageError, load_image
from transferlab.errors import TransferlabError
from transferlab.evaluation.abstain import DEFAULT_TARGET_PRECISION, Abstainer, AbstainOptions
from transferlab.export.batch import label_entry
from transferlab.export.limits import ServeLimits
from transferlab.export.predictors import Predictor, load_predictor

__all__ = ["ServeLimits", "create_app", "is_loopback", "serve"]

log = logging.getLogger("transferlab")

DECODE_THREADS = 2
DRAIN_FACTOR = 4  # a refused body is read (and dropped) up to 4 x the upload limit, then the socket is closed
RETRY_AFTER_S = 1  # a refused connection's slot frees as soon as another request is answered: a second, not minutes
REFUSED_LINGER_S = 2.0  # how long a connection answered 429 is read from (and dropped) before it is closed


class RequestError(Exception):
    """An HTTP error answered as ``{"error": message, "files": [...]}``."""

    def __init__(self, status: int, message: str, files: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.files = status, message, files or []


class _BodyDeadline:
    """ASGI middleware: a request's body must arrive within `seconds` of its headers, or the request is
    answered 408 (and its connection closed). A client that announces a body and never sends it would
    otherwise hold its connection — and a slot of uvicorn's concurrency limit — for ever."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = False

        async def timed_receive() -> dict:
            nonlocal body_done
            if body_done:  # after the body only a disconnect can come: waiting for it is not the client's delay
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise RequestError(408, f"request body not received within {self.seconds:g} s") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


def _refusal(status: int, message: str) -> bytes:
    """The whole HTTP answer to a connection refused as it opens (429, 503): JSON, Retry-After."""
    body = json.dumps({"error": f"{message}; retry after {RETRY_AFTER_S} s"}).encode()
    reason = {429: b"Too Many Requests", 503: b"Service Unavailable"}[status]
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nretry-after: %d\r\n"
            b"connection: close\r\nx-content-type-options: nosniff\r\n\r\n"
            % (status, reason, len(body), RETRY_AFTER_S)) + body


def _guarded_protocol(limits: ServeLimits) -> type:
    """uvicorn's h11 protocol with the guards uvicorn lacks against clients that hold connections:
    - a deadline on request headers: a connection whose request headers are not complete
      `limits.header_timeout` after it opened (or after its last response) is closed (uvicorn times out
      only idle keep-alive connections, so sockets sending half a header would be held for ever);
    - a per-client cap: a connection from an IP that already has `limits.max_client_connections` open is
      answered 429 at once, so one client cannot fill the `max_connections` that every client shares;
    - the cap in all: past `limits.max_connections` a connection is answered 503 at once (uvicorn's own
      limit holds such a connection until its headers come, then answers in plain text).
    A refused connection never enters the count. HTTP/1.1 runs one request per connection at a time, so
    the caps bound requests in flight too."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    open_per_client: Counter[str] = Counter()
    refusing: set[str] = set()  # clients being refused now: logged once per episode, not per connection
    cap = limits.max_client_connections

    class GuardedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _client_ip: str | None = None  # counted in open_per_client while connected
        _linger: asyncio.TimerHandle | None = None  # set on refused connections only

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else None  # a Unix socket has no client address
            if ip is not None and cap and open_per_client[ip] >= cap:
                if ip not in refusing:
                    refusing.add(ip)
                    log.warning("%s has %d connections open (--max-client-connections): answering its next ones "
                                "429", ip, cap)
                self._refuse(transport, _refusal(429, f"too many connections from {ip}: at most {cap} open at "
                                                      "once per client (serve --max-client-connections)"))
                return
            if len(self.connections) >= limits.max_connections:
                self._refuse(transport, _refusal(503, f"the server is at its limit of {limits.max_connections} open "
                                                      "connections (serve --max-connections)"))
                return
            if ip is not None:
                open_per_client[ip] += 1
                self._client_ip = ip
            super().connection_made(transport)
            self._arm_header_deadline()

        def _refuse(self, transport: asyncio.Transport, answer: bytes) -> None:
            self.transport = transport
            transport.write(answer)
            if transport.can_write_eof():
                transport.write_eof()
            # the client's request is read and dropped until it closes (or for a moment): closing with its
            # bytes unread would reset the connection, and the client would see a reset instead of the 429
            self._linger = self.loop.call_later(REFUSED_LINGER_S, transport.close)

        def data_received(self, data: bytes) -> None:
            if self._linger is None:
                super().data_received(data)

        def eof_received(self) -> None:
            if self._linger is None:
                super().eof_received()
            # returning None lets asyncio close the transport: a refused client has read its answer

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._linger is not None:
                self._linger.cancel()
                return
            if self._client_ip is not None:
                open_per_client[self._client_ip] -= 1
                if open_per_client[self._client_ip] < cap:
                    refusing.discard(self._client_ip)
                if open_per_client[self._client_ip] <= 0:
                    del open_per_client[self._client_ip]
                self._client_ip = None
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(limits.header_timeout, self._header_deadline_passed)

        def _header_deadline_passed(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()  # no request's headers came in time (a new request sets a new cycle)

    return GuardedH11


class _Batcher:
    """A single inference thread fed by a queue: one batch at a time, queued images batched together."""

    def __init__(self, predictor: Predictor, max_batch: int) -> None:
        self.predictor, self.max_batch = predictor, max_batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="transferlab-infer")
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future]] = asyncio.Queue()
        self.stats = {"batches": 0, "images": 0, "largest_batch": 0}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True)

    async def score(self, prepared: list[Any]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in prepared]
        for item, future in zip(prepared, futures):
            self.queue.put_nowait((item, future))
        return np.stack(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            while len(items) < self.max_batch and not self.queue.empty():
                items.append(self.queue.get_nowait())
            try:
                probs = await loop.run_in_executor(self.executor, self.predictor.probabilities, [x for x, _ in items])
            except Exception as exc:  # a model failure fails these requests, never the server
                log.exception("inference failed on a batch of %d", len(items))
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.stats["batches"] += 1
            self.stats["images"] += len(items)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
            for (_, future), row in zip(items, probs):
                if not future.done():  # the client may have gone away
                    future.set_result(row)


class _TooLarge(Exception):
    pass


async def _counted(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The request body, stopped as soon as it passes `limit` bytes (whatever Content-Length claimed)."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge
        yield chunk


async def _drain(stream: AsyncIterator[bytes], cap: int) -> None:
    """Read and drop the rest of a refused body (up to `cap` bytes) before answering: a client still
    sending when the server closes gets a reset instead of the 413 that says why (nginx's "lingering
    close" does the same)."""
    seen = 0
    with contextlib.suppress(Exception):
        async for chunk in stream:
            seen += len(chunk)
            if seen > cap:
                return


def _decode(data: bytes, predictor: Predictor, max_pixels: int, workdir: Path) -> Any:
    """Bytes → the model's input, through the same checks as training data (``data.images.load_image``)."""
    fd, name = tempfile.mkstemp(dir=workdir, suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return predictor.prepare(load_image(name, max_pixels=max_pixels))
    finally:
        os.unlink(name)


class _WrongType(ImageError):
    """A part whose declared content type is not image/*: never decoded."""

    def __init__(self, content_type: str | None) -> None:
        super().__init__(f"content type '{content_type}' is not image/* (only images are accepted)")


def _status_for(error: ImageError) -> int:
    """A request whose every file failed is answered with the highest of its files' statuses."""
    if isinstance(error, _WrongType):
        return 415
    return 413 if error.reason.startswith(PIXEL_LIMIT_REASONS) else 422


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(model: str | Path | Predictor, limits: ServeLimits | None = None) -> FastAPI:
    """The FastAPI application serving `model` (a run directory, model.safetensors, .onnx, or a Predictor)."""
    limits = limits or ServeLimits()
    predictor = model if hasattr(model, "probabilities") else load_predictor(model)
    page = resources.files("transferlab.export").joinpath("upload.html").read_text(encoding="utf-8")
    state: dict[str, Any] = {"requests": 0, "rejected": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.batcher = _Batcher(predictor, limits.max_batch)
        app.state.batcher.start()
        app.state.decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="transferlab-decode")
        with tempfile.TemporaryDirectory(prefix="transferlab-serve-") as workdir:
            app.state.workdir = Path(workdir)
            try:
                yield
            finally:
                await app.state.batcher.stop()
                app.state.decoder.shutdown(wait=True)

    app = FastAPI(title="transferlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    app.state.limits = limits
    app.add_middleware(_BodyDeadline, seconds=limits.body_timeout)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        state["rejected"] += 1
        body: dict[str, Any] = {"error": exc.message}
        if exc.files:
            body["files"] = exc.files
        # a body not (fully) read leaves the connection unusable: closed after the answer
        headers = {"Connection": "close"} if exc.status == 408 else None
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # anything else (a model failure, MemoryError, a bug) is a JSON 500 like every other error; the
        # traceback goes to the server's log (Starlette logs it after this answer), never to the client
        state["rejected"] += 1
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the details"},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
        state["rejected"] += 1
        problems = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request parameters: {problems}"}, status_code=422)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        return {"status": "ok", "model": Path(predictor.name).name, "runtime": predictor.runtime,
                "classes": predictor.classes, "input_size": predictor.input_size,
                "limits": asdict(limits), "requests": state["requests"], "rejected": state["rejected"],
                **request.app.state.batcher.stats}

    async def _read_uploads(request: Request) -> list[tuple[str, bytes | _WrongType]]:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise RequestError(415, "send the images as multipart/form-data (e.g. curl -F file=@photo.jpg); "
                                    f"got Content-Type '{content_type or 'none'}'")
        limit = limits.max_upload_bytes
        stream = request.stream()
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _drain(stream, DRAIN_FACTOR * limit)
            raise RequestError(413, f"request of {int(declared)} bytes is over the {limits.max_upload_mb:g} MB limit")
        parser = MultiPartParser(request.headers, _counted(stream, limit), max_files=limits.max_files,
                                 max_fields=limits.max_files)
        try:
            form = await parser.parse()
        except _TooLarge:
            await _drain(stream, DRAIN_FACTOR * limit)
            raise RequestError(413, f"request is over the {limits.max_upload_mb:g} MB limit") from None
        except MultiPartException as exc:
            raise RequestError(400, f"malformed upload: {exc.message}") from None
        try:
            uploads = [(name, value) for name, value in form.multi_items() if isinstance(value, UploadFile)]
            if not uploads:
                raise RequestError(400, "no image in the request: send one or more files as multipart/form-data")
            files: list[tuple[str, bytes | _WrongType]] = []
            for i, (_, f) in enumerate(uploads):
                # a part that is not an image is that file's error (415 for the request only if no part is one)
                name = (f.filename or f"image-{i}")[:255]
                is_image = (f.content_type or "").lower().startswith("image/")
                files.append((name, await f.read() if is_image else _WrongType(f.content_type)))
            return files
        finally:
            await form.close()

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None, unknown: str | None = None,
                      target_precision: float = DEFAULT_TARGET_PRECISION, sets: float | None = None) -> dict[str, Any]:
        start = time.perf_counter()
        k = limits.top_k if top_k is None else top_k
        if k < 1:
            raise RequestError(400, "top_k must be at least 1")
        k = min(k, len(predictor.classes))
        try:
            abstainer = Abstainer.build(AbstainOptions(unknown, target_precision, sets),
                                        getattr(predictor, "calibration", None), Path(predictor.name).name)
        except TransferlabError as exc:
            raise RequestError(400, str(exc)) from None
        uploads = await _read_uploads(request)
        loop = asyncio.get_running_loop()

        async def decoded(data: bytes | _WrongType) -> Any:
            if isinstance(data, _WrongType):
                return data
            return await loop.run_in_executor(request.app.state.decoder, _decode, data, predictor,
                                              limits.max_pixels, request.app.state.workdir)

        inputs = await asyncio.gather(*(decoded(data) for _, data in uploads), return_exceptions=True)
        for result in inputs:
            if isinstance(result, BaseException) and not isinstance(result, ImageError):
                raise result
        failed = {i: result for i, result in enumerate(inputs) if isinstance(result, ImageError)}
        if len(failed) == len(uploads):  # nothing to predict: the request itself is refused
            files = [{"index": i, "filename": uploads[i][0], "error": e.reason} for i, e in failed.items()]
            raise RequestError(max(_status_for(e) for e in failed.values()),
                               "; ".join(f"{f['filename']}: {f['error']}" for f in files), files)
        usable = [i for i in range(len(uploads)) if i not in failed]
        probs = dict(zip(usable, await request.app.state.batcher.score([inputs[i] for i in usable])))
        state["requests"] += 1
        # one entry per file, in order: its labels, or its error as `predict --json` gives it (200 as long as
        # one file was usable, so a batch is never lost to one bad file)
        entries = []
        for i, (name, _) in enumerate(uploads):
            if i in failed:
                entries.append({"filename": name, "error": failed[i].reason})
                continue
            entry = {"filename": name, **label_entry(predictor, probs[i], k)}
            if abstainer is not None:
                abstainer.annotate(entry, probs[i], predictor.classes)
            entries.append(entry)
        return {"model": Path(predictor.name).name, "runtime": predictor.runtime, "predictions": entries,
                **({"abstain": abstainer.to_dict()} if abstainer is not None else {}),
                "seconds": round(time.perf_counter() - start, 4)}

    return app


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None) -> None:
    """Run the server until interrupted. Binds to loopback unless told otherwise."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise TransferlabError(f"serve --port must be between 0 and 65535; got {port}.")
    app = create_app(model, limits)
    if not is_loopback(host):
        log.warning("serving on %s: anyone who can reach this machine on port %d can use the model "
                    "(no authentication); bind to 127.0.0.1 unless that is what you want", host, port)
    log.info("serving %s on http://%s:%d (upload page at /, API at POST /predict)", model, host, port)
    uvicorn.Server(server_config(app, host=host, port=port)).run()


def server_config(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000) -> Any:
    """uvicorn's configuration for `app` (from :func:`create_app`): one worker, its limits' connection caps
    (in all and per client) and header deadline on every connection, idle keep-alive connections closed
    after 5 s."""
    import uvicorn

    # no limit_concurrency: the protocol counts connections itself, answering in JSON as they open
    return uvicorn.Config(app, host=host, port=port, workers=1, log_level="warning", timeout_graceful_shutdown=5,
                          timeout_keep_alive=5, http=_guarded_protocol(app.state.limits))
