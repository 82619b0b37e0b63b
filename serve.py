"""A web page and a JSON API that read a formula image and return its LaTeX.

    python serve.py                                   # the shipped model on 127.0.0.1:8000
    python serve.py --model_path runs/base/best.pt --port 8080 --beam_size 3

The page (web/) takes an image (choose a file, drag and drop, or paste from the clipboard)
and shows the LaTeX with a copy button, the prediction typeset again by the project's
sandboxed renderer (so a wrong reading is visible at a glance), the confidence and the time.
It loads nothing from the network. API: POST /api/predict (the image in the multipart field
`image`, or `file` as pix2tex's API names it), GET /api/health; the schema is at /docs and
/openapi.json. Decoding goes through im2latex.Reader, the Python API inference.py uses too.

An upload endpoint is an easy way to exhaust a server, so everything is bounded: the request
body (refused while it is read, never buffered whole; files spool to the temporary directory),
the pixels (read from the header before anything is decoded), the work (one model shared by a
small thread pool off the event loop, behind a bounded queue that answers 503 when full), the
connections (deadlines for a request's head and body, caps on idle connections and on requests
in progress, overall and per client address: serve_limits.py), and TeX (the renderer's
sandbox, one formula per run, with a time limit).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import logging
import math
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from data.image import ImageError, load_image, model_readings, normalized_readings
from data.normalize import detokenize
from data.render import RenderError, RenderOptions, render_formulas
from data.spelling import OUTPUT_HELP, OUTPUT_SPELLINGS
from data.vocab import Vocab, VocabError
from im2latex.api import Reader, TorchBackend
from im2latex.confidence import MEANING, Calibration
from im2latex.decoding import MAX_LEN
from im2latex.prediction import Prediction
from model.checkpoint import DEFAULT_MODEL, CheckpointError
from model.im2latex import Im2Latex
from serve_limits import ConnectionLimits, add_limit_flags, guarded_protocol, limits_from_args

ROOT = Path(__file__).resolve().parent
WEB_DIR = ROOT / "web"
MAX_BEAM = 10
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the beam_size field
IMAGE_FIELD = "The formula image (PNG, JPEG, GIF, BMP, TIFF, WebP); give this or `file`"
FILE_FIELD = "The same as `image`, under the name pix2tex's API uses; give one of the two"
NOT_AN_IMAGE = "not a readable image: upload a PNG, JPEG, GIF, BMP, TIFF or WebP file"
# The page loads its own script, style and images only: nothing from the network.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data: blob:; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
# One formula per TeX run with short limits: a request never waits long on a bad formula.
# No downsampling: the page shows the 200 dpi render, sharper than the model's input.
RENDER_OPTIONS = RenderOptions(downsample=1, workers=1, batch_size=1, timeout_s=15.0,
                               formula_timeout_s=3.0, memory_mb=1024)

log = logging.getLogger("im2latex.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Defaults and limits of one server; the command-line flags map onto these."""

    beam_size: int = 5
    max_len: int = MAX_LEN
    max_upload_mb: float = 10.0
    max_megapixels: float = 16.0
    queue: int = 16  # jobs waiting beyond those running
    threads: int = 1  # jobs running at once
    device: str = "cpu"
    model_name: str = "model"
    spelling: str | None = None  # font switches: as read, or im2latex.Reader's other spellings
    render: RenderOptions = field(default=RENDER_OPTIONS)
    limits: ConnectionLimits = field(default=ConnectionLimits())  # applied by `main`'s server

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)


# ------------------------------------------------------------------------------ API models


class PredictResponse(BaseModel):
    latex: str = Field(description="The predicted formula as compilable LaTeX, without $ signs")
    tokens: str = Field(description="The model's output: normalized LaTeX tokens separated by "
                                    "single spaces, as inference.py prints them")
    score: float = Field(description="Mean token log-probability of the prediction (<= 0), "
                                     "higher is surer; a ranking, not a probability: see "
                                     "`confidence`")
    confidence: float | None = Field(None, description=MEANING.capitalize() + " (0 to 1, "
                                     "from `score` through the curve measured for this "
                                     "model); null when the model has no calibration")
    render_png: str | None = Field(description="The prediction typeset by the sandboxed renderer "
                                               "(base64 PNG, 200 dpi), to compare with the "
                                               "upload; null when it does not compile in time")
    ms: float = Field(description="Server time for this request in milliseconds: waiting in "
                                  "the queue, decoding the image, beam search and rendering")


