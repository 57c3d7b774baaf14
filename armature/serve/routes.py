"""The HTTP API: request schema with the configured limits, auth, errors. No Ray here.

``create_api`` builds the FastAPI app around a *service* (the ingress deployment) that has the
coroutines ``generate(request) -> dict`` (an ``ImagesResponse``), ``edit(request) -> dict`` (an
``EditResponse``), ``adapters() -> list[dict]`` and ``ready() -> bool``. Every limit is part of the request schema, so a request beyond one is
answered 400 before the service sees it, and the OpenAPI document states the limits.

Every error answer has the OpenAI API's shape, ``{"error": {"message", "type", "param", "code"}}``,
and its status codes (an invalid request: 400), plus ``field`` (the same as ``param``).
The OpenAI Images API's own fields and routes are in ``openai_api.py``.
"""

# No ``from __future__ import annotations``: FastAPI reads the annotations of routes defined in
# a function, and the request model is a local class.

import asyncio
import hashlib
import hmac
from typing import Any, Literal, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from armature.serve.api_common import ADAPTER_PATTERN, CODES, MAX_SEED, ApiError, error_response
from armature.serve.openai_api import OPENAI_SIZES, OpenAIImageFields, add_openai_routes

__all__ = ["ApiError", "create_api", "request_model", "edit_request_model", "hash_key", "ADAPTER_PATTERN", "MAX_SEED"]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --------------------------------------------------------------------------- schema
class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str = Field(description="the request field at fault, or what else failed (body, authorization, ...)")
    code: str
    field: str = Field(description="the same as `param`")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImageData(BaseModel):
    b64_json: str = Field(description="a PNG image, base64")
    seed: int = Field(description="this image's seed: the same request with n=1 and this seed gives it again")
    score: Optional[float] = Field(None, description="the reward's score, when a reward was named")


class ImagesResponse(BaseModel):
    created: int
    model: Optional[str] = Field(None, description="the model as requested (an adapter, or the base model's id)")
    size: Optional[str] = Field(None, description="WIDTHxHEIGHT of the images")
    output_format: Literal["png"] = "png"
    adapter: Optional[str] = Field(None, description="the adapter as requested")
    adapter_version: Optional[str] = Field(None, description="what it resolved to, e.g. name/3")
    reward: Optional[str] = None
    data: list[ImageData]


class EditResponse(BaseModel):
    created: int
    data: list[ImageData] = Field(description="the edited image (one)")
    pose: dict[str, Any] = Field(
        description="the pose the person was rendered from (keypoint JSON): the one "
        "sent, or the one the model planned; edit it and send it back as `pose`"
    )
    layout_b64_json: Optional[str] = Field(None, description="the layout the image was rendered from, a PNG, base64")


class AdapterInfo(BaseModel):
    id: str = Field(description="what to pass as `adapter`")
    name: str
    version: Optional[int] = None
    aliases: list[str] = []
    source: Literal["registry", "local"]
    run_id: Optional[str] = None


class AdaptersResponse(BaseModel):
    data: list[AdapterInfo]


class Status(BaseModel):
    status: str


