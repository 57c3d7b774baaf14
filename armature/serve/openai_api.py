"""The OpenAI Images API on the generator's HTTP front, for what maps onto a diffusion generator.

An app written against the OpenAI SDKs calls this server unchanged, with ``base_url=<server>/v1``:

* ``POST /v1/images/generations`` (``images.generate``) takes the API's fields beside Armature's own
  (``OpenAIImageFields``). ``model`` names an adapter (``name``, ``name/3``, ``name@alias``, as
  ``adapter``) or the base model (absent, or its id in ``GET /v1/models``); ``size`` is ``auto``,
  WIDTHxHEIGHT within the limits, or one of the API's documented sizes, drawn at the model's own
  scale when it is beyond the limits (``resolve_size``); ``response_format`` is ``b64_json``
  (``url`` is refused: images come inline). ``user``, ``safety_identifier``, ``quality``, ``style``,
  ``moderation`` and ``output_compression`` are accepted and ignored; output options the server
  cannot honour (another ``output_format``, a transparent ``background``, ``stream``,
  ``partial_images``) are refused naming the field.
* ``GET /v1/models`` (``models.list``) and ``GET /v1/models/{id}``: the base model and every adapter.
* ``POST /v1/images/edits`` as multipart (``images.edit``: ``image``, optional ``mask``, ``prompt``),
  on a server with an edit pipeline (``edits.pipeline``: SkeleGuide, which renders a person into
  the scene): as in the API, the mask's fully transparent pixels (without a mask, the image's)
  are the region to repaint. JSON bodies at the same path are Armature's pose edits (``edits.py``).

Errors have the API's shape and statuses (``api_common.error_response``), so the SDK raises its own
exceptions: 400 ``BadRequestError``, 401 ``AuthenticationError``, 404 ``NotFoundError``, ...
No Ray here.
"""

# No ``from __future__ import annotations``: FastAPI reads the annotations of the routes below.

import base64
import re
from typing import Any, Optional

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.routing import Match

from armature.serve.api_common import ADAPTER_PATTERN, ApiError

__all__ = [
    "OPENAI_SIZES",
    "OpenAIImageFields",
    "add_openai_routes",
    "edit_from_form",
    "model_objects",
    "resolve_size",
    "unknown_model",
]

# The sizes the OpenAI Images API documents (``auto`` aside).
OPENAI_SIZES = ("256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792")

# field: (the values this server honours, what to send instead)
HONOURED = {
    "response_format": ((None, "b64_json"), "this server returns images inline: use response_format=b64_json"),
    "output_format": ((None, "png"), "images are PNG: use output_format=png (or leave it out)"),
    "background": ((None, "auto", "opaque"), "images are opaque: use background=auto or opaque"),
    "stream": ((None, False), "this server does not stream: leave stream out or false"),
    "partial_images": ((None, 0), "no partial images without streaming: leave partial_images out or 0"),
}


