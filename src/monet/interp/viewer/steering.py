"""The viewer's steering: greedy continuations with an expert's term scaled by α, streamed, and the smallest α
of a short ladder that is verified to change the text on the user's prompt (see docs/atlas.md, "Viewer").

A steering request becomes a job run by one worker thread, in short steps under the model's lock (the unsteered
continuation and the prompt's activity; the steered continuation; one ladder rung), so a page's model request
waits for one step at most. The job's text grows token by token and the page asks for it until it is done
(`/api/steer/JOB`): the first words show within a fraction of a second, never a silent wait.

Why a ladder is needed: steering scales the expert's term, whose weight is its routing g¹_hi g²_hj (paper
Eq. 8), so it acts only where the router picks the expert, and whether a given α changes the greedy text depends
on the prompt (issue 29: the suggestion from the expert's median share left expert 0:12487's text unchanged).
A rung is checked with one teacher-forced forward pass of prompt + unsteered continuation under the edit: greedy
decoding keeps the unsteered text exactly as long as the edited model's argmax agrees with it, so the first
disagreement is where the steered text starts to differ. The rung found is then confirmed by a real steered
generation (the page shows that text), since a cached decoding step and a full forward pass may round
differently on a near tie.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from monet.edits import ExpertEdits, edited
from monet.errors import MonetError
from monet.generate import encode_prompt, generate_tokens
from monet.interp.query import activation_on_text

LADDER = (2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)   # α tried, smallest first (1-2-5 steps)
STEER_WAIT = 0.5     # seconds a steering request waits for news before answering with the text so far
STEER_JOBS = 32      # finished jobs kept for their pages to read
STEER_PENDING = 8    # jobs waiting for the worker; more are refused


class _Tokens:
    """A `generate` streamer that keeps the new token ids (the first `put` is the prompt) and reports each."""

    def __init__(self, report: Any) -> None:
        self.ids: list[int] = []
        self.report, self._prompt_seen = report, False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self.report(self.ids)

    def end(self) -> None:
        pass


def greedy_ids(model: Any, tokenizer: Any, prompt_ids: list[int], tokens: int, report: Any = None) -> list[int]:
    """The greedy continuation's new token ids (at most `tokens`; it ends at `</s>`), with the model as it is
    (edits applied stay applied); `report(ids_so_far)` after each new token."""
    device = next(model.parameters()).device
    streamer = _Tokens(report or (lambda ids: None))
    new = generate_tokens(model, tokenizer, input_ids=torch.tensor([prompt_ids], device=device),
                          max_new_tokens=tokens, greedy=True, streamer=streamer)[0].tolist()
    eos = tokenizer.eos_token_id
    return new[:new.index(eos) + 1] if eos in new else new


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The 1-based position of the first new token where two continuations differ (None: the same)."""
    for n, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return n + 1
    return None if len(a) == len(b) else min(len(a), len(b)) + 1