class ModelInfo(BaseModel):
    name: str = Field(description="Checkpoint file name")
    parameters: int = Field(description="Number of weights")
    vocab_size: int = Field(description="Tokens the model can write")
    device: str = Field(description="Where inference runs (cpu, cuda)")
    calibrated: bool = Field(description="Whether predictions carry a `confidence`: a "
                                         "calibration measured for these weights was found")


class HealthResponse(BaseModel):
    status: Literal["ok"] = Field(description="Always ok when the server answers")
    model: ModelInfo
    beam_size: int = Field(description="Beam size used when a request does not give one")
    max_beam_size: int = Field(description="Largest beam size accepted")
    max_upload_mb: float = Field(description="Largest accepted upload, in MiB")
    max_megapixels: float = Field(description="Largest accepted image, in millions of pixels")
    capacity: int = Field(description="Requests decoded or waiting at once before 503")
    busy: int = Field(description="Requests being decoded or waiting now")


class ErrorResponse(BaseModel):
    detail: Any = Field(description="Why the request was refused: a message, or a list of "
                                    "field errors for 422 validation failures")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in [
        (413, "Upload larger than the size limit"),
        (415, "Not an image, or an image format that cannot be read"),
        (422, "Invalid beam_size, no image (or both image and file), blank image or too "
              "many pixels"),
        (503, "Too many requests queued: retry later (see Retry-After)"),
    ]}


# ------------------------------------------------------------------------------ the work