class OpenAIImageFields(BaseModel):
    """The OpenAI Images API's request fields that Armature's generation and edit requests take."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(
        None,
        max_length=200,
        description="an adapter (as `adapter`), or the base model: absent or its id in GET /v1/models",
        examples=["armature-adapter@production"],
    )
    response_format: Optional[str] = Field(None, max_length=20, description="b64_json (the default); url is refused")
    output_format: Optional[str] = Field(None, max_length=20, description="png")
    background: Optional[str] = Field(None, max_length=20, description="auto or opaque")
    stream: Optional[bool] = Field(None, description="false")
    partial_images: Optional[int] = Field(None, description="0")
    user: Optional[str] = Field(None, max_length=256, description="accepted, ignored")
    safety_identifier: Optional[str] = Field(None, max_length=256, description="accepted, ignored")
    quality: Optional[str] = Field(None, max_length=20, description="accepted, ignored: `steps` sets the work")
    style: Optional[str] = Field(None, max_length=20, description="accepted, ignored: say the style in the prompt")
    moderation: Optional[str] = Field(None, max_length=20, description="accepted, ignored")
    output_compression: Optional[int] = Field(None, ge=0, le=100, description="accepted, ignored (PNG)")

    @field_validator(*HONOURED)
    @classmethod
    def _honoured(cls, value, info: ValidationInfo):
        allowed, instead = HONOURED[info.field_name]
        if value is not None and (type(value), value) not in {(type(a), a) for a in allowed}:
            raise ValueError(f"{info.field_name}={value!r}: {instead}")
        return value


def resolve_size(size: Optional[str], native: tuple[int, int], lim: dict) -> tuple[Optional[int], Optional[int]]:
    """``(width, height)`` to draw for a request's ``size`` (``(None, None)``: the model's own).

    WIDTHxHEIGHT within the limits is drawn as asked; one of the API's documented sizes beyond them
    keeps its aspect ratio with its short side at the model's (``native``, ``(height, width)``),
    rounded to ``size_multiple``. Anything else: 400 naming ``size`` and what it may be."""
    if size is None or size == "auto":
        return None, None
    m = lim["size_multiple"]

    def fits(sides) -> bool:
        return all(lim["min_size"] <= v <= lim["max_size"] and v % m == 0 for v in sides)

    width, height = (int(v) for v in size.split("x"))
    if fits((width, height)):
        return width, height
    if size in OPENAI_SIZES:
        scale = min(native) / min(width, height)
        scaled = tuple(max(m, int(round(v * scale / m)) * m) for v in (width, height))
        if fits(scaled):
            return scaled
    raise ApiError(
        400,
        "size",
        f"size={size}: use auto (the model's {native[1]}x{native[0]}), WIDTHxHEIGHT with "
        f"each side in [{lim['min_size']}, {lim['max_size']}] and a multiple of {m}, or "
        f"one of {', '.join(OPENAI_SIZES)} (drawn at the model's scale)",
    )


def unknown_model(name: str, reason: str = "") -> ApiError:
    return ApiError(
        404,
        "model",
        f"model {name!r} does not exist{': ' + reason if reason else ''}; "
        "GET /v1/models lists the base model and the adapters",
        code="model_not_found",
    )


def is_adapter_name(name: str) -> bool:
    return re.fullmatch(ADAPTER_PATTERN, name) is not None


def model_objects(base: str, adapters: list[dict]) -> list[dict]:
    """``GET /v1/models``'s entries: the base model, then each adapter id once (``created`` 0: not recorded)."""
    out = [{"id": base, "object": "model", "created": 0, "owned_by": "armature", "source": "base"}]
    seen = {base}
    for a in adapters:
        if a["id"] not in seen:
            seen.add(a["id"])
            out.append({"id": a["id"], "object": "model", "created": 0, "owned_by": "armature", "source": a["source"]})
    return out


# --------------------------------------------------------------------------- multipart edits
class OpenAIEditForm(OpenAIImageFields):
    """The text fields of a multipart edit (``image`` and ``mask`` are files)."""

    prompt: str
    n: int = Field(1, ge=1, le=1, description="the edit pipeline makes one image a request")
    size: Optional[str] = Field(None, max_length=20, description="auto or the image's WIDTHxHEIGHT")
    seed: Optional[int] = None
    steps: Optional[int] = None
    input_fidelity: Optional[str] = Field(None, max_length=20, description="accepted, ignored")


def _rgba(data: bytes, field: str, lim: dict) -> np.ndarray:
    from armature.serve.edits import decode_png

    return decode_png(base64.b64encode(data).decode(), field, lim, mode="RGBA")