@torch.no_grad()
def forced_difference(model: Any, prompt_ids: list[int], continuation: list[int], group: int, expert: int,
                      alpha: float) -> int | None:
    """Where greedy decoding with expert (group, expert) scaled by `alpha` first leaves `continuation` (the
    unedited greedy continuation of `prompt_ids`): 1-based, None if it never does. One forward pass of prompt +
    continuation under the edit; the argmax after each position is what greedy decoding would pick there."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + continuation[:-1]], device=device)
    with edited(model, ExpertEdits().scale(group, expert, float(alpha))):
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1:]
    return first_difference(logits.argmax(-1).tolist(), continuation)


class SteerJobs:
    """Steering and α-ladder jobs, run one at a time by a worker thread; each job is a dict its page reads.

    A job: {"job": id, "status": "running" | "done" | "error", "stage": what runs now, the request's fields,
    "unsteered"/"steered": the texts so far, "unsteered_tokens"/"steered_tokens": their new tokens so far,
    the prompt's activity once known, "changed_at": the first new token that differs, "ladder": the search for
    the smallest α that changes the text (None unless run)}."""

    def __init__(self, state: Any, alpha_limit: float) -> None:
        self.state, self.alpha_limit = state, alpha_limit
        self.jobs: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.pending: list[int] = []
        self.changed = threading.Condition()
        self.worker: threading.Thread | None = None
        self._next = 1
        self._plain: OrderedDict[tuple[str, int], list[int]] = OrderedDict()   # prompt, length -> unsteered ids

    def start(self, kind: str, group: int, expert: int, prompt: str, tokens: int, alpha: float | None) -> dict:
        """A new job (kind "steer": unsteered and steered text, and the ladder when α changes nothing; "alpha":
        the ladder only); answers once it is done or has its first new token, or after `STEER_WAIT` s."""
        with self.changed:
            if len(self.pending) >= STEER_PENDING:
                raise MonetError(f"{len(self.pending)} steering requests are already waiting; try again when "
                                 "they have finished")
            job_id, self._next = self._next, self._next + 1
            self.jobs[job_id] = {
                "job": job_id, "kind": kind, "status": "running", "stage": "queued", "version": 0, "group": group,
                "expert": expert, "alpha": alpha, "prompt": prompt, "max_new_tokens": tokens, "decoding": "greedy",
                "unsteered": None, "steered": None, "unsteered_tokens": 0, "steered_tokens": 0,
                "prompt_tokens": None, "active_tokens": None, "active_max_percent": None,
                "last_token_active": None, "changed": None, "changed_at": None, "ladder": None}
            while len(self.jobs) > STEER_JOBS:   # forget the oldest finished job
                old = next((k for k, j in self.jobs.items() if j["status"] != "running"), None)
                if old is None:
                    break
                del self.jobs[old]
            self.pending.append(job_id)
            if self.worker is None or not self.worker.is_alive():
                self.worker = threading.Thread(target=self._work, name="monet-view-steer", daemon=True)
                self.worker.start()
        return self.read(job_id, first_token=True)

    def read(self, job_id: int, seen: int | None = None, wait: float = STEER_WAIT,
             first_token: bool = False) -> dict[str, Any]:
        """The job as it stands: at once when it is finished, else once its version exceeds `seen` (default: the
        version now; with `first_token`, once it has a new token to show) or after `wait` s, whichever is first."""
        with self.changed:
            job = self.jobs.get(job_id)
            if job is None:
                raise MonetError(f"no steering job {job_id} (finished jobs are kept for the last {STEER_JOBS})")
            seen = job["version"] if seen is None else seen
            news = (lambda: job["unsteered_tokens"] > 0) if first_token else (lambda: job["version"] > seen)
            self.changed.wait_for(lambda: job["status"] != "running" or news(), timeout=wait)
            return {key: value for key, value in job.items()} | {"ladder": _copy(job["ladder"])}

    def _update(self, job: dict[str, Any], **values: Any) -> None:
        with self.changed:
            job.update(values, version=job["version"] + 1)
            self.changed.notify_all()

    def _work(self) -> None:
        while True:
            with self.changed:
                if not self.pending:
                    self.worker = None
                    return
                job = self.jobs.get(self.pending.pop(0))
            if job is None:
                continue
            try:
                self._run(job)
            except Exception as exc:   # shown on the page
                message = str(exc) if isinstance(exc, MonetError) else f"{type(exc).__name__}: {exc}"
                self._update(job, status="error", stage="done", error=message)

    def _run(self, job: dict[str, Any]) -> None:
        state, group, expert = self.state, job["group"], job["expert"]
        model, tokenizer = state.model, state.tokenizer
        prompt_ids = encode_prompt(tokenizer, job["prompt"])

        def text(ids: list[int]) -> str:
            return tokenizer.decode(prompt_ids + ids, skip_special_tokens=True)

        self._update(job, stage="unsteered", unsteered=text([]))
        key = (job["prompt"], job["max_new_tokens"])
        plain = self._plain.get(key)
        if plain is not None:   # shown at once
            self._update(job, unsteered=text(plain), unsteered_tokens=len(plain))
        with state.lock:
            if plain is None:   # greedy and unedited: the same for every α and expert, so computed once
                plain = greedy_ids(model, tokenizer, prompt_ids, job["max_new_tokens"],
                                   report=lambda ids: self._update(job, unsteered=text(ids), unsteered_tokens=len(ids)))
                self._plain[key] = plain
                while len(self._plain) > 64:
                    self._plain.popitem(last=False)
            # Steering scales the expert's term where it is routed: on a prompt where it never fires, the
            # first new tokens cannot change, so the page says how active it was.
            values = activation_on_text(model, tokenizer, job["prompt"], group, expert, 10**6)["values"]
        active = [value for value in values if value > 0]
        self._update(job, unsteered=text(plain), unsteered_tokens=len(plain), prompt_tokens=len(values),
                     active_tokens=len(active), active_max_percent=max(active, default=0.0),
                     last_token_active=bool(values) and values[-1] > 0)
        if job["kind"] == "steer":
            self._update(job, stage="steered", steered=text([]))
            with state.lock, edited(model, ExpertEdits().scale(group, expert, float(job["alpha"]))):
                steered = greedy_ids(model, tokenizer, prompt_ids, job["max_new_tokens"],
                                     report=lambda ids: self._update(job, steered=text(ids), steered_tokens=len(ids)))
            at = first_difference(steered, plain)
            self._update(job, steered=text(steered), steered_tokens=len(steered), changed_at=at,
                         changed=text(steered) != text(plain))
            if at is not None:
                self._update(job, status="done", stage="done")
                return
        self._ladder(job, prompt_ids, plain, text)
        self._update(job, status="done", stage="done")

    def _ladder(self, job: dict[str, Any], prompt_ids: list[int], plain: list[int], text: Any) -> None:
        """The smallest α of `LADDER` (up to the viewer's limit) whose steered greedy text differs, confirmed by
        generating it: {"alphas", "tried": [[α, first differing token or None]...], "alpha", "changed_at",
        "steered"} (alpha None: no α up to the bound changes the first `max_new_tokens` tokens)."""
        state, group, expert, model = self.state, job["group"], job["expert"], self.state.model
        alphas = [a for a in LADDER if a <= self.alpha_limit]
        ladder: dict[str, Any] = {"alphas": alphas, "tried": [], "alpha": None, "changed_at": None, "steered": None}
        self._update(job, stage="ladder", ladder=ladder)
        for alpha in alphas:
            with state.lock:
                at = forced_difference(model, prompt_ids, plain, group, expert, alpha)
                if at is not None:   # confirm with the real generation (cached decoding may round differently)
                    with edited(model, ExpertEdits().scale(group, expert, alpha)):
                        steered = greedy_ids(model, state.tokenizer, prompt_ids, job["max_new_tokens"])
                    at = first_difference(steered, plain)
            with self.changed:
                ladder["tried"].append([alpha, at])
            if at is not None:
                self._update(job, ladder=dict(ladder, alpha=alpha, changed_at=at, steered=text(steered)))
                return
            self._update(job, ladder=ladder)


def _copy(ladder: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if ladder is None else dict(ladder, tried=[list(row) for row in ladder["tried"]])


__all__ = ["LADDER", "STEER_WAIT", "SteerJobs", "first_difference", "forced_difference", "greedy_ids"]