def request_model(limits: dict, rewards: list[str]) -> type[BaseModel]:
    """The request schema of ``POST /v1/images/generations`` under ``limits``."""
    lim = dict(limits)
    side = f"each side in [{lim['min_size']}, {lim['max_size']}], a multiple of {lim['size_multiple']}"
    Reward = Literal[tuple(rewards)] if rewards else None  # noqa: N806

    class ImageRequest(OpenAIImageFields):  # the OpenAI Images API's fields, and Armature's own
        prompt: str = Field(min_length=1, max_length=lim["max_prompt_chars"])
        negative_prompt: Optional[str] = Field(None, max_length=lim["max_prompt_chars"])
        n: int = Field(1, ge=1, le=lim["max_images"], description="images to return")
        size: Optional[str] = Field(
            None,
            pattern=r"^([0-9]{1,5}x[0-9]{1,5}|auto)$",
            description=f"WIDTHxHEIGHT in pixels, {side}; or one of the OpenAI API's "
            f"sizes ({', '.join(OPENAI_SIZES)}), drawn at the model's scale "
            "when beyond those limits; default (auto): the model's",
        )
        steps: Optional[int] = Field(None, ge=1, le=lim["max_steps"], description="denoising steps")
        guidance_scale: Optional[float] = Field(None, ge=0.0, le=lim["max_guidance_scale"], allow_inf_nan=False)
        seed: Optional[int] = Field(
            None, ge=0, le=MAX_SEED, description="image i (or candidate i) uses seed + i; default: random"
        )
        adapter: Optional[str] = Field(
            None,
            pattern=ADAPTER_PATTERN,
            description="a registered adapter: name, name/version or name@alias",
            examples=["armature-adapter", "armature-adapter/1", "armature-adapter@prod"],
        )
        reward: Optional[Reward] = Field(None, description="score the images with this reward")
        best_of: Optional[int] = Field(
            None, ge=1, le=lim["max_best_of"], description="make this many candidates, return the n best by `reward`"
        )

        @field_validator("size")
        @classmethod
        def _size(cls, value):
            if value in (None, "auto") or value in OPENAI_SIZES:  # the ingress maps these to the model
                return value
            width, height = (int(v) for v in value.split("x"))
            for v in (width, height):
                if not lim["min_size"] <= v <= lim["max_size"] or v % lim["size_multiple"]:
                    raise ValueError(
                        f"size={value}: use auto (the model's own size), WIDTHxHEIGHT with {side}, or "
                        f"one of {', '.join(OPENAI_SIZES)} (drawn at the model's scale)"
                    )
            return value

        @field_validator("best_of")
        @classmethod
        def _best_of(cls, value, info: ValidationInfo):
            if value is None:
                return value
            n = info.data.get("n", 1)
            if value < n:
                raise ValueError(f"best_of={value} must be >= n={n}")
            if info.data.get("reward") is None:
                raise ValueError('best_of needs a reward to rank the candidates, e.g. "reward": "compressibility"')
            return value

    return ImageRequest


def edit_request_model(limits: dict, max_body_bytes: int) -> type[BaseModel]:
    """The request schema of ``POST /v1/images/edits`` under ``limits``; images are decoded and
    the pose parsed after it (``armature.serve.edits.check_edit``)."""
    lim = dict(limits)
    side = f"each side in [{lim['min_size']}, {lim['max_size']}], a multiple of {lim['size_multiple']}"

    class EditRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        image: str = Field(min_length=1, max_length=max_body_bytes, description=f"the scene, a PNG, base64; {side}")
        prompt: str = Field(min_length=1, max_length=lim["max_prompt_chars"], description="who to put in the scene")
        box: Optional[list[int]] = Field(
            None,
            min_length=4,
            max_length=4,
            description="the person region [x0, y0, x1, y1] in pixels (x1, y1 excluded)",
        )
        mask: Optional[str] = Field(
            None,
            min_length=1,
            max_length=max_body_bytes,
            description="the person region as a PNG of the image's size (nonzero: person), base64; instead of `box`",
        )
        pose: Optional[dict[str, Any]] = Field(
            None,
            description='the pose to render (keypoint JSON: {"format": "coco17", "width": W, "height": H, '
            '"people": [{"keypoints": {"nose": [x, y, v], ...}}]}); default: the model plans one',
        )
        seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="default: random")
        steps: Optional[int] = Field(None, ge=1, le=lim["max_steps"], description="denoising steps of each stage")

        @field_validator("mask")
        @classmethod
        def _one_region(cls, value, info: ValidationInfo):
            if value is not None and info.data.get("box") is not None:
                raise ValueError("give the person region as `box` or as `mask`, not both")
            return value

    return EditRequest