def edit_from_form(
    files: dict[str, list[bytes]], fields: dict[str, str], edit_model: type[BaseModel], lim: dict
) -> tuple[BaseModel, Optional[str]]:
    """A multipart edit as Armature's ``EditRequest`` (the repaint region as its ``mask``) and the
    ``model`` asked for. Raises ``RequestValidationError`` / ``ApiError`` (400) naming the field."""
    from armature.serve.edits import encode_png

    images = files.get("image", []) + files.get("image[]", [])
    if len(images) != 1:
        raise ApiError(400, "image", f"image: send one PNG file (got {len(images)}); the pipeline edits one scene")
    if set(files) - {"image", "image[]", "mask"} or len(files.get("mask", [])) > 1:
        raise ApiError(400, "body", "files: `image` and at most one `mask`")
    try:
        form = OpenAIEditForm.model_validate(fields)
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None
    scene = _rgba(images[0], "image", lim)
    height, width = scene.shape[:2]
    if form.size not in (None, "auto", f"{width}x{height}"):
        raise ApiError(400, "size", f"size={form.size}: an edit keeps the image's size, {width}x{height} (or auto)")
    region = None
    if files.get("mask"):
        alpha = _rgba(files["mask"][0], "mask", lim)[..., 3]
        if alpha.shape != (height, width):
            raise ApiError(
                400,
                "mask",
                f"mask: {alpha.shape[1]}x{alpha.shape[0]} pixels, the image is "
                f"{width}x{height}: send a mask of the image's size",
            )
        region = alpha == 0
        if not region.any():
            raise ApiError(
                400, "mask", "mask: no fully transparent pixel; transparent pixels (alpha 0) mark where to edit"
            )
    elif (scene[..., 3] == 0).any():  # no mask: the image's own transparent pixels
        region = scene[..., 3] == 0
    body = {
        "image": base64.b64encode(images[0]).decode(),
        "prompt": form.prompt,
        "seed": form.seed,
        "steps": form.steps,
        "mask": None if region is None else encode_png(region.astype(np.uint8) * 255),
    }
    try:
        return edit_model.model_validate(body), form.model
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None


class MultipartRoute(APIRoute):
    """A route that matches only multipart bodies, so that JSON bodies reach the next route."""

    def matches(self, scope) -> tuple[Match, dict]:
        match, child = super().matches(scope)
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
        if match is not Match.NONE and not content_type.startswith(b"multipart/form-data"):
            return Match.NONE, {}
        return match, child


class ModelObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelObject]


def add_openai_routes(
    app: FastAPI,
    service: Any,
    dependencies: list,
    responses: dict,
    edit_model: type[BaseModel],
    lim: dict,
    max_body_bytes: int,
) -> None:
    """``GET /v1/models``, ``GET /v1/models/{id}`` and the multipart ``POST /v1/images/edits``; add them
    before the JSON edit route. ``service`` has ``models() -> list[dict]`` and ``edit(body, model)``."""
    router = APIRouter(route_class=MultipartRoute)

    @router.post("/v1/images/edits", dependencies=dependencies, include_in_schema=False)
    async def openai_edits(request: Request) -> dict:
        files: dict[str, list[bytes]] = {}
        fields: dict[str, str] = {}
        async with request.form(max_files=3, max_fields=32, max_part_size=max_body_bytes) as form:
            for key, value in form.multi_items():
                if isinstance(value, str):
                    fields[key] = value
                else:
                    files.setdefault(key, []).append(await value.read(max_body_bytes + 1))
        body, model = edit_from_form(files, fields, edit_model, lim)
        return await service.edit(body, model=model)

    app.include_router(router)

    @app.get("/v1/models", response_model=ModelList, dependencies=dependencies, responses=responses)
    async def models() -> dict:
        """The OpenAI API's model list: the base model and every adapter id `model` can name."""
        return {"object": "list", "data": await service.models()}

    @app.get("/v1/models/{model:path}", response_model=ModelObject, dependencies=dependencies, responses=responses)
    async def model(model: str) -> dict:
        """One entry of the model list; 404 for a model it does not hold."""
        found = [m for m in await service.models() if m["id"] == model]
        if not found:
            raise unknown_model(model)
        return found[0]