class UploadError(Exception):
    """A refused upload, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class JobPool:
    """Worker threads with admission control instead of an unbounded queue.

    ThreadPoolExecutor's own queue has no bound, so a burst of uploads would all wait in
    memory; here a job is admitted only while fewer than threads + queue are running or
    waiting, and the caller answers 503 otherwise."""

    def __init__(self, threads: int, queue: int) -> None:
        self.capacity = threads + queue
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="im2latex-decode")
        self._lock = threading.Lock()
        self._busy = 0

    @property
    def busy(self) -> int:
        return self._busy

    def reserve(self) -> bool:
        """Take a slot if one is free; the caller must `submit` or `release` it."""
        with self._lock:
            if self._busy >= self.capacity:
                return False
            self._busy += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._busy -= 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run a reserved job; its slot frees itself when the job ends or is cancelled."""
        future = self._executor.submit(fn, *args)
        future.add_done_callback(lambda _: self.release())
        return future

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class BodyTooLarge(HTTPException):
    """Raised while a body is read past the limit; FastAPI turns it into a JSON 413."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class BodyLimit:
    """Refuses request bodies over `limit` bytes with a JSON 413, while they are read.

    A Content-Length over the limit is refused before any of the body is read; a body without
    one (chunked) is counted as it arrives and cut off at the limit, so no request makes the
    server hold or spool more than `limit` bytes."""

    def __init__(self, app: ASGIApp, limit: int, message: str) -> None:
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.message)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:  # read outside a route (FastAPI's own handler answers inside)
            if started:
                raise
            await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)


def check_pixels(data: bytes, max_pixels: int) -> None:
    """Refuse an image whose header declares too many pixels, before it is decompressed.

    A few kilobytes of PNG can declare gigapixels; only the header is read here."""
    limit = f"the limit of {max_pixels / 1e6:g} megapixels"
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError:  # PIL's own, far higher, limit
        raise UploadError(422, f"image has more pixels than {limit}") from None
    except (OSError, ValueError, SyntaxError):
        raise UploadError(415, NOT_AN_IMAGE) from None
    if width * height > max_pixels:
        raise UploadError(422, f"image is {width}x{height} pixels, more than {limit}")


def render_png(latex: str, opts: RenderOptions = RENDER_OPTIONS) -> str | None:
    """The formula typeset by the sandboxed renderer, as base64 PNG; None when it fails.

    A prediction that does not compile is still an answer (the user sees it did not render),
    so failures are logged, not raised."""
    try:
        img = render_formulas([latex], opts)[0]
    except (RenderError, OSError) as e:
        log.warning("renderer unavailable: %s", e)
        return None
    if img is None:
        return None
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class UploadReader:
    """Image bytes to a prediction and its rendering; runs in the pool's threads. Each failure
    has its HTTP status: 415 for what is not an image, 422 for an image without a formula."""

    def __init__(self, model: Im2Latex, vocab: Vocab, config: ServeConfig,
                 calibration: Calibration | None = None) -> None:
        self.reader = Reader(backend=TorchBackend(model, vocab, config.device, calibration),
                             beam_size=config.beam_size, max_len=config.max_len,
                             spelling=config.spelling)
        self.config = config

    def __call__(self, data: bytes, beam_size: int) -> tuple[Prediction, str | None]:
        check_pixels(data, self.config.max_pixels)
        try:
            img = load_image(data, name="upload")
        except ImageError:
            raise UploadError(415, NOT_AN_IMAGE) from None
        try:
            readings = model_readings(normalized_readings(img))
        except ImageError as e:  # blank page, nothing that looks like ink
            raise UploadError(422, str(e)) from None
        pred = self.reader.decode([readings], beam_size=beam_size)[0]
        return pred, render_png(detokenize(pred.latex), self.config.render)


def one_upload(image: UploadFile | None, file: UploadFile | None) -> UploadFile:
    """The upload under either field name; none or both is a 422 in FastAPI's own form."""
    if (image is None) == (file is None):
        msg = ("Field required: the image as `image` (or `file`)" if image is None else
               "give the image once, as `image` or as `file`, not both")
        raise RequestValidationError([{"type": "missing" if image is None else "value_error",
                                       "loc": ("body", "image" if image is None else "file"),
                                       "msg": msg, "input": None}])
    return image or file  # type: ignore[return-value]


def _declared_type_ok(content_type: str | None) -> bool:
    """Browsers send image/*; scripts often send octet-stream or nothing. The bytes decide."""
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind in ("", "application/octet-stream") or kind.startswith("image/")


def _too_large(config: ServeConfig) -> str:
    return f"upload larger than the limit of {config.max_upload_mb:g} MB"


async def _queue_upload(pool: JobPool, decode: UploadReader, image: UploadFile, beam_size: int,
                        config: ServeConfig) -> Future:
    """A place in the pool first (503 when full, before reading a byte), then the upload read
    within its limit (413) and its decoding queued; the place is given back if anything before
    the queueing fails, and by the pool once the job ends."""
    if not pool.reserve():
        raise HTTPException(503, f"busy: {pool.capacity} images are being read or waiting; "
                                 "try again in a moment", headers={"Retry-After": "2"})
    try:
        data = await image.read(config.max_upload_bytes + 1)  # already bounded by the body
        if len(data) > config.max_upload_bytes:
            raise HTTPException(413, _too_large(config))
        return pool.submit(decode, data, beam_size)
    except BaseException:
        pool.release()
        raise


# ------------------------------------------------------------------------------ the app


