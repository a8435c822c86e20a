"""The viewer's HTTP server: JSON endpoints over an `Atlas` plus one static page, nothing else.

Routes and safety rules are described in docs/atlas.md ("Viewer"): only the page, its two static files and the
`/api/` routes of `API_ARGS` are served (no path is ever mapped to a file); a foreign Host header or a cross-site
API request gets 403 (DNS rebinding); POST bodies must be application/json (a cross-site form cannot send that
without a CORS preflight, never answered here) of at most 64 KB; bad input answers 400 with a message; JSON
answers pass through `monet.io.printable` under a Content-Security-Policy; the model runs under one lock.
Long work never holds that lock for long: every group's expert statistics and the "interesting" picks are
read before serving, similar experts are computed by a background thread in short locked steps, and a request
for them waits at most `SIMILAR_WAIT` seconds (the page polls while they are computing); steering is a job of
short locked steps too, whose text the page reads as it grows (`steering.py`); an expert's output direction
(promoted tokens, similar experts) and an unsteered continuation are computed once and cached.
A client that closes its connection early is not an error worth a traceback.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import math
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import lru_cache, partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from monet.checkpoint import load_checkpoint
from monet.errors import MonetError
from monet.interp.explain import expert_direction, expert_logits
from monet.interp.export import expert_page, similar_experts
from monet.interp.query import Atlas, activation_on_text, compact_histogram, document_values, experts_for_text
from monet.interp.units import kind_of
from monet.interp.viewer.steering import SteerJobs
from monet.io import dumps, printable
from monet.runtime import resolve_device
from monet.settings import ViewCommand

STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "index.html": "text/html; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}
LIMITS = {"text_chars": 2000, "text_tokens": 512, "prompt_chars": 1000, "max_new_tokens": 64, "alpha": 1000.0,
          "body_bytes": 65536, "body_depth": 8}
# GET /api/ROUTE/ARG...: the names of each route's path arguments (ids, except a label's name)
API_ARGS = {"info": (), "random": (), "token": (), "expert": ("group", "expert"), "similar": ("group", "expert"),
            "logits": ("group", "expert"), "export": ("group", "expert"), "label": ("label",),
            "document": ("document", "position"), "text": (), "image": ("image",), "steer": ("job",)}
SIMILAR_WAIT = 1.0       # seconds a /api/similar request waits for the background thread before "computing"
SIMILAR_DIRECTIONS = 12  # co-active experts whose output direction is compared (one short locked step each)
SIMILAR_IDLE = 5.0       # seconds without a request after which a similar-experts job pauses (its page was left)
_ID = re.compile(r"[0-9]{1,9}")          # ASCII digits only: "²".isdigit() is True in Python
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("", "0.0.0.0", "::")


class NotFound(Exception):
    """A path outside the viewer's routes."""


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ModelLock:
    """The model's lock, requests first: `with lock:` (a page) waits for the current holder only, while
    `with lock.background():` (a similar-experts step) also waits until no page is waiting. With a plain Lock
    the background thread, still running when it releases, takes it straight back for its next step, so a page
    could wait for the whole job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._waiting = 0

    def __enter__(self) -> ModelLock:
        with self._changed:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._changed:
                self._waiting -= 1
                self._changed.notify_all()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    @contextmanager
    def background(self) -> Iterator[None]:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting == 0)
            if self._lock.acquire(timeout=0.05):
                if self._waiting == 0:    # a page that came in meanwhile goes first
                    break
                self._lock.release()
        try:
            yield
        finally:
            self._lock.release()


class SimilarJobs:
    """Similar experts, computed on demand by one background thread and cached (the newest request first).

    Each job is a few short steps, each under the viewer's lock: the co-activation table (the expert's top
    contexts through the model), then one output direction per step, so a page waits at most one step for the
    lock. A job nobody has asked about for `SIMILAR_IDLE` seconds (the page polls while it is open) is paused
    before its next step, so a page the user has left does not keep the model busy; asked again, it goes on
    where it stopped. An entry is {"status": "computing" | "done" | "error", ...the table so far}."""

    def __init__(self, state: ViewerState, cache: int = 64) -> None:
        self.state, self.cache = state, cache
        self.entries: dict[tuple[int, int], dict[str, Any]] = {}
        self.asked: dict[tuple[int, int], float] = {}    # when each job's page last asked (time.monotonic)
        self.paused: set[tuple[int, int]] = set()
        self.queue: list[tuple[int, int]] = []
        self.changed = threading.Condition()
        self.worker: threading.Thread | None = None

    def get(self, group: int, expert: int, wait: float = SIMILAR_WAIT) -> dict[str, Any]:
        key = (group, expert)
        with self.changed:
            self.asked[key] = time.monotonic()
            entry = self.entries.get(key)
            if entry is None or entry["status"] == "error" or key in self.paused:
                if entry is None or entry["status"] == "error":
                    entry = self.entries[key] = {"status": "computing", "group": group, "expert": expert}
                self.paused.discard(key)
                self.queue.append(key)
                while len(self.entries) > self.cache:   # forget the oldest finished entry
                    old = next((k for k, e in self.entries.items() if e["status"] in ("done", "error")), None)
                    if old is None:
                        break
                    del self.entries[old]
                    self.asked.pop(old, None)
                if self.worker is None or not self.worker.is_alive():
                    self.worker = threading.Thread(target=self._work, name="monet-view-similar", daemon=True)
                    self.worker.start()
            self.changed.wait_for(lambda: entry["status"] in ("done", "error"), timeout=wait)
            return dict(entry, experts=[dict(row) for row in entry.get("experts", [])])

    def _work(self) -> None:
        while True:
            with self.changed:
                if not self.queue:
                    self.worker = None
                    return
                key = self.queue.pop()          # the newest request: the page the user is looking at
                entry = self.entries.get(key)
            if entry is not None and entry["status"] == "computing" and key not in self.paused:
                self._compute(key, entry)

    def _update(self, entry: dict[str, Any], **values: Any) -> None:
        with self.changed:
            entry.update(values)
            self.changed.notify_all()

    def _left(self, key: tuple[int, int]) -> bool:
        """Pause the job when its page has not asked for `SIMILAR_IDLE` s (True: stop before the next step)."""
        with self.changed:
            if time.monotonic() - self.asked.get(key, 0.0) > SIMILAR_IDLE:
                self.paused.add(key)
            return key in self.paused

    def _compute(self, key: tuple[int, int], entry: dict[str, Any]) -> None:
        state, (group, expert) = self.state, key
        k = int(state.atlas.manifest["options"]["top_k"])
        try:
            if "experts" not in entry:
                with state.lock.background():
                    table = similar_experts(state.model, state.atlas, group, expert, directions=0)
                todo = len(table["experts"][:SIMILAR_DIRECTIONS])
                self._update(entry, status="computing" if todo else "done", contexts=table["contexts"],
                             experts=table["experts"], directions_done=0, directions=todo)
            rows = entry["experts"][:entry["directions"]]
            for done in range(entry["directions_done"], len(rows)):
                if self._left(key):
                    return
                with state.lock.background():
                    mine = state.direction(group, expert, k)          # computed once, then cached
                    theirs = state.direction(group, rows[done]["expert"], k)
                norm = float(mine.norm() * theirs.norm())
                rows[done]["cosine"] = float(mine @ theirs) / norm if norm > 0 else None
                self._update(entry, directions_done=done + 1, status="done" if done + 1 == len(rows) else "computing")
        except Exception as exc:   # shown on the page; asked again, the job is retried
            self._update(entry, status="error", error=str(exc) if isinstance(exc, MonetError)
                         else f"{type(exc).__name__}: {exc}")


class ViewerState:
    """What the handlers share: the atlas, the optional model and tokenizer, caches, one lock.

    Built before the server listens: every group's expert statistics are read into memory (`Atlas.preload`,
    seconds) and the "interesting" picks computed from them, so no page ever waits for either."""

    def __init__(self, atlas, model: Any = None, tokenizer: Any = None) -> None:
        self.atlas, self.model, self.tokenizer = atlas, model, tokenizer
        self.lock = ModelLock()   # the model is used by one request at a time (tables have their own)
        # One measured output direction per expert (K forward passes), shared by promoted tokens and similar
        # experts; 256 directions of a 2,048-wide model are 2 MB.
        self.direction = lru_cache(256)(partial(expert_direction, model, atlas))
        self._logits = lru_cache(256)(self.logits)   # promoted tokens: one matrix product on the direction
        self.similar = SimilarJobs(self)
        self.steering = SteerJobs(self, LIMITS["alpha"])   # streamed, in short locked steps
        atlas.preload()
        self._interesting = self._specialists()

    def need_model(self, what: str) -> None:
        if self.model is None or self.tokenizer is None:
            raise MonetError(f"{what} needs the model: start the viewer with `monet view ATLAS --run RUN` "
                             "(the run the atlas was built from)")

    def info(self) -> dict[str, Any]:
        atlas, m = self.atlas, self.atlas.manifest
        units = kind_of(m["kind"])     # what the page calls a group and a unit, and which panels it offers
        return {"group_word": units.group_word, "unit_word": units.unit_word, "score_word": units.score_word,
                "coactive": units.coactive, "steerable": units.steerable,
                "groups": atlas.groups, "experts": atlas.num_experts, "labels": atlas.labels,
                "tokens": m["tokens"], "kind": m["kind"], "model": m["model"], "top_k": m["options"]["top_k"],
                "experts_per_side": m.get("experts_per_side"), "has_model": self.model is not None,
                "format_version": atlas.version, "has_values": atlas.has_values,
                "samples": (m.get("bands") or {}).get("samples", 0), "limits": LIMITS,
                "has_images": atlas.has_images}

    def expert(self, group: int, expert: int) -> dict[str, Any]:
        """The atlas's page of an expert: reads only (the statistics are in memory, each table reads one row
        group under its own lock), so it never waits for the model; promoted tokens come from /api/logits."""
        atlas = self.atlas
        result = {**atlas.expert(group, expert), "contexts": atlas.top_contexts(group, expert),
                  "bands": atlas.band_samples(group, expert)}
        if atlas.has_images:   # a VisionMonet atlas: top images, each with its best patch
            result["images"] = atlas.image_examples(group, expert)
        result["histogram_view"] = compact_histogram(**result["histogram"])
        halves = kind_of(atlas.manifest["kind"]).halves(atlas.manifest, expert)
        if halves is not None:
            result["i"], result["j"] = halves
        return result

    def expert_logits(self, group: int, expert: int) -> dict[str, Any]:
        """Promoted and suppressed tokens ({"logits": None} for an expert without contexts), under the model's
        lock: a page waits for at most one step of a similar-experts job."""
        self.need_model("Promoted tokens")
        self.atlas.check_expert(group, expert)
        if not self.atlas.expert(group, expert, histogram=False)["count"]:
            return {"group": group, "expert": expert, "logits": None}
        with self.lock:
            return {"group": group, "expert": expert, "logits": self._logits(group, expert)}

    def image(self, image: int) -> bytes:
        """A stored image of a VisionMonet atlas, PNG (a read of the atlas: no model lock)."""
        return self.atlas.image_png(image)

    def export(self, group: int, expert: int) -> dict[str, Any]:
        with self.lock:
            return expert_page(self.atlas, group, expert, self.model)

    def similar_experts(self, group: int, expert: int) -> dict[str, Any]:
        """The table when it is ready within `SIMILAR_WAIT` s, else {"status": "computing", ...what is ready}."""
        self.need_model("finding similar experts")
        self.atlas.check_expert(group, expert)
        entry = self.similar.get(group, expert)
        if entry["status"] == "error":
            raise MonetError(entry["error"])
        return entry

    def logits(self, group: int, expert: int) -> dict[str, list]:
        """Promoted and suppressed tokens (as `monet atlas export --run` lists them: over the top 10 contexts),
        from the cached output direction (similar experts use the same one when the atlas keeps 10)."""
        return expert_logits(self.model, self.atlas, group, expert, k=10, direction=self.direction(group, expert, 10))

    def _specialists(self) -> list[tuple[int, int]]:
        """Label specialists: per label and group, the most skewed experts (paper §5.1) among those with a full
        set of top contexts, so that a random pick shows an expert with a clear topic, not a busy generic one."""
        least = max(10, int(self.atlas.manifest["options"]["top_k"]))
        picks = set()
        for label in self.atlas.labels:
            for group in self.atlas.groups:
                rows = self.atlas.experts_for_label(label, 20, min_count=least, group=group)
                picks |= {(row["group"], row["expert"]) for row in rows if row["skewness"] >= 2}
        if not picks:   # a tiny atlas: fall back to the experts with the most examples
            picks = set(self.atlas.interesting_experts())
        return sorted(picks)

    def interesting(self) -> list[tuple[int, int]]:
        """The experts "random interesting expert" picks from (see `_specialists`)."""
        return self._interesting

    def random_expert(self, group: int | None) -> dict[str, int]:
        if group is not None and group not in self.atlas.groups:
            raise MonetError(f"group {group} does not exist; this atlas has groups 0..{len(self.atlas.groups) - 1}")
        pool = [pick for pick in self.interesting() if group is None or pick[0] == group]
        if not pool:
            raise MonetError("this atlas has no expert with examples")
        group, expert = random.choice(pool)
        return {"group": group, "expert": expert}

    def text_experts(self, text: str) -> dict[str, Any]:
        """Each token of `text` with the top experts of every group (as `monet atlas query --text`)."""
        self.need_model("Listing the experts of each token")
        if not text.strip():
            raise MonetError("give some text to run through the model")
        if len(text) > LIMITS["text_chars"]:
            raise MonetError(f"the text has {len(text):,} characters; the limit is {LIMITS['text_chars']:,}")
        with self.lock:
            rows = experts_for_text(self.model, self.tokenizer, text, n=3)
        if rows and rows[0]["token"] == self.tokenizer.bos_token_id:   # the model sees it; the page shows the text
            rows = rows[1:]
        if len(rows) > LIMITS["text_tokens"]:
            raise MonetError(f"the text has {len(rows)} tokens; the limit is {LIMITS['text_tokens']}")
        return {"groups": self.atlas.groups, "tokens": [
            {"piece": row["piece"], "groups": [[{"expert": e, "percent": p} for e, p in experts]
                                              for experts in row["groups"]]} for row in rows]}

    def token(self, text: str, match: str) -> dict[str, Any]:
        if not text:
            raise MonetError("give a token to search for")
        if len(text) > 200:
            raise MonetError("a search is at most 200 characters")
        if match not in ("exact", "substring"):
            raise MonetError(f"match must be exact or substring, got {match!r}")
        if match == "substring":   # atlas reads only: no need for the model's lock
            return {"match": "substring", **self.atlas.experts_for_substring(text, 50)}
        rows = self.atlas.experts_for_token(text, 50)
        return {"match": "exact", "tokens": len({r["token"] for r in rows}), "experts": rows}

    def label(self, name: str, min_count: int) -> dict[str, Any]:
        atlas, min_count = self.atlas, max(min_count, 1)
        # The page knows the labels as `printable` shows them.
        label = next((known for known in atlas.labels if printable(known) == name), name)
        rows = atlas.experts_for_label(label, 50, min_count=min_count)   # in-memory statistics: no lock
        for row in rows:
            stats = atlas.expert(row["group"], row["expert"], histogram=False)
            row["label_share"] = stats["label_share"][label]
            row["label_count"] = (stats["label_count"] or {}).get(label)
            row["max_percent"] = stats["max_percent"]
        return {"label": label, "min_count": min_count, "experts": rows}

    def document(self, doc: int, pos: int, group: int | None, expert: int | None) -> dict[str, Any]:
        with self.lock:
            view = self.atlas.document(doc, pos)
            view["values"] = None
            if group is not None and expert is not None:
                view["group"], view["expert"] = group, expert
                view["max_percent"] = self.atlas.expert(group, expert, histogram=False)["max_percent"]
                if self.model is not None:
                    view["values"] = document_values(self.model, self.atlas, view, group, expert)
        return view

    def _posted_expert(self, body: dict[str, Any], what: str) -> tuple[int, int]:
        self.need_model(what)
        group, expert = _field_id(body, "group"), _field_id(body, "expert")
        self.atlas.check_expert(group, expert)
        return group, expert

    def activation(self, body: dict[str, Any]) -> dict[str, Any]:
        group, expert = self._posted_expert(body, "Testing an expert on your text")
        text = _field_text(body, "text", LIMITS["text_chars"])
        with self.lock:
            out = activation_on_text(self.model, self.tokenizer, text, group, expert, LIMITS["text_tokens"])
            out["max_percent"] = self.atlas.expert(group, expert, histogram=False)["max_percent"]
        return out

    def steer(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start a steering job (see `monet.interp.viewer.steering`): the answer comes within `STEER_WAIT` s with
        the text so far; the page reads the rest from /api/steer/JOB."""
        group, expert, prompt, tokens = self._steering_request(body, "Steering")
        alpha = body.get("alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
                or abs(alpha) > LIMITS["alpha"]:
            raise MonetError(f"alpha must be a number between -{LIMITS['alpha']:g} and {LIMITS['alpha']:g}, "
                             f"got {alpha!r}")
        return self.steering.start("steer", group, expert, prompt, tokens, float(alpha))

    def find_alpha(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start a search for the smallest α of the ladder that changes the greedy text on the prompt."""
        group, expert, prompt, tokens = self._steering_request(body, "Finding an α that steers")
        return self.steering.start("alpha", group, expert, prompt, tokens, None)

    def steer_job(self, job: int, seen: int | None) -> dict[str, Any]:
        """A steering job as it stands (once it has changed since version `seen`, or within `STEER_WAIT` s)."""
        self.need_model("Steering")
        return self.steering.read(job, seen)

    def _steering_request(self, body: dict[str, Any], what: str) -> tuple[int, int, str, int]:
        group, expert = self._posted_expert(body, what)
        prompt = _field_text(body, "prompt", LIMITS["prompt_chars"])
        tokens = body.get("max_new_tokens", 24)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= LIMITS["max_new_tokens"]:
            raise MonetError(f"max_new_tokens must be an integer from 1 to {LIMITS['max_new_tokens']}, got {tokens!r}")
        if not kind_of(self.atlas.manifest["kind"]).steerable:
            raise MonetError("steering scales Monet experts; this atlas is of a dense model")
        return group, expert, prompt, tokens


def _field_id(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MonetError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _field_text(body: dict[str, Any], name: str, limit: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise MonetError(f"give some {name} (a non-empty string)")
    if len(value) > limit:
        raise MonetError(f"the {name} has {len(value):,} characters; the limit is {limit:,}")
    return value


def allowed_hosts(host: str, port: int, extra: tuple[str, ...] | list[str] = ()) -> tuple[set[str], bool]:
    """(host names the Host header may carry, whether any IP literal is fine) for a server bound to host:port.

    Names: 127.0.0.1, localhost, ::1, the bound host and `extra`. A server bound to all interfaces also
    answers to this machine's host name and to any IP address (DNS rebinding needs a host *name* that the
    attacker controls; an IP literal cannot be rebound)."""
    names = {name.lower().rstrip(".") for name in (*LOCAL_NAMES, host, *extra) if name}
    if host in WILDCARDS:
        names.add(socket.gethostname().lower())
    return names, host in WILDCARDS


def host_allowed(header: str | None, names: set[str], any_ip: bool, port: int) -> bool:
    """Whether a Host header names this server (one of `names`, or an IP literal when `any_ip`) at `port`."""
    match = re.fullmatch(r"\[([0-9a-f:.]+)\](?::(\d{1,5}))?|([^:\[\]]+)(?::(\d{1,5}))?", (header or "").strip().lower())
    if not match or int(match.group(2) or match.group(4) or 80) != port:
        return False
    name = (match.group(1) or match.group(3)).rstrip(".")
    if name in names or not any_ip:
        return name in names
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Handler(BaseHTTPRequestHandler):
    server_version = "monet-view"
    timeout = 120   # seconds a connection may stay silent (a client that never sends its body is dropped)

    def log_message(self, format: str, *args) -> None:   # quiet: one line per error only
        if len(args) > 1 and str(args[1]).startswith(("4", "5")):
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, extra: dict[str, str] | None = None, download: bool = False) -> None:
        # Shown on the page: control and bidi characters as visible symbols. A download is the same data as
        # `monet atlas export` writes (those characters as \u escapes, so the file is still safe to print).
        body = dumps(data if download else printable(data), indent=2 if download else None).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", extra)

    def _check_origin(self, parts: list[str]) -> None:
        """Refuse a foreign Host, and any request but the page itself from another site. `parts` is the
        DECODED path (what routing sees), so `/%61pi/...` is an API call too."""
        port = self.server.server_address[1]
        if not host_allowed(self.headers.get("Host"), self.server.allowed_names, self.server.any_ip, port):
            raise _HTTPError(HTTPStatus.FORBIDDEN, f"Host {self.headers.get('Host')!r} is not this viewer's address; "
                             f"open http://127.0.0.1:{port}/ (or start the viewer with --allow-host NAME). Other "
                             "host names are refused to block DNS rebinding.")
        if parts[:1] == ["static"] or (not parts and self.command in ("GET", "HEAD")):
            return   # another site may link to the page, never call the API (it could make the server run the model)
        # Browsers say where a request comes from: Sec-Fetch-Site (recent ones), Origin (on POST and cross-origin
        # fetches). Either pointing elsewhere refuses the call.
        site = self.headers.get("Sec-Fetch-Site", "same-origin").strip().lower()
        origin = self.headers.get("Origin")
        foreign_origin = origin is not None and not host_allowed(
            urlsplit(origin.strip()).netloc if origin.strip().lower().startswith(("http://", "https://")) else "",
            self.server.allowed_names, self.server.any_ip, port)
        if site not in ("same-origin", "none") or foreign_origin:
            raise _HTTPError(HTTPStatus.FORBIDDEN, "the viewer's API answers only its own page")

    def do_GET(self) -> None:
        self._answer(self._get)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route: Callable[[list[str], dict[str, list[str]]], None]) -> None:
        try:
            if not self.path.startswith("/") or self.path.startswith("//"):   # absolute-form or scheme-relative
                raise _HTTPError(HTTPStatus.BAD_REQUEST, "the request target must be a path starting with one /")
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            self._check_origin(parts)
            return route(parts, parse_qs(url.query))
        except NotFound:
            return self._json({"error": f"no such page: {urlsplit(self.path).path}"}, HTTPStatus.NOT_FOUND)
        except MonetError as exc:
            return self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except _HTTPError as exc:
            return self._json({"error": str(exc)}, exc.status)
        except ConnectionError:   # the client went away: nothing to answer (ViewerServer stays quiet)
            raise
        except Exception as exc:  # an unexpected failure answers 500 with its message, the server lives on
            return self._json({"error": f"{type(exc).__name__}: {exc}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _get(self, parts: list[str], query: dict[str, list[str]]) -> None:
        if not parts:
            parts = ["static", "index.html"]
        if parts[0] == "static" and len(parts) == 2 and parts[1] in STATIC:
            page = resources.files("monet.interp.viewer").joinpath("static", parts[1]).read_bytes()
            return self._send(200, page, STATIC[parts[1]])
        names = API_ARGS.get(parts[1]) if parts[0] == "api" and len(parts) > 1 else None
        if names is None or len(parts) != 2 + len(names):
            raise NotFound
        args = [text if name == "label" else _integer(text, name) for name, text in zip(names, parts[2:], strict=True)]
        route, state = parts[1], self.server.state
        if route == "image":
            return self._send(200, state.image(*args), "image/png")
        if route == "export":
            name = f"monet-{kind_of(state.atlas.manifest['kind']).unit_word}-{args[0]}-{args[1]}.json"
            return self._json(state.export(*args), download=True,
                              extra={"Content-Disposition": f'attachment; filename="{name}"'})
        answers = {"info": state.info, "expert": state.expert, "similar": state.similar_experts,
                   "logits": state.expert_logits,
                   "random": lambda: state.random_expert(_query_id(query, "group")),
                   "text": lambda: state.text_experts(query.get("q", [""])[0]),
                   "token": lambda: state.token(query.get("q", [""])[0], query.get("match", ["exact"])[0]),
                   "label": lambda label: state.label(label, _query_id(query, "min_count", 10)),
                   "document": lambda doc, pos: state.document(doc, pos, _query_id(query, "group"),
                                                               _query_id(query, "expert")),
                   "steer": lambda job: state.steer_job(job, _query_id(query, "seen"))}
        return self._json(answers[route](*args))

    def _post(self, parts: list[str], query: dict[str, list[str]]) -> None:
        routes = {"activation": self.server.state.activation, "steer": self.server.state.steer,
                  "alpha": self.server.state.find_alpha}
        if len(parts) != 2 or parts[0] != "api" or parts[1] not in routes:
            raise NotFound
        if self.headers.get_content_type() != "application/json":
            raise _HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the request body as application/json")
        length = self.headers.get("Content-Length", "")
        if not length.isascii() or not length.isdigit():
            raise _HTTPError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if int(length) > LIMITS["body_bytes"]:
            raise _HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"the request body is larger than {LIMITS['body_bytes']:,} bytes")
        try:
            body = json.loads(self.rfile.read(int(length)).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise MonetError(f"the request body is not JSON ({exc})") from None
        except RecursionError:
            body = None
        if body is None or _depth(body) > LIMITS["body_depth"]:
            raise MonetError(f"the request body nests more than {LIMITS['body_depth']} levels deep")
        if not isinstance(body, dict):
            raise MonetError("the request body must be a JSON object")
        return self._json(routes[parts[1]](body))


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _integer(text: str, what: str) -> int:
    if not _ID.fullmatch(text):
        raise MonetError(f"{what} must be a non-negative integer of at most 9 digits, got {text[:40]!r}")
    return int(text)


def _query_id(query: dict[str, list[str]], name: str, default: int | None = None) -> int | None:
    return _integer(query[name][0], name) if name in query else default


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser tab closed mid-answer (broken pipe, reset) is normal; anything else is reported."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def make_server(atlas, host: str = "127.0.0.1", port: int = 8765, model: Any = None, tokenizer: Any = None,
                allow_hosts: tuple[str, ...] | list[str] = ()) -> ThreadingHTTPServer:
    """A ready server (not yet serving); port 0 picks a free port (see `server.server_address`). The port is
    bound first, so a busy one is reported before the atlas's statistics are read."""
    try:
        server = ViewerServer((host, port), Handler)
    except OSError as exc:
        fix = "choose another --port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else \
            "choose another --host: an address or name of this machine (127.0.0.1 by default, 0.0.0.0 for all)"
        raise MonetError(f"cannot listen on {host}:{port} ({exc.strerror}); {fix}") from exc
    except OverflowError as exc:
        raise MonetError(f"--port must lie in 0..65535, got {port}") from exc
    server.daemon_threads = True
    try:
        server.state = ViewerState(atlas, model, tokenizer)   # what the handlers share
    except BaseException:
        server.server_close()
        raise
    server.allowed_names, server.any_ip = allowed_hosts(host, server.server_address[1], allow_hosts)
    return server


def view_command(cmd: ViewCommand) -> None:
    """`monet view`: open and verify the atlas (and load its model, with --run), then serve until interrupted."""
    atlas = Atlas(cmd.atlas)
    model = tokenizer = None
    if cmd.run:
        model, tokenizer = load_checkpoint(cmd.run, resolve_device(cmd.device))
        atlas.check_model(model)
    print(f"monet view: reading the expert statistics of {len(atlas.groups)} group(s)...", flush=True)
    server = make_server(atlas, cmd.host, cmd.port, model, tokenizer, cmd.allow_host)
    address, bound = server.server_address[:2]
    shown = f"[{address}]" if ":" in address else address
    print(f"monet view: serving {atlas.path} at http://{shown}:{bound}/  (Ctrl-C to stop)")
    if cmd.host not in LOCAL_NAMES:
        print("monet view: warning: listening beyond this machine; the atlas's corpus text is visible to others")
    with server, suppress(KeyboardInterrupt):   # closes the socket on the way out
        server.serve_forever()


__all__ = ["Handler", "ModelLock", "SimilarJobs", "ViewerServer", "ViewerState", "allowed_hosts", "host_allowed",
           "make_server", "view_command"]
