"""`transferlab serve`: a small HTTP API around one model (a run directory or an exported .onnx).

    POST /predict   multipart/form-data, one or more image files (any field name) → top-k JSON
    GET  /health    model, classes, limits, counters
    GET  /          an upload page: pick or drop images, see each with its predictions

Untrusted input is bounded before it costs anything: the request body is counted as it arrives (413
past ``max_upload_mb``), files per request are capped, each part must declare an ``image/*`` type
(415), pixels are checked from the header before decoding (413 for decompression bombs), and a
truncated or non-image file is a 422 naming the file. Uploads are decoded from temporary files this
server names; a client-supplied file name is only ever echoed back, never used as a path.

Inference runs on one thread, one batch at a time (models are not assumed thread-safe); images that
arrive while a batch runs are scored together in the next one, so concurrent requests batch for free.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
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
from transferlab.export.batch import label_entry
from transferlab.export.predictors import Predictor, load_predictor

__all__ = ["ServeLimits", "create_app", "is_loopback", "serve"]

log = logging.getLogger("transferlab")

DECODE_THREADS = 2
DRAIN_FACTOR = 4  # a refused body is read (and dropped) up to 4 x the upload limit, then the socket is closed


@dataclass(frozen=True)
class ServeLimits:
    """What one request may cost. Pixels: 50 MP covers every phone camera; 150 MB of RGB once decoded."""

    max_upload_mb: float = 20.0
    max_files: int = 16
    max_pixels: int = 50_000_000
    max_batch: int = 32
    top_k: int = 3
    header_timeout: float = 10.0  # seconds for a request's headers to arrive (from connect, or the last response)
    body_timeout: float = 60.0  # seconds for its body, from its headers: 20 MB at 2.8 Mbit/s

    def __post_init__(self) -> None:
        if (self.max_upload_mb <= 0 or self.max_files < 1 or self.max_pixels < 1 or self.max_batch < 1
                or self.top_k < 1 or not self.header_timeout > 0 or not self.body_timeout > 0):
            raise TransferlabError("serve limits must be positive (max upload, files, pixels, batch, top-k, timeouts).")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


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


def _header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline on request headers: a connection whose request headers are not
    complete `seconds` after it opened (or after its last response) is closed. uvicorn times out only idle
    keep-alive connections, so sockets sending half a header would hold their connections for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._header_deadline_passed)

        def _header_deadline_passed(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()  # no request's headers came in time (a new request sets a new cycle)

    return HeaderDeadlineH11


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


def _status_for(reason: str) -> int:
    return 413 if reason.startswith(PIXEL_LIMIT_REASONS) else 422


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

    async def _read_uploads(request: Request) -> list[tuple[str, bytes]]:
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
            wrong = [{"index": i, "filename": f.filename, "error": f"content type '{f.content_type}' is not image/*"}
                     for i, (_, f) in enumerate(uploads) if not (f.content_type or "").lower().startswith("image/")]
            if wrong:
                raise RequestError(415, "only images are accepted (each part needs an image/* content type)", wrong)
            return [((f.filename or f"image-{i}")[:255], await f.read()) for i, (_, f) in enumerate(uploads)]
        finally:
            await form.close()

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None) -> dict[str, Any]:
        start = time.perf_counter()
        k = limits.top_k if top_k is None else top_k
        if k < 1:
            raise RequestError(400, "top_k must be at least 1")
        k = min(k, len(predictor.classes))
        uploads = await _read_uploads(request)
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(request.app.state.decoder, _decode, data, predictor, limits.max_pixels,
                                   request.app.state.workdir) for _, data in uploads),
            return_exceptions=True)
        failed = [{"index": i, "filename": name, "error": result.reason}
                  for i, ((name, _), result) in enumerate(zip(uploads, decoded)) if isinstance(result, ImageError)]
        for result in decoded:
            if isinstance(result, BaseException) and not isinstance(result, ImageError):
                raise result
        if failed:
            status = max(_status_for(f["error"]) for f in failed)
            raise RequestError(status, "; ".join(f"{f['filename']}: {f['error']}" for f in failed), failed)
        probs = await request.app.state.batcher.score(list(decoded))
        state["requests"] += 1
        return {"model": Path(predictor.name).name, "runtime": predictor.runtime,
                "predictions": [{"filename": name, **label_entry(predictor, row, k)}
                                for (name, _), row in zip(uploads, probs)],
                "seconds": round(time.perf_counter() - start, 4)}

    return app


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None,
          limit_concurrency: int = 256) -> None:
    """Run the server until interrupted. Binds to loopback unless told otherwise."""
    import uvicorn

    app = create_app(model, limits)
    if not is_loopback(host):
        log.warning("serving on %s: anyone who can reach this machine on port %d can use the model "
                    "(no authentication); bind to 127.0.0.1 unless that is what you want", host, port)
    log.info("serving %s on http://%s:%d (upload page at /, API at POST /predict)", model, host, port)
    uvicorn.Server(server_config(app, host=host, port=port, limit_concurrency=limit_concurrency)).run()


def server_config(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, limit_concurrency: int = 256) -> Any:
    """uvicorn's configuration for `app` (from :func:`create_app`): one worker, the header deadline of
    its limits on every connection, idle keep-alive connections closed after 5 s."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, workers=1, log_level="warning",
                          limit_concurrency=limit_concurrency, timeout_graceful_shutdown=5, timeout_keep_alive=5,
                          http=_header_deadline_protocol(app.state.limits.header_timeout))
