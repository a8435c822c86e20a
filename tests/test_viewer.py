"""The viewer: only its own routes, JSON endpoints, hardening, and what a person sees in headless Chromium.

Set MONET_SCREENSHOT=DIR to keep a full-page PNG of every page the browser tests visit."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from atlas_fixtures import HOSTILE, build_settings, corpus, save_run, start_dataset_like, tiny_config

import monet
from monet.checkpoint import load_checkpoint, save_checkpoint
from monet.data import TokenDataset
from monet.data.storage import write_split
from monet.edits import ExpertEdits, edited
from monet.generate import generate_text
from monet.interp.atlas import AtlasOptions, build_atlas
from monet.interp.export import expert_page
from monet.interp.query import Atlas
from monet.interp.viewer.server import ViewerState, allowed_hosts, host_allowed, make_server
from monet.io import printable

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RTL = "x = 1; // \u202eevil\x1b[2J tail"          # a right-to-left override and an ESC inside a context
EVIL_LABEL = "\u202eevil"                          # shows as "live" if the override were interpreted
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


def viewer_dataset(data: Path, out: Path) -> Path:
    """Hostile documents (HTML, an RTL override and an ESC) plus the start of every validation document of the
    code corpus; the label "c" is renamed to one holding U+202E."""
    if (out / "manifest.json").is_file():
        return out
    manifest, tokenizer = start_dataset_like(data, out)
    labels = manifest["labels"]

    def doc(text: str) -> list[int]:
        return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]

    docs = [doc(HOSTILE[0]) * 3, doc(HOSTILE[1]) * 3, doc(RTL * 4)]
    doc_labels = [labels.index("javascript"), labels.index("c"), labels.index("javascript")]
    source = TokenDataset(data, "validation")
    for i in range(source.num_documents):
        docs.append([int(t) for t in source.document(i)[:700]])
        doc_labels.append(int(source.docs[i, 2]))
    for split in ("train", "validation"):
        write_split(out, split, docs, doc_labels, [{"source": "test"} for _ in docs], manifest["vocab_size"])
    manifest["labels"] = [EVIL_LABEL if label == "c" else label for label in labels]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def calibrated_run(path: Path, data: Path) -> Path:
    """A tiny untrained model whose router BatchNorm statistics were estimated on the corpus (forward passes in
    training mode, no weight update), so its experts fire with varied scores as a trained model's do."""
    if (path / "checkpoints").is_dir():
        return path
    torch.manual_seed(0)
    model = monet.MonetForCausalLM(tiny_config())
    dataset = TokenDataset(data, "train")
    tokens = np.asarray(dataset.tokens[:32 * 64], dtype=np.int64).reshape(32, 64)
    model.train()
    with torch.no_grad():
        for batch in torch.from_numpy(tokens).split(8):
            for _ in range(3):
                model(batch)
    model.eval()
    save_checkpoint(path, 1, model, tokenizer_dir=data)
    return path


