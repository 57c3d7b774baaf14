"""A small Python client of the generator's HTTP API (httpx).

from armature.serve.client import GeneratorClient

with GeneratorClient("http://127.0.0.1:8000") as client:   # api_key: ARMATURE_API_KEY
    result = client.generate("a cat", n=2, seed=7, adapter="armature-adapter@prod")
    result.images[0].save("cat.png")
    edit = client.edit(scene, "a person waving", box=[8, 4, 40, 60])  # scene: PIL image or array
    pose = edit.pose                                   # keypoint JSON: change a joint, then
    again = client.edit(scene, "a person waving", box=[8, 4, 40, 60], pose=pose, seed=edit.seed)
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field

import httpx

__all__ = ["GeneratorClient", "GeneratorError", "Generation", "Edit"]


class GeneratorError(RuntimeError):
    """A non-200 answer: ``status``, the request ``field`` at fault, ``message``."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{status} ({field}): {message}")
        self.status, self.field, self.message = status, field, message


@dataclass
class Generation:
    images: list  # PIL images
    seeds: list[int]
    scores: list[float | None]
    adapter_version: str | None
    raw: dict = field(repr=False)


@dataclass
class Edit:
    image: object  # a PIL image
    pose: dict  # the keypoint JSON the person was rendered from
    seed: int
    layout: object | None  # the layout image (PIL), when the server sends it
    raw: dict = field(repr=False)


def _png_b64(image) -> str:
    """A PIL image, an ``[H, W(, 3)]`` uint8 array or PNG bytes as a base64 PNG."""
    import numpy as np
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return base64.b64encode(data).decode()


class GeneratorClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 120.0):
        api_key = api_key if api_key is not None else os.environ.get("ARMATURE_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> "GeneratorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _check(self, response: httpx.Response) -> dict:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise GeneratorError(
                response.status_code, error.get("field", "?"), error.get("message", response.text[:200])
            )
        return body

    def generate(self, prompt: str, **params) -> Generation:
        """``POST /v1/images/generations``; ``params``: negative_prompt, n, size ("WxH"), steps,
        guidance_scale, seed, adapter, reward, best_of."""
        from PIL import Image

        body = self._check(self.http.post("/v1/images/generations", json={"prompt": prompt, **params}))
        images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in body["data"]]
        return Generation(
            images=images,
            seeds=[d["seed"] for d in body["data"]],
            scores=[d.get("score") for d in body["data"]],
            adapter_version=body.get("adapter_version"),
            raw=body,
        )

    def edit(
        self, image, prompt: str, *, box: list[int] | None = None, mask=None, pose: dict | None = None, **params
    ) -> Edit:
        """``POST /v1/images/edits``: render a person into ``image`` (PIL, uint8 array or PNG bytes)
        inside ``box`` [x0, y0, x1, y1] or ``mask`` (nonzero: person), from ``pose`` (keypoint
        JSON) or a pose the model plans; ``params``: seed, steps."""
        from PIL import Image

        body = {"image": _png_b64(image), "prompt": prompt, **params}
        if box is not None:
            body["box"] = [int(v) for v in box]
        if mask is not None:
            import numpy as np

            if not isinstance(mask, (bytes, bytearray, Image.Image)):
                mask = np.asarray(mask).astype(np.uint8) * 255 if np.asarray(mask).dtype == bool else mask
            body["mask"] = _png_b64(mask)
        if pose is not None:
            body["pose"] = pose.to_json() if hasattr(pose, "to_json") else pose
        answer = self._check(self.http.post("/v1/images/edits", json=body))
        layout = answer.get("layout_b64_json")
        return Edit(
            image=Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))),
            pose=answer["pose"],
            seed=answer["data"][0]["seed"],
            layout=Image.open(io.BytesIO(base64.b64decode(layout))) if layout else None,
            raw=answer,
        )

    def adapters(self) -> list[dict]:
        return self._check(self.http.get("/v1/adapters"))["data"]

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False
