"""Viewer latency: the seconds each endpoint the viewer's pages call takes to answer, on a real atlas.

    OMP_NUM_THREADS=1 PYTHONPATH=<checkout>/src python benchmarks/viewer_latency.py ATLAS --run RUN [--json OUT]

Starts `monet view` in-process on a free port (the atlas opened and verified, the run loaded, as the command
does), then walks the pages as a user would: the random button, an expert page while its similar experts are
computing (the page polls /api/similar every 0.7 s, as app.js does), a second expert page in the meantime,
token search (exact and substring), a label's specialists, a document view, text -> experts, test activation
and steering, read as the page reads it (POST /api/steer, then /api/steer/JOB until done), at α = 20 and 1000
on a top context (the α ladder runs when α changes nothing), and "find α" (POST /api/alpha). An older checkout,
whose /api/expert includes the promoted tokens and whose steering answers in one request, is measured as its
page calls it. Prints one line per request (seconds, status), the slowest answer per endpoint, and per steering
job the seconds until its first new token and until it is done; the bar is 2 s for any answer (issue 29). Run
it alternately with two checkouts on PYTHONPATH to compare them; the machine's load average is printed with the
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import urllib.request
from typing import Any

from monet.checkpoint import load_checkpoint
from monet.interp.query import Atlas
from monet.interp.viewer.server import make_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("atlas")
    parser.add_argument("--run", required=True)
    parser.add_argument("--json", help="write the timings here")
    args = parser.parse_args()

    started = time.perf_counter()
    atlas = Atlas(args.atlas)
    model, tokenizer = load_checkpoint(args.run, "cpu")
    atlas.check_model(model)
    server = make_server(atlas, "127.0.0.1", 0, model, tokenizer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    startup = time.perf_counter() - started
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows: list[dict[str, Any]] = []

    def call(name: str, path: str, body: dict | None = None) -> Any:
        request = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                status, data = response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            status, data = exc.code, json.loads(exc.read())
        seconds = time.perf_counter() - t
        rows.append({"endpoint": name, "path": path, "seconds": round(seconds, 3), "status": status})
        print(f"{seconds:7.2f} s  {status}  {name:10s} {path}", flush=True)
        return data

    print(f"start-up (open + verify atlas, load run, server): {startup:.1f} s", flush=True)
    call("info", "/api/info")
    picks = [call("random", "/api/random") for _ in range(3)]
    first, second = (picks[0]["group"], picks[0]["expert"]), (picks[1]["group"], picks[1]["expert"])
    page = call("expert", f"/api/expert/{first[0]}/{first[1]}")
    logits = f"/api/logits/{first[0]}/{first[1]}"
    if "logits" not in page:          # this checkout serves promoted tokens on their own endpoint, as app.js asks
        call("logits", logits)
    polls = 0
    while call("similar", f"/api/similar/{first[0]}/{first[1]}")["status"] != "done" and polls < 200:
        polls += 1
        if polls == 1:   # the user opens another expert while the first one's similar experts are computing
            if "logits" not in call("expert", f"/api/expert/{second[0]}/{second[1]}"):
                call("logits", f"/api/logits/{second[0]}/{second[1]}")
        time.sleep(0.7)
    call("expert", f"/api/expert/{picks[2]['group']}/{picks[2]['expert']}")
    call("token", "/api/token?q=%20def&match=exact")
    call("token", "/api/token?q=def&match=substring")
    call("token", "/api/token?q=e&match=substring")
    call("label", f"/api/label/{atlas.labels[0]}?min_count=10")
    ctx = page["contexts"][0] if page["contexts"] else None
    if ctx is not None:
        call("document", f"/api/document/{ctx['doc']}/{ctx['pos']}?group={first[0]}&expert={first[1]}")
        prompt = "".join(ctx["pieces"][:ctx["target"] + 1])
    else:
        prompt = "def main():\n    return"
    call("text", "/api/text?q=" + urllib.request.quote("for i in range(10):\n    print(i)"))
    call("activation", "/api/activation", {"group": first[0], "expert": first[1], "text": prompt})
    jobs = []
    for name, path, alpha in (("steer", "/api/steer", 20.0), ("steer", "/api/steer", 1000.0),
                              ("alpha", "/api/alpha", None)):
        body = {"group": first[0], "expert": first[1], "prompt": prompt, "max_new_tokens": 24}
        if alpha is not None:
            body["alpha"] = alpha
        t = time.perf_counter()
        out = call(name, path, body)
        first_token = None if "job" in out else time.perf_counter() - t   # one answer: nothing shown until it
        while "job" in out:              # this checkout streams: read the job until it is done, as app.js does
            if first_token is None and (out.get("unsteered_tokens") or out.get("steered_tokens") or
                                        out["status"] != "running"):
                first_token = time.perf_counter() - t
            if out["status"] != "running":
                break
            out = call(name + "-job", f"/api/steer/{out['job']}?seen={out['version']}")
        job = {"request": name, "alpha": alpha, "first_token_seconds": None if first_token is None
               else round(first_token, 3), "done_seconds": round(time.perf_counter() - t, 3),
               "changed_at": out.get("changed_at"), "prompt_tokens": out.get("prompt_tokens"),
               "active_tokens": out.get("active_tokens"), "ladder": out.get("ladder") and
               {k: v for k, v in out["ladder"].items() if k != "steered"}}
        jobs.append(job)
        print(f"  {name} α={alpha}: first new token after {job['first_token_seconds']} s, done after "
              f"{job['done_seconds']} s; the expert active on {job['active_tokens']} of {job['prompt_tokens']} "
              f"prompt tokens; changed at α {job['changed_at']}", flush=True)
    server.shutdown()
    worst: dict[str, float] = {}
    for row in rows:
        worst[row["endpoint"]] = max(worst.get(row["endpoint"], 0.0), row["seconds"])
    load = os.getloadavg()
    print("slowest per endpoint: " + ", ".join(f"{k} {v:.2f} s" for k, v in worst.items()))
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"startup_seconds": round(startup, 2), "requests": rows, "slowest": worst, "steering": jobs,
                       "loadavg": load, "cpus": os.cpu_count()}, f, indent=2)


if __name__ == "__main__":
    main()
