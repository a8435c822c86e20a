"""The viewer's HTTP server: JSON endpoints over an `Atlas` plus one static page, nothing else.

Routes (GET only; anything else is 404, so no file outside the viewer's own three is ever served):

    /                          the page (static/index.html); expert URLs are /#/expert/G/ID
    /static/app.js, style.css  its script and style
    /api/info                  atlas summary: groups, experts per group, labels, tokens, model
    /api/expert/G/ID           statistics, top contexts (pieces, activating index, percentage), label shares,
                               histogram, promoted/suppressed tokens when a model was given
    /api/random[?group=G]      a random expert among those with the most examples
    /api/token?q=TEXT          experts whose top contexts activate on that token
    /api/label/NAME            experts most specific to a label (skewness)

The page builds its DOM with textContent only and the responses carry a Content-Security-Policy that
forbids inline scripts, so corpus text such as `<script>` stays text.
"""

from __future__ import annotations

import random
import threading
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from monet.checkpoint import load_checkpoint
from monet.errors import MonetError
from monet.interp.explain import expert_logits
from monet.interp.query import Atlas
from monet.io import dumps, printable
from monet.settings import ViewCommand

STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "index.html": "text/html; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class NotFound(Exception):
    """A path outside the viewer's routes."""


class ViewerState:
    """What the handlers share: the atlas, the optional model, a cache of promoted tokens."""

    def __init__(self, atlas, model: Any = None) -> None:
        self.atlas, self.model = atlas, model
        self.lock = threading.Lock()
        self.logits: dict[tuple[int, int], dict] = {}
        self.interesting = atlas.interesting_experts()

    def expert(self, group: int, expert: int) -> dict[str, Any]:
        atlas = self.atlas
        with self.lock:   # pyarrow reads and the model are used by one request at a time
            result = {**atlas.expert(group, expert), "contexts": atlas.top_contexts(group, expert)}
            if self.model is not None:
                key = (group, expert)
                if key not in self.logits and result["contexts"]:
                    self.logits[key] = expert_logits(self.model, atlas, group, expert)
                result["logits"] = self.logits.get(key)
        return result


def _static(name: str) -> bytes:
    return resources.files("monet.interp.viewer").joinpath("static", name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    server_version = "monet-view"

    def __init__(self, *args, state: ViewerState, **kwargs) -> None:
        self.state = state
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args) -> None:   # quiet: one line per error only
        if args and str(args[1] if len(args) > 1 else "").startswith(("4", "5")):
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        body = dumps(printable(data), indent=None).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        try:
            if not parts:
                return self._send(200, _static("index.html"), STATIC["index.html"])
            if parts[0] == "static" and len(parts) == 2 and parts[1] in STATIC:
                return self._send(200, _static(parts[1]), STATIC[parts[1]])
            if parts[0] == "api" and len(parts) >= 2:
                return self._json(self._api(parts[1:], query))
        except NotFound:
            pass
        except MonetError as exc:
            return self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except Exception as exc:  # an unexpected failure answers 500 with its message, the server lives on
            return self._json({"error": f"{type(exc).__name__}: {exc}"}, HTTPStatus.INTERNAL_SERVER_ERROR)
        self._json({"error": f"no such page: {url.path}"}, HTTPStatus.NOT_FOUND)

    def _api(self, parts: list[str], query: dict[str, list[str]]) -> Any:
        state, atlas = self.state, self.state.atlas
        route = parts[0]
        if route == "info" and len(parts) == 1:
            m = atlas.manifest
            return {"groups": atlas.groups, "experts": atlas.num_experts, "labels": atlas.labels,
                    "tokens": m["tokens"], "kind": m["kind"], "model": m["model"], "top_k": m["options"]["top_k"],
                    "experts_per_side": m.get("experts_per_side"), "has_model": state.model is not None}
        if route == "expert" and len(parts) == 3:
            return state.expert(_integer(parts[1], "group"), _integer(parts[2], "expert"))
        if route == "random" and len(parts) == 1:
            pool = state.interesting
            if "group" in query:
                group = _integer(query["group"][0], "group")
                pool = [e for e in pool if e[0] == group]
            if not pool:
                raise MonetError("this atlas has no expert with examples")
            group, expert = random.choice(pool)
            return {"group": group, "expert": expert}
        if route == "token" and len(parts) == 1:
            text = (query.get("q") or [""])[0]
            if not text:
                raise MonetError("give a token to search for")
            return atlas.experts_for_token(text, 30)
        if route == "label" and len(parts) == 2:
            return atlas.experts_for_label(parts[1], 30)
        raise NotFound


def _integer(text: str, what: str) -> int:
    if not text.isdigit():
        raise MonetError(f"{what} must be a non-negative integer, got {text!r}")
    return int(text)


def make_server(atlas, host: str = "127.0.0.1", port: int = 8765, model: Any = None) -> ThreadingHTTPServer:
    """A ready server (not yet serving); port 0 picks a free port (see `server.server_address`)."""
    try:
        server = ThreadingHTTPServer((host, port), partial(Handler, state=ViewerState(atlas, model)))
    except OSError as exc:
        raise MonetError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from exc
    server.daemon_threads = True
    return server


def serve(atlas, host: str = "127.0.0.1", port: int = 8765, model: Any = None) -> None:
    """Serve until interrupted."""
    server = make_server(atlas, host, port, model)
    address, bound = server.server_address[:2]
    print(f"monet view: serving {atlas.path} at http://{address}:{bound}/  (Ctrl-C to stop)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("monet view: warning: listening beyond this machine; the atlas's corpus text is visible to others")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["Handler", "ViewerState", "make_server", "serve", "view_command"]


def view_command(cmd: ViewCommand) -> None:
    """`monet view`: open the atlas (and its model, with --run) and serve until interrupted."""
    atlas = Atlas(cmd.atlas)
    model = None
    if cmd.run:
        model, _ = load_checkpoint(cmd.run)
        atlas.check_model(model)
    serve(atlas, host=cmd.host, port=cmd.port, model=model)
