"""The demo page in headless Chromium: draw two classes with the mouse, register the task, draw
queries, and read the predicted label; the page is left as a screenshot in artifacts/.

Needs Debian's `chromium` and the `playwright` package (the browser itself is not downloaded: the
system one is driven). Without them the test fails, saying what to install; CI installs both.
"""

from __future__ import annotations

import io
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from api_tests.helpers import REPO, Server, inverted
from api_tests.helpers import glyph as draw_glyph

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = REPO / "artifacts" / "demo-page.png"
TIMEOUT_MS = 60_000  # a classification on two busy cores, with the model warm, takes well under this
PAD = 160  # the pads' size in CSS pixels


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs playwright: pip install 'playwright>=1.50,<2'", pytrace=False)
    executable = shutil.which("chromium") or CHROMIUM
    if not Path(executable).exists():
        pytest.fail("the browser test needs Chromium at /usr/bin/chromium: apt-get install chromium",
                    pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def problems() -> list[str]:
    """Console errors, uncaught exceptions and requests that left the server, as the page runs."""
    return []


@pytest.fixture
def page(browser: Any, server: Server, problems: list[str]) -> Iterator[Any]:
    def request(r: Any) -> None:
        if not r.url.startswith((server.url, "data:", "blob:")):
            problems.append(f"request off the server: {r.url}")

    def console(m: Any) -> None:
        if m.type == "error":
            problems.append(f"console: {m.text}")

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", console)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", request)
    try:
        yield page
    finally:
        page.close()


def draw(page: Any, canvas: Any, glyph: str, shift: tuple[float, float] = (0, 0)) -> None:
    """Draw a glyph on a 160 px pad with the mouse: "bar" (a vertical stroke) or "circle"."""
    box = canvas.bounding_box()
    dx, dy = shift

    def at(x: float, y: float) -> tuple[float, float]:
        return box["x"] + (x + dx) * box["width"] / PAD, box["y"] + (y + dy) * box["height"] / PAD

    if glyph == "bar":
        points = [(80, 25 + 110 * t / 20) for t in range(21)]
    elif glyph == "circle":
        points = [(80 + 52 * math.cos(2 * math.pi * t / 40), 80 + 52 * math.sin(2 * math.pi * t / 40))
                  for t in range(41)]
    else:
        raise ValueError(glyph)
    page.mouse.move(*at(*points[0]))
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*at(*point), steps=2)
    page.mouse.up()


def classify(page: Any, glyph: str, shift: tuple[float, float], answer: str = "^Looks like") -> list[str]:
    """Draw a query, classify it, and return the top-k labels as the page shows them."""
    page.click("#query-clear")
    draw(page, page.locator("#query-canvas"), glyph, shift)
    page.click("#classify")
    # Locators, not wait_for_function: the page's Content-Security-Policy forbids eval'd strings.
    page.locator("#query-status").filter(has_text=re.compile(answer)).wait_for()
    return page.locator("#predictions .prediction .label").all_inner_texts()


def similarity(page: Any) -> float:
    """The support similarity the page shows for the last query."""
    shown = re.search(r"Similarity to the support set: (-?[0-9.]+)", page.inner_text("#similarity"))
    assert shown is not None, page.inner_text("#similarity")
    return float(shown.group(1))


@pytest.mark.browser
def test_draw_two_classes_register_and_classify_a_drawn_query(
    page: Any, server: Server, problems: list[str], record_property: Any
) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#results").is_hidden()  # no empty result headings before a query
    assert not page.get_by_text("Top-k predictions").is_visible()
    cards = page.locator(".class-card")
    assert cards.count() == 2
    # Three drawings a class: two kept with "Add example", the last left on the pad (the page sends it).
    for card, glyph in zip((cards.nth(0), cards.nth(1)), ("bar", "circle"), strict=True):
        card.locator(".class-name").fill(glyph)
        for shift in ((-12, 4), (10, -6), (0, 0)):
            draw(page, card.locator("canvas"), glyph, shift)
            if shift != (0, 0):
                card.locator(".add-example").click()
        assert card.locator(".examples img").count() == 2

    page.click("#register")
    page.wait_for_selector("#task[data-task-id]")
    assert "2-way (bar: 3, circle: 3)" in page.inner_text("#task")

    assert page.locator("#warnings").is_hidden()  # two clean classes: no warnings
    assert classify(page, "bar", (7, 3))[0] == "bar"
    assert -1 <= similarity(page) <= 1
    labels = classify(page, "circle", (-6, 5))
    assert labels == ["circle", "bar"]  # top-3 of a 2-way task: both, best first
    attention = page.locator("#attention .support")
    assert attention.count() == 6  # one row per support example, with its thumbnail
    assert attention.locator("img").count() == 6

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    record_property("screenshot", str(SCREENSHOT))
    print(f"demo page screenshot: {SCREENSHOT}")
    assert problems == []


