"""The labeling page in a real browser: headless Chromium (Debian's ``chromium`` package, driven
by Playwright without its browser download) labels pairs with clicks and keys; the store must
hold the right winner after the page's random left/right order."""

import base64
import io
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from armature.feedback.store import PreferenceStore

CHROMIUM = os.environ.get("ARMATURE_CHROMIUM", "/usr/bin/chromium")
RED, BLUE = (220, 10, 10), (10, 10, 220)

pytestmark = pytest.mark.skipif(
    not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
)


@pytest.fixture
def server(tmp_path):
    """The app under uvicorn in a thread, on a free port; yields (base URL, db path, severity setter)."""
    import uvicorn

    from armature.feedback.web import create_app

    servers = []

    def start(db, severity=False):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(
            create_app(str(db), severity=severity), host="127.0.0.1", port=port, log_level="warning"
        )
        srv = uvicorn.Server(config)
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not srv.started and time.time() < deadline:
            time.sleep(0.05)
        servers.append((srv, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for srv, thread in servers:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def seed(db, n):
    store = PreferenceStore(db)
    store.add_pairs(
        [
            {
                "prompt": f"a person waving, take {i}",
                "image_a": np.full((16, 16, 3), RED, np.uint8),
                "image_b": np.full((16, 16, 3), BLUE, np.uint8),
            }
            for i in range(n)
        ]
    )
    token = store.add_annotator("bob")
    store.close()
    return token


def left_color(page):
    src = page.get_attribute("#left-img", "src")
    data = base64.b64decode(src.split(",", 1)[1])
    return tuple(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, 0])


def expected(color_on_left, choice):
    if choice == "none":
        return "tie"
    picked = color_on_left if choice == "left" else (BLUE if color_on_left == RED else RED)
    return "w" if picked == RED else "l"  # red is stored image a: "w"


def wait_next(page, previous):
    # CSS selectors, not wait_for_function: the page's CSP forbids the eval that it polls with
    page.wait_for_selector(
        f"body[data-state='done'], body[data-state='ready']:not([data-pair='{previous}'])", state="attached"
    )


def test_clicks_and_keys_store_the_right_winner(tmp_path, server, browser):
    db = tmp_path / "fb.db"
    token = seed(db, 24)
    base = server(db)
    page = browser.new_page()
    blocked = []  # what the page's Content-Security-Policy refused: nothing of its own
    page.on("console", lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.goto(f"{base}/?token={token}&lang=en")
    page.wait_for_selector("body[data-state='ready']", state="attached")
    assert page.url == f"{base}/?lang=en"  # the token left the address bar (and history) at once
    assert page.evaluate("localStorage.getItem('armature-token')") is None
    assert page.evaluate("sessionStorage.getItem('armature-token')") == token
    # (how, what, choice): buttons and both key sets
    actions = [
        ("click", "#btn-left", "left"),
        ("click", "#btn-right", "right"),
        ("click", "#btn-none", "none"),
        ("key", "ArrowLeft", "left"),
        ("key", "ArrowRight", "right"),
        ("key", "ArrowDown", "none"),
        ("key", "1", "left"),
        ("key", "2", "right"),
    ] * 3  # 24 pairs: a page that did shuffle shows both colours on the left but with p = 2 / 2^24
    wanted, lefts = {}, set()
    for how, what, choice in actions:
        pair_id = page.evaluate("document.body.dataset.pair")
        color = left_color(page)
        lefts.add(color)
        wanted[pair_id] = expected(color, choice)
        page.click(what) if how == "click" else page.keyboard.press(what)
        wait_next(page, pair_id)
    assert page.evaluate("document.body.dataset.state") == "done"
    assert "Labeled 24" in page.text_content("#status")
    assert lefts == {RED, BLUE}  # the page did shuffle
    assert not blocked, blocked
    page.close()

    labels = {lab["pair_id"]: lab["decision"] for lab in PreferenceStore(db).labels()}
    assert labels == wanted
    # which of w / l the left-right choices give depends on the shuffle, so only the ties are certain
    assert list(labels.values()).count("tie") == 6 and set(labels.values()) <= {"w", "l", "tie"}


def test_token_form_and_severity_keys(tmp_path, server, browser):
    db = tmp_path / "fb.db"
    token = seed(db, 2)
    base = server(db, severity=True)
    page = browser.new_page()
    page.goto(base + "/")
    page.fill("#token", token)
    page.click("#save-token")
    page.wait_for_selector("body[data-state='ready']", state="attached")
    assert (
        page.evaluate("localStorage.length") == 0 and page.evaluate("sessionStorage.getItem('armature-token')") == token
    )
    pair_id, color = page.evaluate("document.body.dataset.pair"), left_color(page)
    page.keyboard.press("ArrowLeft")  # no severity yet: refused on the page, nothing stored
    assert "severity" in page.text_content("#status")
    page.keyboard.press("3")  # severity 3 (severe) ...
    page.keyboard.press("ArrowLeft")  # ... then the left image wins
    wait_next(page, pair_id)
    page.close()
    [label] = PreferenceStore(db).labels()
    assert label["pair_id"] == pair_id and label["decision"] == expected(color, "left") and label["severity"] == 3