def create_app(model: Im2Latex, vocab: Vocab, config: ServeConfig = ServeConfig(),
               calibration: Calibration | None = None) -> FastAPI:
    """The page and the API around one loaded model (and the calibration made for its weights,
    if any: `confidence` is null without one); all state lives in this app."""
    pool = JobPool(config.threads, config.queue)
    decode = UploadReader(model, vocab, config, calibration)
    model_info = ModelInfo(name=config.model_name, vocab_size=len(vocab),
                           parameters=sum(p.numel() for p in model.parameters()),
                           device=str(config.device), calibrated=calibration is not None)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown()

    app = FastAPI(
        title="im2latex", version="1.0", lifespan=lifespan,
        description="Reads an image of a printed formula and returns its LaTeX.",
    )
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes + MULTIPART_OVERHEAD,
                       message=_too_large(config))

    @app.post("/api/predict", response_model=PredictResponse, responses=ERRORS,
              summary="Read the LaTeX of a formula image")
    async def predict_image(
        image: Annotated[UploadFile | None, File(description=IMAGE_FIELD)] = None,
        file: Annotated[UploadFile | None, File(description=FILE_FIELD)] = None,
        beam_size: Annotated[int, Form(ge=1, le=MAX_BEAM, description="Beam width; 1 is "
                                       "greedy decoding")] = config.beam_size,
    ) -> PredictResponse:
        start = time.perf_counter()
        image = one_upload(image, file)
        if not _declared_type_ok(image.content_type):
            raise HTTPException(415, f"expected an image, got {image.content_type}")
        future = await _queue_upload(pool, decode, image, beam_size, config)
        try:
            pred, png = await asyncio.wrap_future(future)
        except UploadError as e:
            raise HTTPException(e.status, e.message) from None
        return PredictResponse(latex=detokenize(pred.latex), tokens=pred.latex, score=pred.score,
                               confidence=pred.confidence, render_png=png,
                               ms=round((time.perf_counter() - start) * 1e3, 1))

    @app.get("/api/health", response_model=HealthResponse, summary="Model and load")
    async def health() -> HealthResponse:
        return HealthResponse(status="ok", model=model_info, beam_size=config.beam_size,
                              max_beam_size=MAX_BEAM, max_upload_mb=config.max_upload_mb,
                              max_megapixels=config.max_megapixels, capacity=pool.capacity,
                              busy=pool.busy)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


# ------------------------------------------------------------------------------ command line


def _int_in(lo: int, hi: float = math.inf) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}")
        return value
    return parse


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model_path", default=str(DEFAULT_MODEL), help="checkpoint (.pt) or run dir")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000)
    p.add_argument("--beam_size", type=_int_in(1, MAX_BEAM), default=ServeConfig.beam_size,
                   help="default beam width (a request may ask for 1..10)")
    p.add_argument("--max_len", type=_int_in(1, 1000), default=ServeConfig.max_len,
                   help="longest output, tokens")
    p.add_argument("--max_upload_mb", type=_positive, default=ServeConfig.max_upload_mb,
                   help="largest upload (MiB)")
    p.add_argument("--max_megapixels", type=_positive, default=ServeConfig.max_megapixels,
                   help="largest image")
    p.add_argument("--queue", type=_int_in(0), default=ServeConfig.queue,
                   help="requests that may wait for a thread; more get 503")
    p.add_argument("--threads", type=_int_in(1, 64), default=ServeConfig.threads,
                   help="images decoded at once")
    add_limit_flags(p, positive=_positive, count=_int_in(1))
    p.add_argument("--spelling", choices=OUTPUT_SPELLINGS, default="as_read", help=OUTPUT_HELP)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    path = Path(args.model_path)
    if not path.exists():
        print(f"error: no model at {path}: pass --model_path CHECKPOINT (a .pt file or a run "
              "folder), or train one (`make demo` writes runs/default)", file=sys.stderr)
        return 1
    try:
        backend = TorchBackend.load(path, device=args.device)
    except (CheckpointError, VocabError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if backend.calibration_note:
        print(f"note: {backend.calibration_note}", file=sys.stderr)
    config = ServeConfig(beam_size=args.beam_size, max_len=args.max_len,
                         max_upload_mb=args.max_upload_mb, max_megapixels=args.max_megapixels,
                         queue=args.queue, threads=args.threads, device=args.device,
                         model_name=path.name, limits=limits_from_args(args),
                         spelling=None if args.spelling == "as_read" else args.spelling)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    app = create_app(backend.model, backend.vocab, config, backend.calibration)
    uvicorn.run(app, host=args.host, port=args.port,
                http=guarded_protocol(config.limits), timeout_keep_alive=5,
                log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