# --------------------------------------------------------------------------- guard
class RequestGuard:
    """ASGI middleware that runs before anything reads a request's body.

    On ``/v1`` routes it checks the API key from the headers (401 without reading the body) and
    caps the requests in flight per client address (429). Every body is then read here, whatever
    its framing (``Content-Length`` or chunked), within ``body_timeout_s`` (else 408) and up to
    its route's byte limit (else 413), and handed to the routes whole: a client that stalls its
    body holds a slot of this replica for ``body_timeout_s`` at most, and ``/healthz`` and
    ``/readyz``, which read no body, are answered meanwhile. ``None`` turns a limit off.
    """

    def __init__(
        self,
        app,
        api_key_sha256: Optional[str],
        body_limit: int,
        route_body_limits: dict,
        body_timeout_s: Optional[float],
        max_per_client: Optional[int],
    ):
        self.app, self.api_key_sha256 = app, api_key_sha256
        self.body_limit, self.route_body_limits = body_limit, route_body_limits  # {path suffix: bytes}
        self.body_timeout_s, self.max_per_client = body_timeout_s, max_per_client
        self.in_flight: dict[str, int] = {}  # client address -> its /v1 requests in this replica

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"].removeprefix(scope.get("root_path", "")), Headers(scope=scope)
        api = path.startswith("/v1/")
        if api and self.api_key_sha256 is not None and not self._authorized(headers):
            refusal = ApiError(
                401,
                "authorization",
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await self._refuse(refusal, headers, scope, receive, send)
        client = scope["client"][0] if scope.get("client") else "unknown"
        if api and self.max_per_client is not None and self.in_flight.get(client, 0) >= self.max_per_client:
            refusal = ApiError(
                429,
                "client",
                f"over limits.max_requests_per_client={self.max_per_client} requests "
                "of this client in flight: wait for an answer first",
                headers={"Retry-After": "1"},
            )
            return await self._refuse(refusal, headers, scope, receive, send)
        if api:
            self.in_flight[client] = self.in_flight.get(client, 0) + 1
        try:
            await self._read_then_call(path, headers, scope, receive, send)
        finally:
            if api:
                self.in_flight[client] -= 1
                if not self.in_flight[client]:
                    del self.in_flight[client]

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(hash_key(key.strip()), self.api_key_sha256)

    async def _read_then_call(self, path: str, headers: Headers, scope, receive, send) -> None:
        try:
            body = await self._read_body(path, headers, receive)
        except ApiError as err:
            return await self._refuse(err, headers, scope, receive, send)
        await self.app(scope, receive if body is None else _replay(body, receive), send)

    async def _read_body(self, path: str, headers: Headers, receive) -> Optional[bytes]:
        """The whole body (None for a request without one), within the time and size limits."""
        limit = next((n for suffix, n in self.route_body_limits.items() if path.endswith(suffix)), self.body_limit)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ApiError(413, "body", f"request bodies are limited to {limit} bytes")
        if length in (None, "0") and "transfer-encoding" not in headers:
            return None
        loop = asyncio.get_running_loop()
        deadline = None if self.body_timeout_s is None else loop.time() + self.body_timeout_s
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), None if deadline is None else deadline - loop.time())
            except asyncio.TimeoutError:
                raise ApiError(
                    408, "body", f"the body did not arrive within limits.body_timeout_s={self.body_timeout_s:g}"
                ) from None
            if message["type"] == "http.disconnect":
                raise ApiError(400, "body", "the client closed the connection before sending the body")
            size += len(message.get("body", b""))
            if size > limit:
                raise ApiError(413, "body", f"request bodies are limited to {limit} bytes")
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    async def _refuse(err: ApiError, headers: Headers, scope, receive, send) -> None:
        """Answer ``err``; with a body left unread, also close the connection (it cannot carry another request)."""
        extra = {"Connection": "close"} if "content-length" in headers or "transfer-encoding" in headers else {}
        response = error_response(err.status, err.code, err.field, err.message, {**(err.headers or {}), **extra})
        await response(scope, receive, send)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that gives ``body`` whole, then waits on the connection (for a disconnect)."""
    given = False

    async def replay():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


# --------------------------------------------------------------------------- app
def _field(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts and not parts[0].isdigit() else "body"


def create_api(
    service: Any,
    limits: dict,
    rewards: list[str],
    api_key_sha256: Optional[str] = None,
    title: str = "Armature generator",
    edits_max_body_bytes: Optional[int] = None,
) -> FastAPI:
    """The FastAPI app; ``api_key_sha256`` set: every ``/v1`` route needs ``Authorization: Bearer <key>``.
    ``edits_max_body_bytes``: the body limit of ``/v1/images/edits`` (default ``limits.max_body_bytes``);
    ``limits.body_timeout_s`` and ``limits.max_requests_per_client``: see ``RequestGuard``."""
    ImageRequest = request_model(limits, rewards)  # noqa: N806
    edits_body = int(edits_max_body_bytes or limits["max_body_bytes"])
    EditRequest = edit_request_model(limits, edits_body)  # noqa: N806
    app = FastAPI(title=title, version="1", description="Text-to-image generation with per-request adapters.")
    lim_body = int(limits["max_body_bytes"])
    statuses = (400, 401, 408, 413, 429, 503) if api_key_sha256 else (400, 408, 413, 429, 503)
    errors = {s: {"model": ErrorResponse} for s in statuses}  # documented error answers
    # The key is checked by RequestGuard, from the headers; the dependency documents it in OpenAPI.
    v1 = [Depends(HTTPBearer(auto_error=False))] if api_key_sha256 else []
    app.add_middleware(
        RequestGuard,
        api_key_sha256=api_key_sha256,
        body_limit=lim_body,
        route_body_limits={"/v1/images/edits": edits_body},
        body_timeout_s=limits.get("body_timeout_s"),
        max_per_client=limits.get("max_requests_per_client"),
    )
    # GET /v1/models, and multipart edits at /v1/images/edits: added before the JSON edit route
    add_openai_routes(app, service, v1, {**errors, 404: {"model": ErrorResponse}}, EditRequest, limits, edits_body)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(err.status, err.code, err.field, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):  # unparsable bodies, 404, 405
        field = {400: "body", 404: "path", 405: "method"}.get(err.status_code, "request")
        return error_response(
            err.status_code, CODES.get(err.status_code, "error"), field, str(err.detail), getattr(err, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        found = [
            {"field": _field(e.get("loc", ())), "message": str(e.get("msg", "")).removeprefix("Value error, ")}
            for e in err.errors()
        ]
        first = found[0] if found else {"field": "body", "message": "invalid request"}
        return error_response(
            400, "invalid_request", first["field"], f"{first['field']}: {first['message']}", errors=found
        )

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        dependencies=v1,
        responses={**errors, **{s: {"model": ErrorResponse} for s in (400, 404, 504)}},
    )
    async def generations(body: ImageRequest) -> dict:
        """Generate images; with `best_of`, the n best of that many candidates by `reward`."""
        return await service.generate(body)

    @app.post(
        "/v1/images/edits",
        response_model=EditResponse,
        dependencies=v1,
        responses={**errors, **{s: {"model": ErrorResponse} for s in (400, 404, 504)}},
    )
    async def edits(body: EditRequest) -> dict:
        """Render a person into the scene: from the `pose` given, or from one the model plans first;
        outside the person region (`box` or `mask`) the scene is kept pixel for pixel. A multipart body
        at this path is the OpenAI API's edit (`image`, optional `mask`: its transparent pixels, `prompt`)."""
        return await service.edit(body)

    @app.get("/v1/adapters", response_model=AdaptersResponse, dependencies=v1, responses=errors)
    async def adapters() -> dict:
        """Adapters this server can apply: registered in MLflow, or configured folders."""
        return {"data": await service.adapters()}

    @app.get("/healthz", response_model=Status)
    async def healthz() -> dict:
        """Liveness of the HTTP front."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Status, responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict:
        """Ready when a generator replica answers."""
        if not await service.ready():
            raise ApiError(503, "generator", "no generator replica is ready yet")
        return {"status": "ready"}

    return app