def give_a_piece_an_rtl_override(atlas: Path) -> None:
    """Byte-level BPE splits U+202E into three byte tokens that each decode to U+FFFD on their own, so corpus
    text can bring it into a context only through a vocabulary piece that holds it (as a large vocabulary
    can). Give the activating token of the busiest expert such a piece, and record the new table's hash."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from monet.io import sha256_file, write_json

    reader = Atlas(atlas)
    group, expert = busiest(reader)
    token = reader.top_contexts(group, expert, 1)[0]["token"]
    table = pq.read_table(atlas / "vocab.parquet")
    pieces = table.column("piece").to_pylist()
    pieces[token] = "\u202e" + pieces[token] + "\x1b]0;pwned\x07"
    pq.write_table(table.set_column(1, "piece", pa.array(pieces, pa.string())), atlas / "vocab.parquet")
    manifest = json.loads((atlas / "manifest.json").read_text())
    manifest["tables"]["vocab.parquet"] = {"bytes": (atlas / "vocab.parquet").stat().st_size,
                                           "sha256": sha256_file(atlas / "vocab.parquet")}
    write_json(atlas / "manifest.json", manifest)


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory):
    """Servers on free ports over an atlas of a hostile corpus: one with the model (`--run`), one without."""
    base = tmp_path_factory.getbasetemp()
    data = corpus(base)
    work = tmp_path_factory.mktemp("viewer")
    hostile = viewer_dataset(data, work / "hostile-data")
    run = calibrated_run(work / "run", data)
    model, tokenizer = load_checkpoint(run)
    options = AtlasOptions(max_tokens=None, top_k=5, seq_len=32, batch_size=8, samples=3)
    build_atlas(model, tokenizer, build_settings(run, hostile, work / "atlas", options))
    give_a_piece_an_rtl_override(work / "atlas")
    atlas = Atlas(work / "atlas", model)
    servers = {"url": make_server(atlas, "127.0.0.1", 0, model, tokenizer),
               "bare": make_server(Atlas(work / "atlas"), "127.0.0.1", 0)}
    out = {"atlas": atlas, "work": work, "model": model, "tokenizer": tokenizer, "servers": servers}
    for name, server in servers.items():
        threading.Thread(target=server.serve_forever, daemon=True).start()
        host, port = server.server_address[:2]
        out[name] = f"http://{host}:{port}"
    yield out
    for server in servers.values():
        server.shutdown()
        server.server_close()


def similar_table(url: str, group: int, expert: int, timeout: float = 120) -> dict:
    """/api/similar, asked again while it answers "computing" (as the page does)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body, _ = get(url + f"/api/similar/{group}/{expert}")
        out = json.loads(body)
        assert status == 200, out
        if out["status"] == "done" or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def post(url: str, body, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def steer(url: str, body: dict, path: str = "/api/steer") -> tuple[int, dict]:
    """A steering job read to its end as the page reads it (POST, then /api/steer/JOB until done)."""
    status, out = post(url + path, body)
    deadline = time.monotonic() + 120
    while status == 200 and out["status"] == "running" and time.monotonic() < deadline:
        status, raw, _ = get(url + f"/api/steer/{out['job']}?seen={out['version']}")
        out = json.loads(raw)
    return status, out


def expert_showing(atlas: Atlas, text: str) -> tuple[int, int]:
    """An expert whose top contexts show `text`."""
    for group in atlas.groups:
        for expert in range(atlas.num_experts):
            for ctx in atlas.top_contexts(group, expert):
                if text in "".join(ctx["pieces"]):
                    return group, expert
    raise AssertionError(f"no top context shows {text!r}")


def busiest(atlas: Atlas) -> tuple[int, int]:
    every = [(g, e) for g in atlas.groups for e in range(atlas.num_experts)]
    return max(every, key=lambda ge: atlas.expert(*ge)["count"])


def a_substring(atlas: Atlas) -> str:
    """Two letters of a vocabulary piece that some top context activates on."""
    for group in atlas.groups:
        for expert in range(atlas.num_experts):
            for ctx in atlas.top_contexts(group, expert):
                piece = atlas.piece(ctx["token"]).strip()
                if len(piece) >= 3 and piece.isascii() and piece.isalpha():
                    return piece[1:3]
    raise AssertionError("no alphabetic token in the top contexts")


def snap(page, name: str) -> None:
    """A full-page screenshot under $MONET_SCREENSHOT (a directory, or a file name whose stem prefixes them)."""
    where = os.environ.get("MONET_SCREENSHOT")
    if not where:
        return
    target = Path(where)
    path = target.with_name(f"{target.stem}-{name}.png") if target.suffix == ".png" else target / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


# ------------------------------------------------------------------------------------------------ JSON

@pytest.mark.slow
def test_routes_and_json(viewer):
    url, atlas = viewer["url"], viewer["atlas"]
    status, body, headers = get(url + "/")
    assert status == 200 and b"/static/app.js" in body and "script-src 'self'" in headers["Content-Security-Policy"]
    assert get(url + "/static/app.js")[0] == 200 and get(url + "/static/style.css")[0] == 200
    for bad in ("/etc/passwd", "/static/../server.py", "/static/%2e%2e/server.py", "/static/server.py",
                "/api/nothing", "/api/expert/0", "/../../pyproject.toml", "/api/export/0"):
        assert get(url + bad)[0] == 404, bad
    status, body, _ = get(url + "/api/expert/0/999999")
    assert status == 400 and "unknown expert" in json.loads(body)["error"]
    info = json.loads(get(url + "/api/info")[1])
    assert info["groups"] == [0, 1] and info["experts"] == 64 and info["has_model"] and info["has_values"]
    group, expert = busiest(atlas)
    data = json.loads(get(url + f"/api/expert/{group}/{expert}")[1])
    assert {"contexts", "bands", "label_share", "label_count", "histogram", "histogram_view", "count"} <= set(data)
    logits = json.loads(get(url + f"/api/logits/{group}/{expert}")[1])["logits"]   # the model's part, on its own
    assert len(logits["pos_str"]) == len(logits["pos_values"]) > 0
    assert logits["pos_values"][0] >= logits["neg_values"][0]
    assert "needs the model" in json.loads(get(viewer["bare"] + f"/api/logits/{group}/{expert}")[1])["error"]
    ctx = data["contexts"][0]
    assert len(ctx["values"]) == len(ctx["pieces"]) and ctx["values"][ctx["target"]] == pytest.approx(ctx["percent"])
    assert sum(data["label_count"].values()) == data["count"] == sum(band["count"] for band in data["bands"])
    view = data["histogram_view"]
    assert sum(view["counts"]) == data["count"] and len(view["counts"]) <= 16
    assert view["counts"][0] and view["counts"][-1]
    pick = json.loads(get(url + "/api/random")[1])
    assert 0 <= pick["expert"] < 64
    found = json.loads(get(url + "/api/token?q=%3C")[1])
    assert found["match"] == "exact" and isinstance(found["experts"], list)
    needle = a_substring(atlas)
    loose = json.loads(get(url + f"/api/token?q={needle.upper()}&match=substring")[1])   # case-insensitive
    assert loose["tokens"] >= 1 and loose["experts"]
    assert all(any(needle.lower() in p.lower() for p in r["pieces"]) for r in loose["experts"])
    assert "no vocabulary token contains" in json.loads(get(url + "/api/token?q=%E2%98%83&match=substring")[1])["error"]
    label = json.loads(get(url + "/api/label/javascript?min_count=3")[1])
    assert all(r["count"] >= 3 and r["label_count"] is not None for r in label["experts"]) and label["min_count"] == 3
    many = json.loads(get(url + "/api/label/javascript?min_count=1")[1])["experts"]
    assert len(many) >= len(label["experts"])
    doc = json.loads(get(url + f"/api/document/{ctx['doc']}/{ctx['pos']}?group={group}&expert={expert}")[1])
    assert doc["pieces"][doc["target"]] == ctx["pieces"][ctx["target"]]
    assert doc["values"][doc["target"]] == pytest.approx(ctx["percent"], abs=1e-3)


def test_export_link_is_the_cli_export(viewer, tmp_path):
    from monet.cli import main

    group, expert = busiest(viewer["atlas"])
    status, body, headers = get(viewer["bare"] + f"/api/export/{group}/{expert}")
    assert status == 200 and f"monet-expert-{group}-{expert}.json" in headers["Content-Disposition"]
    out = tmp_path / "e.json"
    argv = ["atlas", "export", str(viewer["work"] / "atlas"), "--expert", f"{group}:{expert}", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads(body) == json.loads(out.read_text())
    page = expert_page(viewer["atlas"], group, expert)
    act = page["activations"][0]
    assert act["values"][act["maxValueTokenIndex"]] == pytest.approx(act["maxValue"])
    assert sum(1 for v in act["values"] if v) >= 1 and page["monet"]["bands"][0]["activations"]


@pytest.mark.slow
def test_model_endpoints(viewer):
    url, atlas = viewer["url"], viewer["atlas"]
    group, expert = busiest(atlas)
    text = "int main(void) { return 0; }"
    status, out = post(url + "/api/activation", {"group": group, "expert": expert, "text": text})
    assert status == 200 and len(out["pieces"]) == len(out["values"]) > 3 and out["max"] == max(out["values"])
    # The same numbers as the atlas: run on a stored context's own prefix.
    ctx = atlas.top_contexts(group, expert, 1)[0]
    text = viewer["tokenizer"].decode(ctx["tokens"][:ctx["target"] + 1])
    status, out = post(url + "/api/activation", {"group": group, "expert": expert, "text": text})
    assert status == 200
    similar = similar_table(url, group, expert)
    rows = similar["experts"]
    assert rows and all(r["expert"] != expert for r in rows) and rows[0]["contexts"] <= similar["contexts"]
    assert [r["contexts"] for r in rows] == sorted((r["contexts"] for r in rows), reverse=True)
    assert any(isinstance(r["cosine"], float) and -1 <= r["cosine"] <= 1 for r in rows)
    # Steering on the context's own prefix (where the expert fires): scaled by 1000 the continuation changes;
    # it is the model's own greedy continuation with the edit, and the edit is undone afterwards.
    prompt = viewer["tokenizer"].decode(ctx["tokens"][:ctx["target"] + 1])
    status, out = steer(url, {"group": group, "expert": expert, "alpha": 1000, "prompt": prompt, "max_new_tokens": 8})
    assert status == 200 and out["status"] == "done" and out["decoding"] == "greedy"
    assert out["steered"] != out["unsteered"] and out["changed"] and out["changed_at"] >= 1
    assert out["last_token_active"] and 1 <= out["active_tokens"] <= out["prompt_tokens"]
    model, tokenizer = viewer["model"], viewer["tokenizer"]
    assert out["unsteered"] == printable(generate_text(model, tokenizer, prompt, greedy=True, max_new_tokens=8)[0])
    with edited(model, ExpertEdits().scale(group, expert, 1000)):
        assert out["steered"] == printable(generate_text(model, tokenizer, prompt, greedy=True, max_new_tokens=8)[0])
    again = steer(url, {"group": group, "expert": expert, "alpha": 1, "prompt": prompt, "max_new_tokens": 8})[1]
    assert again["steered"] == again["unsteered"] == out["unsteered"]   # alpha 1 changes nothing; edits undone
    assert again["changed_at"] is None and again["ladder"] is not None   # so the ladder looked for an α that does
    for body, status_code, message in (
            ({"group": group, "expert": expert, "text": ""}, 400, "give some text"),
            ({"group": group, "expert": expert, "text": "x" * 5000}, 400, "limit is 2,000"),
            ({"group": group, "expert": 10**6, "text": "x"}, 400, "unknown expert"),
            ({"group": "0", "expert": expert, "text": "x"}, 400, "group must be a non-negative integer"),
            ([1, 2], 400, "must be a JSON object")):
        status, out = post(url + "/api/activation", body)
        assert status == status_code and message in out["error"], (body, out)
    assert post(url + "/api/activation", b"{not json")[0] == 400
    assert post(url + "/api/activation", b"text=x", "application/x-www-form-urlencoded")[0] == 415
    assert post(url + "/api/activation", b"x" * 70000)[0] == 413
    assert post(url + "/api/steer", {"group": group, "expert": expert, "alpha": float("1e9"), "prompt": "a"})[0] == 400
    assert post(url + "/api/nothing", {})[0] == 404
    # Without the model: a clear message, not a failure.
    bare = viewer["bare"]
    status, out = post(bare + "/api/activation", {"group": group, "expert": expert, "text": "int"})
    assert status == 400 and "needs the model" in out["error"] and "--run" in out["error"]
    assert "needs the model" in json.loads(get(bare + f"/api/similar/{group}/{expert}")[1])["error"]


@pytest.mark.parametrize("bad", ["%C2%B2", "-1", "99999999999999999999", "1e3", "%20%201", "0x1", "%EF%BC%91", "1.0"])
def test_bad_ids_answer_400(viewer, bad):
    """"²".isdigit() is True in Python and int("９") works: ids must be plain ASCII digits, else 400."""
    url = viewer["bare"]
    for path in (f"/api/expert/{bad}/1", f"/api/expert/0/{bad}", f"/api/random?group={bad}", f"/api/export/0/{bad}",
                 f"/api/document/{bad}/0", f"/api/label/javascript?min_count={bad}"):
        status, body, _ = get(url + path)
        assert status == 400 and "must be a non-negative integer" in json.loads(body)["error"], path


def raw_request(url: str, host: str | None, method: str = "GET", path: str = "/api/info") -> int:
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = f"{method} {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "") + \
               "Connection: close\r\n\r\n"
        sock.sendall(head.encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def test_host_header_blocks_dns_rebinding(viewer):
    url = viewer["bare"]
    port = int(url.rsplit(":", 1)[1])
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        assert raw_request(url, host) == 200, host
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1", f"localhost.evil:{port}",
                 f"127.0.0.1.nip.io:{port}", "", None, f"[::1]:{port}:1"):
        assert raw_request(url, host) == 403, host
    assert raw_request(url, f"evil.example:{port}", path="/") == 403   # the page too, not only the API
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/info", headers={"Host": f"evil.example:{port}"})
    response = conn.getresponse()
    assert response.status == 403 and "DNS rebinding" in json.loads(response.read())["error"]
    for site, status in (("cross-site", 403), ("same-site", 403), ("same-origin", 200), ("none", 200)):
        assert get(url + "/api/info", {"Sec-Fetch-Site": site})[0] == status, site
    assert get(url + "/", {"Sec-Fetch-Site": "cross-site"})[0] == 200     # a link from elsewhere opens the page
    names, any_ip = allowed_hosts("0.0.0.0", 80, ["atlas.lab"])
    assert any_ip and host_allowed("192.168.1.20", names, any_ip, 80) and host_allowed("atlas.lab", names, any_ip, 80)
    assert not host_allowed("attacker.example", names, any_ip, 80)
    names, any_ip = allowed_hosts("127.0.0.1", 8765)
    assert not any_ip and not host_allowed("192.168.1.20:8765", names, any_ip, 8765)


def test_view_refuses_a_busy_port(viewer):
    from monet.errors import MonetError

    port = int(viewer["url"].rsplit(":", 1)[1])
    with pytest.raises(MonetError, match="another --port"):
        make_server(viewer["atlas"], "127.0.0.1", port)


def test_static_files_are_package_data():
    static = Path(__file__).parents[1] / "src" / "monet" / "interp" / "viewer" / "static"
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "style.css"}
    script = (static / "app.js").read_text()
    assert "innerHTML" not in script.replace("never innerHTML", "") and "insertAdjacentHTML" not in script
    assert "eval(" not in script and "document.write" not in script


def test_hostile_text_is_in_the_atlas(viewer):
    atlas = viewer["atlas"]
    pieces = "".join("".join(c["pieces"]) for c in atlas.top_contexts(*expert_showing(atlas, "<script")))
    assert "<script" in pieces and any("<script>" in h for h in HOSTILE)
    assert EVIL_LABEL in atlas.labels
    assert expert_showing(atlas, "\u202e") and expert_showing(atlas, "\x1b")


# --------------------------------------------------------------------------------------------- browser

@pytest.fixture(scope="module")
def browser(viewer):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        # A fresh profile directory (Playwright passes it as --user-data-dir).
        context = p.chromium.launch_persistent_context(str(viewer["work"] / "chromium-profile"),
                                                       executable_path=CHROMIUM, args=args, headless=True,
                                                       timeout=120_000, viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.set_default_timeout(60_000)   # generous: CI machines can be busy
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    yield page
    assert page.errors == [] and page.evaluate("typeof window.__pwned") == "undefined"
    page.close()


@pytest.mark.slow
@needs_chromium
def test_expert_page_in_headless_chromium(viewer, page):
    atlas = viewer["atlas"]
    group, expert = expert_showing(atlas, "<script")
    page.goto(f"{viewer['bare']}/#/expert/{group}/{expert}")
    page.wait_for_selector("#contexts tr")
    assert page.inner_text("#expert-title") == f"Group {group} / Expert {expert}"
    rows = page.locator("#contexts tr")
    assert rows.count() >= 1
    text = page.inner_text("#contexts")
    assert "<script" in text                         # shown as literal text ...
    assert page.locator("#contexts script, #contexts img").count() == 0   # ... and never run
    assert page.locator("#contexts .tok.hit").count() == rows.count()
    first = rows.first.locator("td.pct").inner_text()
    assert first.endswith("%") and float(first[:-1]) > 0
    assert page.locator("#labels .bar").count() == len(atlas.labels)
    snap(page, "expert-hostile")
    # Navigation by URL: another expert, then a token search.
    page.goto(f"{viewer['bare']}/#/expert/1/3")
    page.wait_for_selector("#expert-title:text-is('Group 1 / Expert 3')")   # (CSP forbids eval'd waits)
    assert page.input_value("#expert") == "3" and page.input_value("#group") == "1"
    page.click("#random")
    page.wait_for_url(lambda u: "#/expert/" in u and not u.endswith("#/expert/1/3"))
    page.goto(f"{viewer['bare']}/#/token/%3C")
    page.wait_for_selector("main h2:has-text('Experts of the token')")
    assert page.locator("ul.experts li a").count() >= 1
    page.goto(f"{viewer['bare']}/#/expert/0/999999")
    page.wait_for_selector("main .error")
    assert "unknown expert" in page.inner_text("main .error")


@pytest.mark.slow
@needs_chromium
def test_values_bands_labels_histogram_and_export_in_chromium(viewer, page):
    atlas = viewer["atlas"]
    group, expert = busiest(atlas)
    stats = atlas.expert(group, expert)
    page.goto(f"{viewer['bare']}/#/expert/{group}/{expert}")
    page.wait_for_selector("#contexts tr")
    # Per-token values: every token has a value as its title and the tokens where the expert fires are coloured.
    first = page.locator("#contexts tr").first
    ctx = atlas.top_contexts(group, expert, 1)[0]
    tokens = first.locator(".tok")
    assert tokens.count() == len(ctx["pieces"])
    titles = [tokens.nth(i).get_attribute("title") for i in range(tokens.count())]
    want = ["value not stored" if v is None else ("0%" if v == 0 else None) for v in ctx["values"]]
    assert all(w is None or t == w for t, w in zip(titles, want, strict=True))
    coloured = [tokens.nth(i).evaluate("n => getComputedStyle(n).backgroundColor") for i in range(tokens.count())]
    assert sum(c != "rgba(0, 0, 0, 0)" for c in coloured) == sum(1 for v in ctx["values"] if v)
    assert page.locator(".legend .scale").count() == 1
    # Examples by activation band, with their share of the expert's activations.
    bands = atlas.band_samples(group, expert)
    assert page.locator("#bands h4.band").count() == len(bands)
    assert sum(b["count"] for b in bands) == stats["count"]
    assert page.locator("#bands table tr").count() == sum(len(b["contexts"]) for b in bands)
    # Label bars with counts; a histogram whose bins come from the data (no empty bins at the ends).
    label_text = page.inner_text("#labels")
    for label, n in stats["label_count"].items():
        if n:
            assert f"{n:,} act." in label_text, label
    hist = page.locator("#histogram .val")
    values = [int(hist.nth(i).inner_text().replace(",", "")) for i in range(hist.count())]
    assert sum(values) == stats["count"] and values[0] > 0 and values[-1] > 0 and len(values) <= 16
    assert page.get_attribute("#export", "href") == f"/api/export/{group}/{expert}"
    assert page.locator("#needs-model").count() == 1           # no model: says how to get the model features
    snap(page, "expert-values-bands")
    # Document view around a context.
    first.locator("td.doc a").click()
    page.wait_for_selector("#document .hit")
    shown = printable(ctx["pieces"][ctx["target"]]).replace("\n", "\u21b5").replace("\t", "\u2192")
    assert page.locator("#document .hit").inner_text().replace("\n", "") == shown
    assert page.locator("#document .tok").count() > len(ctx["pieces"])
    snap(page, "document-bare")
    # Search: exact token and substring; specialists with a minimum count.
    needle = a_substring(atlas)
    page.fill("#token", needle)
    page.select_option("#match", "substring")
    page.click("#search button[type=submit]")
    page.wait_for_selector("main h2:has-text('tokens containing')")
    assert page.locator("ul.experts li").count() >= 1
    page.select_option("#label", "javascript")
    page.fill("#min-count", "3")
    page.click("#bylabel")
    page.wait_for_selector("main h2:has-text('most specific to')")
    assert page.url.endswith("#/label/javascript/3")
    counts = [int(t.split(" activations")[0].split("· ")[-1].replace(",", ""))
              for t in page.locator("ul.experts li").all_inner_texts()]
    assert counts and min(counts) >= 3
    snap(page, "specialists")


@pytest.mark.slow
@needs_chromium
def test_model_features_in_chromium(viewer, page):
    """Test activation on typed text, similar experts, steering side by side, a document coloured by values."""
    atlas = viewer["atlas"]
    group, expert = busiest(atlas)
    page.goto(f"{viewer['url']}/#/expert/{group}/{expert}")
    page.wait_for_selector("#similar-table tr td a")
    assert page.locator("#similar-table tr").count() >= 2
    page.fill("#probe-text", "int main(void) { return 0; } <script>window.__pwned = 3</script>")
    page.click("#probe-run")
    page.wait_for_selector("#probe-out .tok")
    assert page.locator("#probe-out .tok").count() > 5 and "<script>" in page.inner_text("#probe-out")
    assert all(t.endswith("%") for t in (page.locator("#probe-out .tok").nth(i).get_attribute("title")
                                         for i in range(page.locator("#probe-out .tok").count())))
    ctx = atlas.top_contexts(group, expert, 1)[0]
    prompt = viewer["tokenizer"].decode(ctx["tokens"][:ctx["target"] + 1])
    page.fill("#steer-prompt", prompt)
    page.fill("#steer-alpha", "1000")
    page.fill("#steer-tokens", "8")
    page.click("#steer-run")
    page.wait_for_selector("#steer-steered")
    plain, steered = page.inner_text("#steer-plain"), page.inner_text("#steer-steered")
    assert plain != steered and plain[:5] == steered[:5] == printable(prompt)[:5]
    snap(page, "expert-model")
    page.fill("#probe-text", "")
    page.click("#probe-run")
    page.wait_for_selector("#probe-out .error")
    page.goto(f"{viewer['url']}/#/doc/{ctx['doc']}/{ctx['pos']}/{group}/{expert}")
    page.wait_for_selector("#document .hit")
    hit = page.locator("#document .hit")
    assert float(hit.get_attribute("title")[:-1]) == pytest.approx(ctx["percent"], rel=1e-2)
    assert hit.evaluate("n => getComputedStyle(n).backgroundColor") != "rgba(0, 0, 0, 0)"
    snap(page, "document-model")


@needs_chromium
def test_control_and_bidi_characters_stay_visible_in_chromium(viewer, page):
    atlas = viewer["atlas"]
    group, expert = expert_showing(atlas, "\u202e")
    page.goto(f"{viewer['bare']}/#/expert/{group}/{expert}")
    page.wait_for_selector("#contexts tr")
    text = page.inner_text("#contexts")
    body = page.inner_text("body")
    assert "⟨U+202E⟩" in text and "\u202e" not in body and "\x1b" not in body
    assert ("\u241b" in text) == any("\x1b" in "".join(c["pieces"]) for c in atlas.top_contexts(group, expert))
    # The label named with U+202E: visible in the label list, the bars and the specialists page.
    options = page.locator("#label option").all_inner_texts()
    assert "⟨U+202E⟩evil" in options and "\u202eevil" not in options
    assert "⟨U+202E⟩evil" in page.inner_text("#labels")
    snap(page, "bidi-expert")
    page.select_option("#label", "⟨U+202E⟩evil")
    page.click("#bylabel")
    page.wait_for_selector("main h2:has-text('most specific to')")
    assert "⟨U+202E⟩evil" in page.inner_text("main h2") and page.locator("main .error").count() == 0
    # A hostile address cannot smuggle bidi characters into the page either.
    page.goto(f"{viewer['bare']}/#/token/%E2%80%AEevil")
    page.wait_for_selector("main h2, main .error")
    assert "\u202e" not in page.inner_text("body")
    group, expert = expert_showing(atlas, "\x1b")
    page.goto(f"{viewer['bare']}/#/expert/{group}/{expert}")
    page.wait_for_selector("#contexts tr")
    assert "\u241b" in page.inner_text("#contexts") and "\x1b" not in page.inner_text("body")


@needs_chromium
@pytest.mark.parametrize("fragment, message", [
    ("#/expert/%E0%A4%A", "malformed"), ("#/expert/%C2%B2/1", "not a valid group"), ("#/expert/0/-1", "not a valid"),
    ("#/nowhere", "There is no page"), ("#/expert/0", "There is no page"), ("#/doc/x/1", "not a valid document")])
def test_malformed_fragments_show_a_message(viewer, page, fragment, message):
    page.goto(f"{viewer['bare']}/{fragment}")
    page.wait_for_selector("main .error")
    assert message in page.inner_text("main .error")


@pytest.mark.slow
@needs_chromium
def test_a_slow_answer_never_replaces_a_newer_page(viewer, page, monkeypatch):
    """The cause of a flaky wait for 'Experts of the token': the expert page of an earlier navigation (the
    random button) arrived after the token page and replaced it. Pages now render only if still current."""
    original = ViewerState.expert

    def slow(self, group, expert):
        time.sleep(1.5)
        return original(self, group, expert)

    monkeypatch.setattr(ViewerState, "expert", slow)
    page.goto(f"{viewer['bare']}/#/expert/0/1")
    page.wait_for_timeout(200)                      # the slow expert request is in flight
    page.goto(f"{viewer['bare']}/#/token/%3C")
    page.wait_for_selector("main h2:has-text('Experts of the token')")
    page.wait_for_timeout(2500)                     # the expert answer has arrived by now ...
    assert page.locator("main h2:has-text('Experts of the token')").count() == 1   # ... and was not shown
    assert page.locator("#expert-title").count() == 0


# ---------------------------------------------------------------------------------------- issue 29

@pytest.mark.slow
def test_similar_experts_never_stall_the_viewer(viewer, monkeypatch):
    """Similar experts are slow on a large atlas (~36 s once, under the one lock). They are computed in the
    background in short locked steps: the request answers within SIMILAR_WAIT ("computing", then the table),
    and other pages answer between two steps. Here the job pauses after its first output direction."""
    from monet.interp.viewer import server

    gate = threading.Event()
    real = server.SimilarJobs._update

    def paused(self, entry, **values):
        real(self, entry, **values)
        if values.get("directions_done") == 1:
            gate.wait(60)

    monkeypatch.setattr(server.SimilarJobs, "_update", paused)
    url, atlas = viewer["url"], viewer["atlas"]
    group, expert = busiest(atlas)                          # co-active experts on its contexts: a table to fill
    state = viewer["servers"]["url"].state
    state.similar.entries.clear()
    try:
        started = time.monotonic()
        status, body, _ = get(url + f"/api/similar/{group}/{expert}")
        first = json.loads(body)
        assert status == 200 and first["status"] == "computing"
        assert time.monotonic() - started < server.SIMILAR_WAIT + 2
        assert get(url + f"/api/expert/{group}/{expert}")[0] == 200 and get(url + "/api/info")[0] == 200
        assert state.similar.entries[(group, expert)]["status"] == "computing"   # answered while it runs
    finally:
        gate.set()
    done = similar_table(url, group, expert)
    assert done["status"] == "done" and done["directions_done"] == done["directions"] > 0
    assert sum(isinstance(r["cosine"], float) for r in done["experts"]) == done["directions"]
    started = time.monotonic()
    assert json.loads(get(url + f"/api/similar/{group}/{expert}")[1]) == done     # cached
    assert time.monotonic() - started < 1


@pytest.mark.slow
def test_a_closed_connection_prints_no_traceback(viewer, capfd):
    """A tab closed mid-answer (here: a request whose reader hangs up at once) is not an error worth a traceback."""
    host, port = viewer["servers"]["url"].server_address[:2]
    for _ in range(20):
        with socket.create_connection((host, port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            sock.sendall(b"GET /api/expert/0/1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
    time.sleep(1.0)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err, err[-2000:]


def test_random_picks_label_specialists(viewer):
    """"Random interesting expert" shows an expert with a clear topic (skewness >= 2 towards some label), not one
    of the busiest, generic ones."""
    from monet.interp.query import skewness

    atlas = viewer["atlas"]
    state = viewer["servers"]["url"].state
    picks = state.interesting()
    assert picks
    for group, expert in picks:
        shares = atlas.label_probability(group)[:, expert]
        assert max(skewness(atlas.label_probability(group), i)[expert] for i in range(len(shares))) >= 2
        assert atlas.expert(group, expert)["count"] >= 10
    pick = json.loads(get(viewer["url"] + "/api/random")[1])
    assert (pick["group"], pick["expert"]) in picks


def test_experts_per_token_of_a_text(viewer):
    url = viewer["url"]
    text = "int main(void)\n{ return 0; }"
    status, body, _ = get(url + "/api/text?q=" + urllib.request.quote(text))
    out = json.loads(body)
    assert status == 200 and out["groups"] == [0, 1]
    pieces = [row["piece"] for row in out["tokens"]]
    assert "".join(pieces) == printable(text)
    for row in out["tokens"]:
        assert len(row["groups"]) == 2 and all(1 <= len(g) <= 3 for g in row["groups"])
        percents = [e["percent"] for e in row["groups"][0]]
        assert percents == sorted(percents, reverse=True) and 0 < percents[0] <= 100
    assert "give some text" in json.loads(get(url + "/api/text?q=")[1])["error"]
    assert "needs the model" in json.loads(get(viewer["bare"] + "/api/text?q=x")[1])["error"]


@pytest.mark.slow
@needs_chromium
def test_steering_reports_activity_and_offers_a_context_in_chromium(viewer, page):
    """On a prompt where the expert never fires the page says so (issue 29: α = 200 changed nothing, silently);
    "use a top context as the prompt" fills a multi-line prompt the expert fires on; α is suggested."""
    atlas = viewer["atlas"]
    group, expert = busiest(atlas)
    page.goto(f"{viewer['url']}/#/expert/{group}/{expert}")
    page.wait_for_selector("#steer-use-context")
    assert page.locator("textarea#steer-prompt").count() == 1
    alpha = float(page.input_value("#steer-alpha"))
    shares = sorted(c["percent"] for c in atlas.top_contexts(group, expert))
    median = shares[len(shares) // 2]
    assert alpha == max(2, round(100 / median))                  # a first guess, until "find α" checks one
    assert f"α starts at a first guess, {alpha:g}" in page.inner_text("main")
    # A prompt without the expert: find one where it is inactive on every token.
    tokenizer, model = viewer["tokenizer"], viewer["model"]
    from monet.interp.query import activation_on_text

    quiet = next(text for text in ("zzzz", "0000", "....", "qq qq", "\n\n", "aaaa", "    ")
                 if activation_on_text(model, tokenizer, text, group, expert)["max"] == 0)
    page.fill("#steer-prompt", quiet)
    page.fill("#steer-tokens", "4")
    page.click("#steer-run")
    page.wait_for_selector("#steer-activity")
    assert "active on 0 of the" in page.inner_text("#steer-activity")
    assert page.locator("#steer-activity.warning").count() == 1
    snap(page, "steer-inactive")
    page.click("#steer-use-context")
    ctx = atlas.top_contexts(group, expert, 1)[0]
    assert page.input_value("#steer-prompt") == printable("".join(ctx["pieces"][:ctx["target"] + 1]))
    prompt = page.input_value("#steer-prompt")
    page.fill("#steer-prompt", prompt + "\n")                # newlines survive (a textarea)
    assert page.input_value("#steer-prompt").endswith("\n")
    page.fill("#steer-prompt", prompt)
    page.fill("#steer-alpha", "1000")
    page.click("#steer-run")
    page.wait_for_selector("#steer-activity:not(.warning)")
    active = activation_on_text(model, tokenizer, prompt, group, expert)
    shown = page.inner_text("#steer-activity")
    assert f"active on {sum(v > 0 for v in active['values'])} of the {len(active['values'])} prompt tokens" in shown
    assert ("including the last one" in shown) == (active["values"][-1] > 0)
    # Promoted and suppressed tokens show their logit values.
    page.wait_for_selector(".tokens .logit .value")
    values = page.locator(".tokens .logit .value").all_inner_texts()
    assert values and all(v[0] in "+-" and float(v) == float(v) for v in values)
    snap(page, "steer-active")


@pytest.mark.slow
@needs_chromium
def test_experts_per_token_page_and_loading_state_in_chromium(viewer, page, monkeypatch):
    page.goto(f"{viewer['url']}/#/")
    page.click("#text-link")
    page.wait_for_selector("#text-input")
    page.fill("#text-input", "int main(void)\n{ return 0; }")
    page.click("#text-run")
    page.wait_for_selector("#text-table tr td a")
    rows = page.locator("#text-table tr")
    assert rows.count() - 1 == len(viewer["tokenizer"]("int main(void)\n{ return 0; }",
                                                     add_special_tokens=False)["input_ids"])
    href = page.locator("#text-table tr td a").first.get_attribute("href")
    assert href.startswith("#/expert/0/")
    snap(page, "text-experts")
    page.goto(f"{viewer['bare']}/#/text")
    page.wait_for_selector("#needs-model")
    # A slow page shows "loading…" until it arrives.
    original = ViewerState.expert

    def slow(self, group, expert):
        time.sleep(1.5)
        return original(self, group, expert)

    monkeypatch.setattr(ViewerState, "expert", slow)
    page.goto(f"{viewer['bare']}/#/expert/0/2")
    page.wait_for_selector("#loading")
    page.wait_for_selector("#expert-title")
    assert page.locator("#loading").count() == 0


def test_pages_go_before_background_steps():
    """The similar-experts thread takes the model's lock in many short steps. Releasing it after a step and asking
    again at once must not win over a page that is already waiting (with a plain Lock it does: the releasing
    thread still holds the GIL; a page's promoted tokens waited 7 s on the demo's atlas under load)."""
    from monet.interp.viewer.server import ModelLock

    lock, order = ModelLock(), []

    def page():
        with lock:
            order.append("page")

    with lock.background():
        order.append("step 1")
        waiting = threading.Thread(target=page)
        waiting.start()
        deadline = time.monotonic() + 10
        while lock._waiting == 0 and time.monotonic() < deadline:   # the page now waits for this step
            time.sleep(0.001)
    with lock.background():                                          # the next step, asked for at once
        order.append("step 2")
    waiting.join(10)
    assert order == ["step 1", "page", "step 2"]


@pytest.mark.slow
@needs_chromium
def test_expert_page_shows_before_the_model_answers_in_chromium(viewer, page, monkeypatch):
    """The atlas's part of an expert page shows at once; promoted tokens (a forward pass per top context: seconds
    on the demo's model under load) arrive after it, under their heading with a loading line meanwhile. A label
    the expert never fired on has an empty bar (it showed a 1-pixel sliver, as a tiny value does)."""
    atlas = viewer["atlas"]
    group, expert = next((g, e) for g in atlas.groups for e in range(atlas.num_experts)
                         if atlas.expert(g, e)["count"] and 0 in atlas.expert(g, e)["label_count"].values())
    original, gate = ViewerState.expert_logits, threading.Event()

    def held(self, group, expert):
        gate.wait(60)
        return original(self, group, expert)

    monkeypatch.setattr(ViewerState, "expert_logits", held)
    try:
        page.goto(f"{viewer['url']}/#/expert/{group}/{expert}")
        page.wait_for_selector("#expert-title")
        assert page.locator("#logits-computing.loading").count() == 1 and page.locator(".tokens .logit").count() == 0
        assert "Promoted and suppressed tokens" in page.inner_text("#logits")
        snap(page, "expert-before-logits")
    finally:
        gate.set()
    page.wait_for_selector(".tokens .logit .value")
    assert page.locator("#logits-computing").count() == 0
    zero = [label for label, n in atlas.expert(group, expert)["label_count"].items() if n == 0]
    rows = page.locator("#labels .name").all_inner_texts()
    bars = page.locator("#labels .bar")
    for label in zero:
        box = bars.nth(rows.index(printable(label))).bounding_box()
        assert box is not None and box["width"] == 0, label
    busy = bars.nth(0).bounding_box()
    assert busy is not None and busy["width"] > 10


def test_largest_is_a_stable_descending_sort():
    """`query._largest` (the label specialists' top n, computed before the viewer serves, without sorting a whole
    group: 16 full sorts of 262,144 took 2.3 s of its start-up) = a stable argsort, ties and infinities included."""
    from monet.interp.query import _largest

    rng = np.random.default_rng(0)
    for size, n in ((1000, 20), (50, 50), (50, 80), (7, 0)):
        values = rng.integers(0, 5, size).astype(np.float64)            # many ties
        values[rng.choice(size, min(size, 6), replace=False)] = np.inf
        values[rng.choice(size, min(size, 6), replace=False)] = -np.inf
        assert _largest(values, n).tolist() == np.argsort(-values, kind="stable")[:n].tolist()


@pytest.mark.slow
def test_a_left_page_pauses_its_similar_experts(viewer, monkeypatch):
    """A similar-experts job whose page stopped asking (the user went elsewhere) pauses before its next step, so
    it does not keep the model from the page the user is on; asked again, it goes on where it stopped."""
    from monet.interp.viewer import server

    url, atlas = viewer["url"], viewer["atlas"]
    state = viewer["servers"]["url"].state
    real = state.direction

    def slow(group, expert, k=10):
        time.sleep(0.3)
        return real.__wrapped__(group, expert, k)

    monkeypatch.setattr(state, "direction", slow)
    monkeypatch.setattr(server, "SIMILAR_IDLE", 0.5)
    group, expert = busiest(atlas)
    state.similar.entries.clear()
    get(url + f"/api/similar/{group}/{expert}")             # asked once, then never again
    deadline = time.monotonic() + 60
    while (group, expert) not in state.similar.paused and time.monotonic() < deadline:
        time.sleep(0.1)
    entry = state.similar.entries[(group, expert)]
    assert (group, expert) in state.similar.paused and entry["status"] == "computing"
    done = entry.get("directions_done", 0)
    time.sleep(1.5)
    assert entry.get("directions_done", 0) == done           # nothing computed while nobody asks
    monkeypatch.setattr(server, "SIMILAR_IDLE", 60.0)
    table = similar_table(url, group, expert)
    assert table["status"] == "done" and table["directions_done"] == table["directions"] > done
    assert all(isinstance(r["cosine"], float) for r in table["experts"][:table["directions"]])


@pytest.mark.slow
def test_steering_streams_its_text(viewer, monkeypatch):
    """Issue 29: steering answered after 8-9 s (two generations) with nothing on the page meanwhile. POST
    /api/steer now answers within `STEER_WAIT` with the text so far, /api/steer/JOB with each new token; every
    partial text is the final continuation cut after that many tokens."""
    from monet.generate import encode_prompt
    from monet.interp.viewer import steering

    url, atlas, model, tokenizer = viewer["url"], viewer["atlas"], viewer["model"], viewer["tokenizer"]
    group, expert = busiest(atlas)
    put = steering._Tokens.put

    def slow(self, value):   # 0.15 s a token: 2 x 10 tokens cannot be done within the first answer's 0.5 s
        put(self, value)
        if self.ids:
            time.sleep(0.15)

    monkeypatch.setattr(steering._Tokens, "put", slow)
    prompt = "int stream(void) {\n    return"
    body = {"group": group, "expert": expert, "alpha": 1000, "prompt": prompt, "max_new_tokens": 10}
    status, out = post(url + "/api/steer", body)
    assert status == 200 and out["status"] == "running" and isinstance(out["job"], int)
    reads = [out]
    while out["status"] == "running":
        status, raw, _ = get(url + f"/api/steer/{out['job']}?seen={out['version']}")
        assert status == 200
        out = json.loads(raw)
        assert out["version"] > reads[-1]["version"] or out["status"] != "running"
        reads.append(out)
    assert out["status"] == "done" and out["stage"] == "done"
    ids = encode_prompt(tokenizer, prompt)
    plain = steering.greedy_ids(model, tokenizer, ids, 10)
    with edited(model, ExpertEdits().scale(group, expert, 1000)):
        steered = steering.greedy_ids(model, tokenizer, ids, 10)

    def cut(new: list[int], n: int) -> str:
        return printable(tokenizer.decode(ids + new[:n], skip_special_tokens=True))

    partial = [r for r in reads if 0 < r["unsteered_tokens"] < len(plain) or 0 < r["steered_tokens"] < len(steered)]
    assert len(partial) >= 3, [(r["unsteered_tokens"], r["steered_tokens"]) for r in reads]
    for r in reads:
        assert r["unsteered"] is None or r["unsteered"] == cut(plain, r["unsteered_tokens"])
        assert r["steered"] is None or r["steered"] == cut(steered, r["steered_tokens"])
    assert [r["unsteered_tokens"] for r in reads] == sorted(r["unsteered_tokens"] for r in reads)
    assert out["unsteered"] == cut(plain, len(plain)) and out["steered"] == cut(steered, len(steered))
    assert out["changed_at"] == steering.first_difference(steered, plain)
    status, raw, _ = get(url + "/api/steer/999999")
    assert status == 400 and "no steering job" in json.loads(raw)["error"]


@pytest.mark.slow
def test_suggested_alpha_is_verified_to_steer(viewer):
    """Issue 29: the α suggested from the expert's median share left expert 0:12487's text unchanged on the demo's
    atlas. /api/alpha gives the smallest α of a short ladder whose greedy text differs on the prompt, and from which
    new token: checked here against the model's own steered generation at every α tried."""
    from monet.generate import encode_prompt
    from monet.interp.viewer import steering

    url, atlas, model, tokenizer = viewer["url"], viewer["atlas"], viewer["model"], viewer["tokenizer"]
    every = sorted(((g, e) for g in atlas.groups for e in range(atlas.num_experts) if atlas.expert(g, e)["count"]),
                   key=lambda ge: -atlas.expert(*ge)["count"])
    found = missed = 0
    for n, (group, expert) in enumerate(every[:2] + every[-1:]):
        ctx = atlas.top_contexts(group, expert, 1)[0]
        for prompt in (tokenizer.decode(ctx["tokens"][:ctx["target"] + 1]), "zz zz")[:2 if n == 0 else 1]:
            status, out = steer(url, {"group": group, "expert": expert, "prompt": prompt, "max_new_tokens": 6},
                                "/api/alpha")
            assert status == 200 and out["status"] == "done" and out["kind"] == "alpha", out
            ladder, ids = out["ladder"], encode_prompt(tokenizer, prompt)
            assert ladder["alphas"] == list(steering.LADDER)
            plain = steering.greedy_ids(model, tokenizer, ids, 6)
            tried = ladder["tried"]
            assert [a for a, _ in tried] == ladder["alphas"][:len(tried)]
            for alpha, at in tried:
                with edited(model, ExpertEdits().scale(group, expert, alpha)):
                    steered = steering.greedy_ids(model, tokenizer, ids, 6)
                assert steering.first_difference(steered, plain) == at, (group, expert, prompt, alpha)
            assert all(at is None for _, at in tried[:-1])
            if ladder["alpha"] is None:
                missed += 1
                assert len(tried) == len(ladder["alphas"]) and ladder["steered"] is None
            else:
                found += 1
                assert tried[-1] == [ladder["alpha"], ladder["changed_at"]]
                assert ladder["steered"] == printable(tokenizer.decode(ids + steered, skip_special_tokens=True))
    assert found >= 2   # the experts' own contexts can be steered


@pytest.mark.slow
def test_forced_difference_is_where_greedy_decoding_leaves_the_text(viewer):
    """The ladder's one forward pass per α (teacher forcing on the unsteered continuation) finds the first new token
    that greedy decoding with the edit changes (the oracle: generating with it)."""
    from monet.generate import encode_prompt
    from monet.interp.viewer import steering

    atlas, model, tokenizer = viewer["atlas"], viewer["model"], viewer["tokenizer"]
    group, expert = busiest(atlas)
    ctx = atlas.top_contexts(group, expert, 1)[0]
    seen = set()
    for prompt in (tokenizer.decode(ctx["tokens"][:ctx["target"] + 1]), "int main(void) {", "zz zz"):
        ids = encode_prompt(tokenizer, prompt)
        plain = steering.greedy_ids(model, tokenizer, ids, 8)
        for alpha in (0.0, 1.0, 3.0, 30.0, 1000.0):
            with edited(model, ExpertEdits().scale(group, expert, alpha)):
                steered = steering.greedy_ids(model, tokenizer, ids, 8)
            at = steering.forced_difference(model, ids, plain, group, expert, alpha)
            assert at == steering.first_difference(steered, plain), (prompt, alpha)
            seen.add(at is None)
    assert seen == {True, False}   # both outcomes occur
    assert steering.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert steering.first_difference([1, 2, 3], [1, 5, 3]) == 2 and steering.first_difference([1, 2], [1, 2, 3]) == 3


@pytest.mark.slow
@needs_chromium
def test_steering_streams_and_suggests_a_verified_alpha_in_chromium(viewer, page, monkeypatch):
    """The page shows the text as it is generated (a stage line with a spinner, the text so far); "use a top context"
    sets α to the smallest that changes the text on it and says from which token; an α that changes nothing is
    followed by the ladder's α with a button; and where no α up to the bound does, the page says why."""
    from monet.interp.viewer import steering

    url, atlas = viewer["url"], viewer["atlas"]
    group, expert = busiest(atlas)
    page.goto(f"{url}/#/expert/{group}/{expert}")
    page.wait_for_selector("#steer-use-context")
    page.fill("#steer-tokens", "8")
    page.click("#steer-use-context")
    page.wait_for_selector("#steer-suggestion #steer-ladder")
    prompt = page.input_value("#steer-prompt")
    body = {"group": group, "expert": expert, "prompt": prompt, "max_new_tokens": 8}
    ladder = steer(url, body, "/api/alpha")[1]["ladder"]
    assert ladder["alpha"] is not None
    assert float(page.input_value("#steer-alpha")) == ladder["alpha"]
    note = page.inner_text("#steer-suggestion #steer-ladder")
    assert f"At α = {ladder['alpha']:g} the text changes from new token {ladder['changed_at']}" in note
    snap(page, "steer-alpha-found")
    put = steering._Tokens.put

    def slow(self, value):
        put(self, value)
        if self.ids:
            time.sleep(0.3)

    monkeypatch.setattr(steering._Tokens, "put", slow)
    page.fill("#steer-prompt", "int slow(void) {")   # not cached: both texts are generated, slowly
    assert page.locator("#steer-suggestion #steer-ladder").count() == 0   # a found α holds for its prompt only
    page.click("#steer-run")
    page.wait_for_selector("#steer-stage.loading")
    page.locator("#steer-stage", has_text=re.compile("unsteered text… [1-7] of 8 new tokens")).wait_for()
    assert page.inner_text("#steer-plain").startswith("int slow(void) {") and page.inner_text("#steer-plain") != \
        "int slow(void) {"                                      # the first new tokens are there, the rest to come
    assert page.locator("#steer-steered").count() == 0          # the final column only once done
    snap(page, "steer-streaming")
    monkeypatch.setattr(steering._Tokens, "put", put)
    page.wait_for_selector("#steer-activity", timeout=120_000)
    # On the context's prompt α = 1 changes nothing; the ladder then offers the α found above, in one click.
    page.fill("#steer-prompt", prompt)
    page.fill("#steer-alpha", "1")
    page.click("#steer-run")
    page.wait_for_selector("#steer-out #steer-ladder")
    assert "equals the unsteered one at α = 1" in page.inner_text("#steer-activity")
    assert f"At α = {ladder['alpha']:g} the text changes" in page.inner_text("#steer-out #steer-ladder")
    page.click("#steer-use-alpha")
    page.locator("#steer-activity", has_text="differs from new token").wait_for()
    assert float(page.input_value("#steer-alpha")) == ladder["alpha"]
    assert page.inner_text("#steer-plain") != page.inner_text("#steer-steered")
    assert f"differs from new token {ladder['changed_at']}" in page.inner_text("#steer-activity")
    snap(page, "steer-after-ladder")
    monkeypatch.setattr(steering, "forced_difference", lambda *args: None)   # no α of the ladder changes it
    page.fill("#steer-prompt", "zz zz zz")
    page.click("#steer-find")
    page.wait_for_selector("#steer-suggestion #steer-ladder.warning")
    assert "No α up to 1000 changes the first 8 new tokens" in page.inner_text("#steer-suggestion")
    snap(page, "steer-no-alpha")


def test_coactivation_step_computes_no_direction(viewer, monkeypatch):
    """The similar-experts job's first step asks for the co-activation table only (`directions=0`) and compares the
    viewer's cached directions itself; that step computed the expert's own direction too (K more forward passes,
    a third of its time on the demo's atlas), which a page waiting for the model's lock paid for."""
    from monet.interp import export

    atlas, model = viewer["atlas"], viewer["model"]
    group, expert = busiest(atlas)
    full = export.similar_experts(model, atlas, group, expert, directions=2)
    monkeypatch.setattr(export, "expert_direction", lambda *args, **kwargs: pytest.fail("a direction was computed"))
    table = export.similar_experts(model, atlas, group, expert, directions=0)
    assert [r["expert"] for r in table["experts"]] == [r["expert"] for r in full["experts"]]
    assert all(r["cosine"] is None for r in table["experts"]) and full["experts"][0]["cosine"] is not None


@pytest.mark.slow
@needs_chromium
def test_a_dense_atlas_page_names_layers_and_neurons_and_offers_only_what_works(viewer, page):
    """A dense baseline's atlas in the viewer, with its model: the page says layer / neuron, tests activation,
    and offers neither similar units (no routing to compare: /api/similar answers 400) nor steering (no term
    to scale), so it shows no error; /api/info says what the page may offer."""
    work = viewer["work"]
    run = save_run(work / "dense-run", tiny_config(mlp_type="dense"), work / "hostile-data", seed=0)
    model, tokenizer = load_checkpoint(run)
    build_atlas(model, tokenizer, build_settings(run, work / "hostile-data", work / "dense-atlas",
                                                 AtlasOptions(max_tokens=None, top_k=3, seq_len=32, batch_size=8)))
    server = make_server(Atlas(work / "dense-atlas", model), "127.0.0.1", 0, model, tokenizer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host, port = server.server_address[:2]
        url = f"http://{host}:{port}"
        info = json.loads(get(url + "/api/info")[1])
        assert (info["group_word"], info["unit_word"], info["coactive"], info["steerable"]) == \
            ("layer", "neuron", False, False)
        assert get(url + "/api/similar/0/0")[0] == 400
        monet_info = json.loads(get(viewer["url"] + "/api/info")[1])
        assert (monet_info["group_word"], monet_info["unit_word"], monet_info["coactive"]) == ("group", "expert", True)
        busy = busiest(Atlas(work / "dense-atlas"))
        page.goto(f"{url}/#/expert/{busy[0]}/{busy[1]}")
        page.wait_for_selector(f"#expert-title:text-is('Layer {busy[0]} / Neuron {busy[1]}')")
        assert "layers ×" in page.inner_text("#summary") and "neurons" in page.inner_text("#summary")
        assert page.get_attribute("#probe-text", "placeholder") == "Type text to see this neuron's value on each token"
        assert page.locator("#similar").count() == 0 and page.locator("text=Steering").count() == 0
        # No "expert" or "routing" where the atlas has neurons: the header, the stats, the export's file name.
        header = page.inner_text("header")
        assert "random interesting neuron" in header and "neurons per token" in header and "expert" not in header
        assert "routing" not in page.inner_text("main .stats")
        assert "routing" not in page.locator("main .legend").first.inner_text()
        assert page.get_attribute("#export", "download") == f"monet-neuron-{busy[0]}-{busy[1]}.json"
        assert f"monet-neuron-{busy[0]}-{busy[1]}.json" in \
            get(f"{url}/api/export/{busy[0]}/{busy[1]}")[2]["Content-Disposition"]
        page.fill("#probe-text", "int main")
        page.click("#probe-run")
        page.wait_for_selector("#probe-out :not(.hint)")
        assert page.locator("main .error").count() == 0
        snap(page, "dense-neuron")
    finally:
        server.shutdown()
        server.server_close()
