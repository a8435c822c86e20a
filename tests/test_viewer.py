"""The viewer: only its own routes, JSON endpoints, and what a person sees in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from atlas_fixtures import (
    HOSTILE,
    OPTIONS,
    atlas_of,
    corpus,
    hostile_dataset,
    save_run,
    tiny_config,
)

from monet.interp.query import Atlas
from monet.interp.viewer.server import make_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory):
    """A server on a free port over an atlas built from a corpus with hostile HTML in its documents."""
    base = tmp_path_factory.getbasetemp()
    data = corpus(base)
    work = tmp_path_factory.mktemp("viewer")
    hostile = hostile_dataset(data, work / "hostile-data")
    run = save_run(work / "run", tiny_config(), data, seed=0)
    atlas = Atlas(atlas_of(run, hostile, work / "atlas", OPTIONS.__class__(max_tokens=None, top_k=5, seq_len=32)))
    server = make_server(atlas, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield {"url": f"http://{host}:{port}", "atlas": atlas, "work": work}
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def hostile_expert(atlas: Atlas) -> tuple[int, int]:
    """An expert whose top contexts show a `<script` piece."""
    for group in atlas.groups:
        for expert in range(atlas.num_experts):
            for ctx in atlas.top_contexts(group, expert):
                if "<script" in "".join(ctx["pieces"]):
                    return group, expert
    raise AssertionError("no context shows the hostile text")


def test_routes_and_json(viewer):
    url = viewer["url"]
    status, body, headers = get(url + "/")
    assert status == 200 and b"/static/app.js" in body and "script-src 'self'" in headers["Content-Security-Policy"]
    assert get(url + "/static/app.js")[0] == 200 and get(url + "/static/style.css")[0] == 200
    for bad in ("/etc/passwd", "/static/../server.py", "/static/%2e%2e/server.py", "/static/server.py",
                "/api/nothing", "/api/expert/0", "/../../pyproject.toml"):
        assert get(url + bad)[0] == 404, bad
    status, body, _ = get(url + "/api/expert/0/999999")
    assert status == 400 and "unknown expert" in json.loads(body)["error"]
    assert get(url + "/api/expert/x/1")[0] == 400
    info = json.loads(get(url + "/api/info")[1])
    assert info["groups"] == [0, 1] and info["experts"] == 64
    data = json.loads(get(url + "/api/expert/0/1")[1])
    assert {"contexts", "label_share", "histogram", "count"} <= set(data)
    pick = json.loads(get(url + "/api/random")[1])
    assert 0 <= pick["expert"] < 64
    assert isinstance(json.loads(get(url + "/api/token?q=%3C")[1]), list)
    assert isinstance(json.loads(get(url + "/api/label/javascript")[1]), list)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_expert_page_in_headless_chromium(viewer):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    group, expert = hostile_expert(viewer["atlas"])
    profile = viewer["work"] / "chromium-profile"
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        # A fresh profile directory (Playwright passes it as --user-data-dir).
        browser = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, args=args,
                                                       headless=True, timeout=120_000)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)   # generous: CI machines can be busy
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{viewer['url']}/#/expert/{group}/{expert}")
            page.wait_for_selector("#contexts tr")
            assert page.inner_text("#expert-title") == f"Group {group} / Expert {expert}"
            rows = page.locator("#contexts tr")
            assert rows.count() >= 1
            text = page.inner_text("#contexts")
            assert "<script" in text                         # shown as literal text ...
            assert page.evaluate("typeof window.__pwned") == "undefined"   # ... and never run
            assert page.locator("#contexts script, #contexts img").count() == 0
            assert page.locator("mark.hit").count() == rows.count()
            first = rows.first.locator("td.pct").inner_text()
            assert first.endswith("%") and float(first[:-1]) > 0
            assert page.locator("#labels .bar").count() == len(viewer["atlas"].labels)
            if os.environ.get("MONET_SCREENSHOT"):
                page.screenshot(path=os.environ["MONET_SCREENSHOT"], full_page=True)
            # Navigation by URL: another expert, then a token search.
            page.goto(f"{viewer['url']}/#/expert/1/3")
            page.wait_for_selector("#expert-title:text-is('Group 1 / Expert 3')")   # (CSP forbids eval'd waits)
            assert page.input_value("#expert") == "3" and page.input_value("#group") == "1"
            page.click("#random")
            page.wait_for_url(lambda u: "#/expert/" in u and not u.endswith("#/expert/1/3"))
            page.goto(f"{viewer['url']}/#/token/%3C")
            page.wait_for_selector("main h2:has-text('Experts of the token')")
            assert page.locator("ul.experts li a").count() >= 1
            page.goto(f"{viewer['url']}/#/expert/0/999999")
            page.wait_for_selector("main .error")
            assert "unknown expert" in page.inner_text("main .error")
            assert errors == [] and page.evaluate("typeof window.__pwned") == "undefined"
        finally:
            browser.close()


def test_hostile_text_is_in_the_atlas(viewer):
    pieces = "".join("".join(c["pieces"]) for c in viewer["atlas"].top_contexts(*hostile_expert(viewer["atlas"])))
    assert "<script" in pieces and any("<script>" in h for h in HOSTILE)


def test_view_refuses_a_busy_port(viewer):
    from monet.errors import MonetError

    port = int(viewer["url"].rsplit(":", 1)[1])
    with pytest.raises(MonetError, match="another --port"):
        make_server(viewer["atlas"], "127.0.0.1", port)


def test_static_files_are_package_data():
    static = Path(__file__).parents[1] / "src" / "monet" / "interp" / "viewer" / "static"
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "style.css"}
    assert "innerHTML" not in (static / "app.js").read_text().replace("never innerHTML", "")
