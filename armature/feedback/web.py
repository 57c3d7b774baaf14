"""The labeling web page: a FastAPI app over a :class:`PreferenceStore`.

One plain HTML page (no build step) shows the prompt and the two images of a pair side by side,
in the random left/right order the store drew and recorded when it served the pair; the
annotator answers with buttons or keys (← or 1: left, → or 2: right, ↓ or 3: no preference;
with ``severity`` on, the digits 0-3 pick the rejected image's error severity and the arrows
answer). The page shows the
annotator's progress and throughput.

API (every ``/api`` route needs ``Authorization: Bearer <token>``; ``armature label annotator``
makes tokens, and there are no anonymous writes):

* ``GET  /api/next``  → ``{pair_id, prompt, left, right (data: URIs), progress}`` or ``{pair_id: null}``
* ``POST /api/label`` ``{pair_id, choice: left|right|none, severity?}`` → the stored decision and
  progress; the label is committed to the database before the response is sent, so a server
  killed after answering has lost nothing.
* ``GET  /api/me``    → progress; ``GET /healthz`` → ``ok`` (no token).

The token travels only in that header: a request with ``?token=`` in its URL is refused (URLs
end up in logs and browser history). A link ``/?token=...`` still opens the page, which moves the
token out of the address bar at once and keeps it in ``sessionStorage`` (gone with the tab).
Every response forbids framing (``X-Frame-Options: DENY``, CSP ``frame-ancestors 'none'``) and
the page runs only its own inline script and style (CSP hashes), images only from ``data:``.
A severity is refused unless the page asks for one (``severity`` on, and a preference given).

``armature label serve --db feedback.db`` runs it with uvicorn; :func:`deployment` wraps the same
app for Ray Serve.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import BaseModel, Field

from armature.feedback.store import CHOICES, PreferenceStore

__all__ = ["create_app", "deployment", "serve", "PAGE"]


class LabelIn(BaseModel):
    pair_id: str = Field(min_length=1, max_length=64)
    choice: str = Field(description="left, right or none (no preference)")
    severity: int | None = Field(default=None, ge=0, le=3)


def _data_uri(data: bytes) -> str:
    kind = "png"
    if data[:3] == b"\xff\xd8\xff":
        kind = "jpeg"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "webp"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def create_app(
    store: PreferenceStore | str,
    severity: bool = False,
    title: str = "Armature: which image is better?",
    labels_per_pair: int = 1,
) -> FastAPI:
    """The labeling app. ``store``: a store, or its database URL / path (opened with
    ``labels_per_pair``); ``severity``: ask for the rejected image's error severity (0 none .. 3
    severe) with each preference."""
    if not isinstance(store, PreferenceStore):
        store = PreferenceStore(store, labels_per_pair=labels_per_pair)
    app = FastAPI(title="Armature labeling", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def annotator(request: Request) -> str:
        if "token" in request.query_params:
            raise HTTPException(
                400,
                "token: send it in the Authorization header (Authorization: Bearer <token>), "
                "never in the URL, where logs and browser history keep it",
            )
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        name = store.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            raise HTTPException(
                401,
                "a valid annotator token is required: Authorization: Bearer <token> "
                "(make one with `armature label annotator NAME --db ...`)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return name

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{{TITLE}}", html.escape(title)).replace("{{SEVERITY}}", "true" if severity else "false")

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @app.get("/api/me")
    def me(name: str = Depends(annotator)) -> dict:
        return store.progress(name)

    @app.get("/api/next")
    def next_pair(name: str = Depends(annotator)) -> dict:
        pair = store.next_pair(name)
        if pair is None:
            return {"pair_id": None, "progress": store.progress(name)}
        left, right = ("a", "b") if pair["left"] == "a" else ("b", "a")
        return {
            "pair_id": pair["pair_id"],
            "prompt": pair["prompt"],
            "left": _data_uri(store.image(pair["pair_id"], left)),
            "right": _data_uri(store.image(pair["pair_id"], right)),
            "severity": severity,
            "progress": store.progress(name),
        }

    @app.post("/api/label")
    def label(body: LabelIn, name: str = Depends(annotator)) -> dict:
        if body.choice not in CHOICES:
            raise HTTPException(422, f"choice {body.choice!r}: expected one of {', '.join(CHOICES)}")
        if severity and body.choice != "none" and body.severity is None:
            raise HTTPException(422, "this page asks for a severity (0-3) with each preference")
        if body.severity is not None and (not severity or body.choice == "none"):
            raise HTTPException(
                422,
                "severity: this page does not ask for one"
                + (" with no preference (choice none)" if severity else " (the server runs without --severity)"),
            )
        try:
            stored = store.submit(name, body.pair_id, body.choice, body.severity)
        except PermissionError as err:
            raise HTTPException(403, str(err)) from err
        except ValueError as err:
            raise HTTPException(409, str(err)) from err
        return {"decision": stored["decision"], "pair_id": body.pair_id, "progress": store.progress(name)}

    return app


def serve(db: str, host: str = "127.0.0.1", port: int = 8300, severity: bool = False, labels_per_pair: int = 1) -> None:
    """Run the labeling app with uvicorn until interrupted."""
    import uvicorn

    store = PreferenceStore(db, labels_per_pair=labels_per_pair)
    print(
        f"[armature] labeling page on http://{host}:{port}/  (store {store.url}, "
        f"{store.counts()['pairs']} pairs, {len(store.annotators())} annotators)",
        flush=True,
    )
    uvicorn.run(create_app(store, severity=severity), host=host, port=port, log_level="warning")


def deployment(db: str, severity: bool = False, labels_per_pair: int = 1):
    """The same app as a Ray Serve application: ``serve.run(deployment("feedback.db"))``. Each
    replica builds the app and opens the database itself (nothing live is pickled); use
    PostgreSQL when replicas span machines."""
    from ray import serve as ray_serve

    @ray_serve.deployment(name="labeling")
    @ray_serve.ingress()
    class Labeling:
        def __init__(self, db: str, severity: bool, labels_per_pair: int):
            self.args = (db, severity, labels_per_pair)

        def __serve_build_asgi_app__(self):
            db, severity, labels_per_pair = self.args
            return create_app(db, severity=severity, labels_per_pair=labels_per_pair)

    return Labeling.bind(str(db), severity, labels_per_pair)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
 #prompt { font-size: 1.3em; margin: .5em 0 1em; }
 .pair { display: flex; gap: 2em; }
 .side { text-align: center; }
 .side img { width: 384px; height: 384px; object-fit: contain; image-rendering: pixelated;
             border: 3px solid #ccc; background: #fff; }
 button { font-size: 1.1em; margin: .6em .3em; padding: .4em 1em; }
 #status { margin-top: 1em; color: #555; }
 #login { margin-bottom: 1em; }
 .sev button.on { background: #333; color: #fff; }
 .hidden { display: none; }
</style></head>
<body data-severity="{{SEVERITY}}">
<h2>{{TITLE}}</h2>
<div id="login">Annotator token: <input id="token" type="password" size="48">
 <button id="save-token">Start</button></div>
<div id="work" class="hidden">
 <div id="prompt"></div>
 <div class="pair">
  <div class="side"><img id="left-img" alt="left image"><br><button id="btn-left">← Left is better (1)</button></div>
  <div class="side"><img id="right-img" alt="right image"><br><button id="btn-right">Right is better (2) →</button></div>
 </div>
 <div><button id="btn-none">↓ No preference (3)</button></div>
 <div id="sev" class="sev hidden">Severity of the worse image's error:
  <button data-sev="0">0 none</button><button data-sev="1">1 minor</button>
  <button data-sev="2">2 moderate</button><button data-sev="3">3 severe</button></div>
</div>
<div id="done" class="hidden">Nothing left to label. Thank you!</div>
<div id="status"></div>
<script>
const SEVERITY = document.body.dataset.severity === "true";
// the token lives in this tab only (sessionStorage); one pasted in the URL leaves the address bar at once
const params = new URLSearchParams(location.search);
let token = params.get("token") || sessionStorage.getItem("armature-token") || "";
if (params.has("token")) {
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
}
localStorage.removeItem("armature-token");  // kept there by earlier versions of this page
if (token) sessionStorage.setItem("armature-token", token);
let current = null, severity = null, busy = false, started = Date.now(), session = 0;
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const init = {headers: {"Authorization": "Bearer " + token}};
  if (body) { init.method = "POST"; init.body = JSON.stringify(body);
              init.headers["Content-Type"] = "application/json"; }
  const r = await fetch(path, init);
  if (r.status === 401) { $("login").classList.remove("hidden"); $("work").classList.add("hidden");
                          throw new Error("invalid token"); }
  if (!r.ok) throw new Error((await r.json()).detail || r.statusText);
  return r.json();
}

function showProgress(p) {
  const mins = (Date.now() - started) / 60000;
  const rate = session && mins > 0 ? (session / mins).toFixed(1) : "-";
  $("status").textContent = `Labeled ${p.labeled} (this session ${session}, ${rate}/min; ` +
    `last hour ${p.per_minute}/min), ${p.remaining} to go.`;
}

async function load() {
  const data = await api("/api/next");
  showProgress(data.progress);
  if (!data.pair_id) { current = null; $("work").classList.add("hidden"); $("done").classList.remove("hidden");
                       document.body.dataset.state = "done"; return; }
  current = data.pair_id; severity = null;
  document.querySelectorAll("#sev button").forEach((b) => b.classList.remove("on"));
  $("prompt").textContent = data.prompt;
  $("left-img").src = data.left; $("right-img").src = data.right;
  $("work").classList.remove("hidden"); $("done").classList.add("hidden");
  document.body.dataset.pair = current; document.body.dataset.state = "ready";
}

async function answer(choice) {
  if (!current || busy) return;
  if (SEVERITY && choice !== "none" && severity === null) {
    $("status").textContent = "Pick the worse image's severity first (0-3)."; return; }
  busy = true; document.body.dataset.state = "saving";
  try {
    const body = {pair_id: current, choice: choice};
    if (SEVERITY && choice !== "none") body.severity = severity;
    await api("/api/label", body);
    session += 1;
    await load();
  } catch (e) { $("status").textContent = "Not saved: " + e.message; document.body.dataset.state = "error"; }
  finally { busy = false; }
}

function setSeverity(level) {
  severity = level;
  document.querySelectorAll("#sev button").forEach((b) => b.classList.toggle("on", +b.dataset.sev === level));
}

$("btn-left").onclick = () => answer("left");
$("btn-right").onclick = () => answer("right");
$("btn-none").onclick = () => answer("none");
document.querySelectorAll("#sev button").forEach((b) => b.onclick = () => setSeverity(+b.dataset.sev));
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT") return;
  // with severity on, the digits 0-3 pick the severity and the arrows answer
  if (SEVERITY && ["0", "1", "2", "3"].includes(e.key)) { e.preventDefault(); setSeverity(+e.key); return; }
  const keys = {ArrowLeft: "left", "1": "left", ArrowRight: "right", "2": "right", ArrowDown: "none", "3": "none"};
  if (keys[e.key]) { e.preventDefault(); answer(keys[e.key]); }
});
$("save-token").onclick = () => { token = $("token").value.trim(); sessionStorage.setItem("armature-token", token); begin(); };

async function begin() {
  if (!token) return;
  if (SEVERITY) $("sev").classList.remove("hidden");
  $("login").classList.add("hidden");
  try { await load(); } catch (e) { $("status").textContent = e.message; }
}
begin();
</script>
</body></html>
"""


def _csp_hash(tag: str) -> str:
    """The CSP source for the page's one inline ``<tag>`` block: its SHA-256, base64."""
    body = re.search(rf"<{tag}>(.*?)</{tag}>", PAGE, re.S).group(1)
    return f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"


SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_csp_hash('script')}; "
        f"style-src {_csp_hash('style')}; img-src data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