@pytest.mark.browser
def test_register_again_keeps_one_task_reusing_it_while_the_support_set_is_the_same(
    page: Any, server: Server, client: httpx.Client, problems: list[str]
) -> None:
    def task_ids() -> set[str]:
        return {task["task_id"] for task in client.get("/v1/tasks", params={"limit": 200}).json()["data"]}

    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    cards = page.locator(".class-card")
    for card, glyph in zip((cards.nth(0), cards.nth(1)), ("bar", "circle"), strict=True):
        card.locator(".class-name").fill(glyph)
        draw(page, card.locator("canvas"), glyph)
        card.locator(".add-example").click()
    before = task_ids()
    page.click("#register")
    page.wait_for_selector("#task[data-task-id]")
    first = page.get_attribute("#task", "data-task-id")
    assert task_ids() == before | {first}

    page.click("#register")  # nothing changed: the same task, nothing stored
    page.locator("#task").filter(has_text="already holds this support set").wait_for()
    assert page.get_attribute("#task", "data-task-id") == first and task_ids() == before | {first}

    draw(page, cards.nth(0).locator("canvas"), "bar", (8, 0))  # one more example: a new task replaces it
    cards.nth(0).locator(".add-example").click()
    page.click("#register")
    page.locator("#task").filter(has_text="2-way (bar: 2, circle: 1)").wait_for()
    second = page.get_attribute("#task", "data-task-id")
    assert second != first
    page.wait_for_timeout(500)  # the delete of the replaced task is not awaited by the page
    assert task_ids() == before | {second}
    assert problems == []


@pytest.mark.browser
def test_warnings_none_of_these_and_the_similarity_are_shown(page: Any, server: Server,
                                                            problems: list[str]) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    cards = page.locator(".class-card")
    for card, name in zip((cards.nth(0), cards.nth(1)), ("circle", "ring"), strict=True):
        card.locator(".class-name").fill(name)
        draw(page, card.locator("canvas"), "circle")  # the same drawing under both names
    page.click("#register")
    page.wait_for_selector("#task[data-task-id]")
    warnings = page.locator("#warnings .warning")
    warnings.first.wait_for()
    pair = page.locator('#warnings .warning[data-type="indistinguishable_examples"]')
    assert pair.count() == 1 and "look the same" in pair.inner_text()
    assert pair.locator("img").count() == 2  # both examples' thumbnails

    page.fill("#min-confidence", "1")
    classify(page, "circle", (0, 0), answer="^None of these")  # a circle between "circle" and "ring"
    assert similarity(page) == pytest.approx(1.0, abs=0.01)  # the very drawing of the support set
    page.screenshot(path=str(SCREENSHOT.with_name("demo-page-warnings.png")), full_page=True)
    assert problems == []


def white_pen_png(glyph: str, shift: tuple[int, int] = (0, 0)) -> bytes:
    """A glyph in a white pen on a transparent 160 px canvas, as drawing apps with a dark theme
    export it: on white paper it would not show."""
    ink = inverted(draw_glyph(glyph, size=PAD, shift=shift))  # opaque where there is ink
    img = Image.new("RGBA", ink.size, (255, 255, 255, 0))
    img.putalpha(ink)
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.browser
def test_uploads_in_a_white_pen_on_a_transparent_canvas_register_and_classify(
    page: Any, server: Server, problems: list[str]
) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    cards = page.locator(".class-card")
    for card, glyph in zip((cards.nth(0), cards.nth(1)), ("bar", "circle"), strict=True):
        card.locator(".class-name").fill(glyph)
        files = [{"name": f"{glyph}-{k}.png", "mimeType": "image/png", "buffer": white_pen_png(glyph, shift)}
                 for k, shift in enumerate(((0, 0), (6, -4)))]
        card.locator(".upload-input").set_input_files(files)
        card.locator(".examples img").nth(1).wait_for()
    page.click("#register")
    page.locator("#task").filter(has_text="2-way (bar: 2, circle: 2)").wait_for()
    for glyph in ("circle", "bar"):
        page.locator("#query-upload").set_input_files(
            {"name": "query.png", "mimeType": "image/png", "buffer": white_pen_png(glyph, (-5, 3))})
        page.click("#classify")
        page.locator("#query-status").filter(has_text=f"Looks like “{glyph}”").wait_for()
        assert page.locator("#predictions .prediction .label").all_inner_texts()[0] == glyph
    assert problems == []


def test_the_page_and_its_files_are_served_from_this_origin_only(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "://" not in page.text  # nothing from a CDN: the page works offline
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        assert f"/static/{name}" in page.text
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert "://" not in response.text
    assert client.get("/static/../settings.py").status_code == 404
    assert client.get("/static/nope.js").json()["error"]["type"] == "not_found"


def test_the_page_answers_head_as_get(client: httpx.Client) -> None:
    for path in ("/", "/static/app.js", "/static/style.css"):
        head, get = client.head(path), client.get(path)
        assert head.status_code == get.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]


def test_hidden_wins_over_display_and_the_status_line_keeps_words_whole(client: httpx.Client) -> None:
    css = client.get("/static/style.css").text
    assert re.search(r"\[hidden\]\s*\{\s*display:\s*none\s*!important", css)
    status = re.search(r"\.status\s*\{([^}]*)\}", css)
    assert status is not None and "anywhere" not in status.group(1) and "break-all" not in css
