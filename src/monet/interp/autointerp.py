"""Automated interpretability: how well does an explanation of an expert predict where it fires? (`monet autointerp`)

The protocol follows EleutherAI's delphi (Paulo et al. 2024, "Automatically Interpreting Millions of Features
in Large Language Models") and SAEBench's autointerp, with the atlas in place of their activation caches. It
reads units through `monet.interp.units`, so a dense baseline's atlas (MLP neurons, a group per layer) goes
through the same sampling, explanations and judges as a Monet atlas (experts, a group per routing group):

* **Experts**: per group, `--experts` units with at least `--min-count` activations, stratified by density
  (equal numbers from each of `--strata` log-density quantile bins), seeded.
* **Explanations** come from the expert's *top* contexts only: (a) ``self`` -- the paper's self-explanation
  (§4.3) by a local chat model sharing the atlas's tokenizer (`monet.interp.explain.explain_expert`);
  (b) ``external`` -- any OpenAI-compatible chat endpoint the user names, shown the top contexts with the
  activating token marked; (c) ``top_tokens`` -- the most frequent activating tokens (no model); (d)
  ``random`` -- the control: another sampled expert's top-tokens explanation (a derangement within the group).
* **Held-out examples** (delphi's sampling): activating contexts are the atlas's per-band random samples
  (10 log-spaced activation bands, the atlas's quantile bins), drawn round-robin over bands and never a top
  context; non-activating contexts are random windows of the atlas's corpus, run through the model on the
  build's own windows, in which the unit stays at or below `--quiet` times its largest atlas value at every
  token. The atlas stores `--samples` (default 3) contexts per band, so an expert has at most 10 x samples
  held-out activating examples; build the atlas with `--samples 20` to reach delphi's 200.
* **Scorers**: *detection* (does the context contain what the explanation describes?) and *fuzzing* (are the
  marked tokens what it describes? half the activating examples with their truly active tokens marked --
  those at >= 0.3 of the context's maximum, delphi's threshold -- half with as many other tokens marked),
  judged by a pluggable judge: ``overlap`` (deterministic: a quoted or bare term of the explanation equals a
  token of the context; the unigram baseline), an OpenAI-compatible endpoint URL, or a local causal-LM
  directory; *embedding* scoring (AUROC of cosine similarity between the explanation and the contexts under
  a local embedding model) when `--embedder` names one.

Per expert and (source, scorer): counts, balanced accuracy, F1, precision, recall (AUROC for embedding), in
``scores.parquet``; means with bootstrap 95% intervals over experts and the paired difference to the random
control in ``summary.json``/``summary.md``; per-expert histograms in ``histogram.png`` (as delphi plots them).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from monet.checkpoint import load_checkpoint
from monet.errors import MonetError
from monet.interp.explain import explain_expert
from monet.interp.query import Atlas
from monet.interp.units import kind_of, units_of
from monet.io import output_directory, write_json
from monet.runtime import resolve_device

SOURCES = ("top_tokens", "self", "external", "random")
FUZZ_THRESHOLD = 0.3         # a token counts as active for fuzzing at >= 0.3 of its context's maximum (delphi)
SCORES_FILE = "scores.parquet"
EXPLANATIONS_FILE = "explanations.parquet"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
HISTOGRAM = "histogram.png"
STOPWORDS = frozenset("a an and are as at be by for from in is it of on or that the this to with word words token "
                      "tokens text fires activates when after before".split())


@dataclass
class Example:
    """One context shown to a judge: token pieces, the unit's value at each (share of routing, 0 where
    inactive), whether it is an activating example, its activation band (-1: non-activating), marks, and its
    weight under `--weighting activations` (see `held_out_activating`; 1 for a non-activating example)."""

    pieces: list[str]
    values: list[float]
    activating: bool
    band: int = -1
    marked: list[int] = field(default_factory=list)   # token indices highlighted (fuzzing)
    weight: float = 1.0

    def text(self, marks: bool = False) -> str:
        return "".join(f"<<{p}>>" if marks and i in self.marked else p for i, p in enumerate(self.pieces))


class Judge(Protocol):
    """Answers, for each example, whether the explanation describes it (detection: the context; fuzzing: the
    marked tokens)."""

    name: str

    def __call__(self, explanation: str, examples: list[Example], task: str) -> list[bool]: ...


# ------------------------------------------------------------------------------------------- sampling

def sample_experts(counts: np.ndarray, n: int, strata: int, min_count: int, seed: int) -> np.ndarray:
    """Up to `n` unit ids with count >= min_count, seeded, sorted: equal numbers from each of `strata`
    equal-width bins of log count (i.e. of log density) between the rarest and the busiest eligible unit
    (a bin with too few gives all it has, the others make up), so busy experts, few among 262,144, are
    represented as much as the many rare ones."""
    eligible = np.flatnonzero(counts >= max(min_count, 1))
    if len(eligible) <= n:
        return eligible
    rng = np.random.default_rng(seed)
    logs = np.log(counts[eligible].astype(np.float64))
    edges = np.linspace(logs.min(), logs.max(), strata + 1)[1:-1]
    which = np.searchsorted(edges, logs, side="right")
    bins = [rng.permutation(eligible[which == b]) for b in range(strata)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for part in bins:
            if depth < len(part) and len(chosen) < n:
                chosen.append(int(part[depth]))
        depth += 1
    return np.sort(np.asarray(chosen, np.int64))


def _example(ctx: dict[str, Any], activating: bool, band: int = -1) -> Example:
    values = ctx["values"] if ctx["values"] is not None else [0.0] * len(ctx["tokens"])
    if ctx["values"] is None:
        values[ctx["target"]] = ctx["percent"]
    return Example(list(ctx["pieces"]), [0.0 if v is None else float(v) / 100.0 for v in values], activating, band)


def held_out_activating(atlas: Any, group: int, expert: int, top: list[dict[str, Any]], limit: int) -> list[Example]:
    """The expert's band samples that are not top contexts, round-robin over bands (strongest first), at most
    `limit`: examples from every activation band, as delphi draws them from every activation quantile.

    The bands are log-spaced in absolute value, not quantiles: equal numbers per band over-represent the bands
    that hold few of the unit's activations (a dense neuron, positive on about half the tokens, spreads over all
    10). Each example's `weight` is its band's share of the unit's activations over the examples drawn from
    that band (mean 1), so that weighted rates estimate rates over the unit's activations -- what sampling by
    quantiles gives (stratified sampling, reweighted)."""
    seen = {(c["doc"], c["pos"]) for c in top}
    bands = atlas.band_samples(group, expert)
    share = {b["band"]: float(b["share"]) for b in bands}
    per_band = [[_example(c, True, b["band"]) for c in b["contexts"] if (c["doc"], c["pos"]) not in seen]
                for b in bands]
    out: list[Example] = []
    depth = 0
    while len(out) < limit and any(depth < len(part) for part in per_band):
        out += [part[depth] for part in per_band if depth < len(part)][:limit - len(out)]
        depth += 1
    drawn = Counter(ex.band for ex in out)
    raw = [share[ex.band] / drawn[ex.band] for ex in out]
    for ex, w in zip(out, raw, strict=True):
        ex.weight = w * len(out) / sum(raw) if sum(raw) > 0 else 1.0
    return out


@dataclass
class QuietPool:
    """Random windows of the atlas corpus and, per group, each unit's largest value in each window (sparse:
    rows (window, unit, max value) sorted by unit): the source of non-activating contexts."""

    pieces: list[list[str]]
    loud: list[tuple[np.ndarray, np.ndarray, np.ndarray]]   # per group: unit, window, max value (sorted by unit)

    def quiet_windows(self, group: int, unit: int, threshold: float) -> np.ndarray:
        units, windows, peaks = self.loud[group]
        lo, hi = np.searchsorted(units, unit, "left"), np.searchsorted(units, unit, "right")
        noisy = windows[lo:hi][peaks[lo:hi] > threshold]
        return np.setdiff1d(np.arange(len(self.pieces)), noisy)


def quiet_pool(model: Any, atlas: Any, size: int, batch_size: int, seed: int, width: int = 17) -> QuietPool:
    """About `size` windows of `width` tokens at random places of the atlas's corpus: random build windows
    (documents cut every seq_len tokens from their start, each run whole, so the values are those the build
    saw), each cut into as many non-overlapping `width`-token windows as fit (3 of 64 tokens). Build windows
    shorter than `width` (short documents, documents' tails) give none: every window has `width` tokens, since
    a shorter one is both likelier to be quiet and less likely to contain any explanation's terms, which
    would lift every explanation's specificity, the random control's included."""
    dataset = atlas.dataset()
    seq_len = int(atlas.manifest["options"]["seq_len"])
    rng = np.random.default_rng([seed, 2])
    lengths = (dataset.docs[:, 1] - dataset.docs[:, 0]).astype(np.int64)
    if min(seq_len, int(lengths.max(initial=0))) < width:
        raise MonetError(f"the atlas's corpus has no {width}-token window (seq_len {seq_len}, longest document "
                         f"{int(lengths.max(initial=0))} tokens) to draw non-activating contexts from")
    plans: list[tuple[int, int, int, list[int]]] = []     # (doc, window start, window length, sub-window starts)
    total = 0
    while total < size:
        doc = int(rng.choice(len(lengths), p=lengths / lengths.sum()))
        start = int(rng.integers(0, lengths[doc])) // seq_len * seq_len
        length = min(seq_len, int(lengths[doc]) - start)
        if length < width:
            continue
        first = int(rng.integers(0, length % width + 1))
        subs = list(range(first, length - width + 1, width))[:size - total]
        plans.append((doc, start, length, subs))
        total += len(subs)
    groups = len(atlas.groups)
    rows: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(groups)]
    pieces: list[list[str]] = []
    device = next(model.parameters()).device
    for at in range(0, len(plans), batch_size):
        batch = plans[at:at + batch_size]
        ids = np.zeros((len(batch), max(p[2] for p in batch)), np.int64)
        for b, (doc, start, length, _) in enumerate(batch):
            ids[b, :length] = dataset.document(doc)[start:start + length]
        with torch.no_grad():
            acts = units_of(model.eval()).entries(torch.from_numpy(ids).to(device))
        # (row, position, unit, score) of every active unit of the batch (ragged, real tokens only)
        acts = [(*np.divmod(token.cpu().numpy(), ids.shape[1]), unit_ids.cpu().numpy(), scores.float().cpu().numpy())
                for token, unit_ids, scores in acts]
        for b, (_, _, length, subs) in enumerate(batch):
            for sub in subs:
                stop = min(sub + width, length)
                window = len(pieces)
                pieces.append([atlas.piece(int(t)) for t in ids[b, sub:stop]])
                for g, (row, pos, unit_ids, scores) in enumerate(acts):
                    keep = (row == b) & (pos >= sub) & (pos < stop)
                    u, s = unit_ids[keep], scores[keep]
                    order = np.lexsort((-s, u))
                    u, s = u[order], s[order]
                    firsts = np.unique(u, return_index=True)[1]     # the largest value of each unit in the window
                    rows[g].append((u[firsts], np.full(len(firsts), window), s[firsts]))
    loud = []
    for g in range(groups):
        unit, window, peak = (np.concatenate([r[i] for r in rows[g]]) if rows[g] else np.zeros(0)
                              for i in range(3))
        order = np.argsort(unit, kind="stable")
        loud.append((unit[order].astype(np.int64), window[order].astype(np.int64), peak[order].astype(np.float64)))
    return QuietPool(pieces, loud)


def fuzzing_examples(examples: list[Example], rng: np.random.Generator) -> list[Example]:
    """Delphi's fuzzing set: every other activating example with its active tokens marked (>= 0.3 of the
    context's maximum: a positive), the rest with as many randomly chosen other tokens marked (a negative)."""
    out = []
    for n, ex in enumerate(examples):
        peak = max(ex.values, default=0.0)
        active = [i for i, v in enumerate(ex.values) if peak > 0 and v >= FUZZ_THRESHOLD * peak]
        others = [i for i in range(len(ex.pieces)) if i not in active]
        if not active:
            continue
        if n % 2 == 0 or len(others) < len(active):
            out.append(Example(ex.pieces, ex.values, True, ex.band, active, ex.weight))
        else:
            wrong = sorted(rng.choice(others, size=len(active), replace=False).tolist())
            out.append(Example(ex.pieces, ex.values, False, ex.band, wrong, ex.weight))
    return out


# ---------------------------------------------------------------------------------------- explanations

def top_tokens_explanation(top: list[dict[str, Any]], n: int = 5) -> str:
    """The `n` most frequent activating tokens of the top contexts (then first seen), as JSON strings."""
    counts = Counter(ctx["pieces"][ctx["target"]] for ctx in top)
    order = {piece: i for i, piece in reversed(list(enumerate(ctx["pieces"][ctx["target"]] for ctx in top)))}
    best = sorted(counts, key=lambda p: (-counts[p], order[p]))[:n]
    return "tokens " + ", ".join(json.dumps(p, ensure_ascii=False) for p in best)


def explanation_terms(explanation: str) -> set[str]:
    """What the overlap judge looks for: every JSON/double-quoted string of the explanation (exactly, then
    stripped and case-folded when it has letters), plus its bare words outside quotes (case-folded, stop
    words left out)."""
    terms: set[str] = set()
    quoted = re.findall(r'"((?:[^"\\]|\\.)*)"', explanation)
    for raw in quoted:
        try:
            text = json.loads(f'"{raw}"')
        except json.JSONDecodeError:
            text = raw
        terms.add(text)
        if text.strip():
            terms.add(text.strip().casefold())
    rest = re.sub(r'"((?:[^"\\]|\\.)*)"', " ", explanation)
    terms |= {w.casefold() for w in re.findall(r"\w+", rest) if w.casefold() not in STOPWORDS}
    return terms


def _piece_matches(piece: str, terms: set[str]) -> bool:
    return piece in terms or (piece.strip() != "" and piece.strip().casefold() in terms)


class OverlapJudge:
    """Deterministic judge (the unigram baseline): yes when a token of the context (detection) or a marked
    token (fuzzing) equals a term of the explanation (`explanation_terms`)."""

    name = "overlap"

    def __call__(self, explanation: str, examples: list[Example], task: str) -> list[bool]:
        terms = explanation_terms(explanation)
        if task == "fuzzing":
            return [any(_piece_matches(ex.pieces[i], terms) for i in ex.marked) for ex in examples]
        return [any(_piece_matches(p, terms) for p in ex.pieces) for ex in examples]


DETECTION_PROMPT = ("A feature of a language model is described by this explanation: {explanation}\n"
                    "Below are {n} numbered text examples. For each, answer 1 if the feature described is present "
                    "in it, else 0.\n{examples}\nReply with only a JSON list of {n} numbers (0 or 1).")
FUZZING_PROMPT = ("A feature of a language model is described by this explanation: {explanation}\n"
                  "Below are {n} numbered text examples; in each, some tokens are marked <<like this>>. For each, "
                  "answer 1 if the marked tokens are exactly what the feature describes, else 0.\n{examples}\n"
                  "Reply with only a JSON list of {n} numbers (0 or 1).")
EXPLAIN_PROMPT = ("Below are text excerpts where one feature of a language model fires; the token where it fires "
                  "most is marked <<like this>>.\n{examples}\nIn one short phrase, what does the feature detect? "
                  "Reply with the phrase only.")


def judge_prompt(explanation: str, examples: list[Example], task: str) -> str:
    listing = "\n".join(f"{n + 1}. {ex.text(marks=task == 'fuzzing')!r}" for n, ex in enumerate(examples))
    template = FUZZING_PROMPT if task == "fuzzing" else DETECTION_PROMPT
    return template.format(explanation=explanation, n=len(examples), examples=listing)


def parse_answers(text: str, n: int) -> list[bool] | None:
    """The judge's JSON list of n zeros and ones (the first list in the reply), or None when malformed."""
    match = re.search(r"\[[^\[\]]*\]", text)
    try:
        values = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        return None
    if not isinstance(values, list) or len(values) != n or not all(v in (0, 1, True, False) for v in values):
        return None
    return [bool(v) for v in values]


class Endpoint:
    """An OpenAI-compatible chat-completions endpoint (`URL/chat/completions`), the only network access of
    `monet autointerp`, and only to the URL the user names. The key, if any, is read from the environment
    variable the user names."""

    def __init__(self, url: str, model: str | None = None, api_key_env: str | None = None,
                 timeout: float = 120.0, max_tokens: int = 200) -> None:
        if not re.match(r"https?://", url):
            raise MonetError(f"{url!r} is not an http(s) URL of an OpenAI-compatible endpoint")
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")
        self.model, self.timeout, self.max_tokens = model or "default", timeout, max_tokens
        self.key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self.key:
            raise MonetError(f"environment variable {api_key_env} (--api-key-env) is not set")

    def chat(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
            return str(reply["choices"][0]["message"]["content"])
        except (urllib.error.URLError, OSError, KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
            raise MonetError(f"the endpoint {self.url} did not answer a chat completion ({exc})") from exc


class EndpointJudge:
    """An LLM judge behind an OpenAI-compatible endpoint, `batch` examples per request; a malformed reply
    counts as "no" for each of its examples (and is counted in `failures`)."""

    name = "endpoint"

    def __init__(self, endpoint: Endpoint, batch: int = 5) -> None:
        self.endpoint, self.batch, self.failures = endpoint, batch, 0

    def __call__(self, explanation: str, examples: list[Example], task: str) -> list[bool]:
        out: list[bool] = []
        for first in range(0, len(examples), self.batch):
            chunk = examples[first:first + self.batch]
            answers = parse_answers(self.endpoint.chat(judge_prompt(explanation, chunk, task)), len(chunk))
            if answers is None:
                self.failures += 1
                answers = [False] * len(chunk)
            out += answers
        return out


class LocalJudge:
    """A local causal language model (any Hugging Face directory) as judge: one prompt per example ending in
    "Answer (yes or no):", yes when the next-token logit of " yes" beats " no"."""

    name = "local"

    def __init__(self, directory: str, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(directory, "config.json").is_file():
            raise MonetError(f"{directory} is not a model directory (no config.json); give a local Hugging Face "
                             "causal-LM directory, an OpenAI-compatible URL, or `overlap`")
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).to(device).eval()
        self.yes, self.no = (self.tokenizer(w, add_special_tokens=False)["input_ids"][-1] for w in (" yes", " no"))

    def __call__(self, explanation: str, examples: list[Example], task: str) -> list[bool]:
        out = []
        for ex in examples:
            prompt = judge_prompt(explanation, [ex], task).rsplit("\n", 1)[0] + "\nAnswer (yes or no):"
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.model.device)
            with torch.no_grad():
                logits = self.model(input_ids=ids).logits[0, -1]
            out.append(bool(logits[self.yes] > logits[self.no]))
        return out


def make_judge(spec: str, model_name: str | None, api_key_env: str | None, device: str) -> Judge:
    if spec == "overlap":
        return OverlapJudge()
    if re.match(r"https?://", spec):
        return EndpointJudge(Endpoint(spec, model_name, api_key_env))
    return LocalJudge(spec, device)


class Embedder:
    """A local Hugging Face encoder directory: mean-pooled last hidden states, L2-normalised."""

    def __init__(self, directory: str, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        if not Path(directory, "config.json").is_file():
            raise MonetError(f"--embedder {directory} is not a model directory (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = AutoModel.from_pretrained(directory, local_files_only=True).to(device).eval()

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = []
        for text in texts:
            ids = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
            with torch.no_grad():
                hidden = self.model(input_ids=ids.to(self.model.device)).last_hidden_state[0].float()
            vector = hidden.mean(0).cpu().numpy()
            out.append(vector / max(float(np.linalg.norm(vector)), 1e-12))
        return np.stack(out)


# -------------------------------------------------------------------------------------------- metrics

def classification(truth: list[bool], predicted: list[bool], weights: list[float] | None = None) -> dict[str, Any]:
    """Counts, balanced accuracy (mean of the true-positive and true-negative rates; None when a class is
    missing), precision, recall and F1 (0 when undefined). With `weights`, tp/fp/tn/fn and the rates are
    weighted sums (n_pos, n_neg stay numbers of examples)."""
    t, p = np.asarray(truth, bool), np.asarray(predicted, bool)
    if weights is None:
        tp, fp = int((t & p).sum()), int((~t & p).sum())
        tn, fn = int((~t & ~p).sum()), int((t & ~p).sum())
    else:
        w = np.asarray(weights, np.float64)
        tp, fp, tn, fn = (float(w[mask].sum()) for mask in (t & p, ~t & p, ~t & ~p, t & ~p))
    recall = tp / (tp + fn) if tp + fn else None
    specificity = tn / (tn + fp) if tn + fp else None
    precision = tp / (tp + fp) if tp + fp else 0.0
    r = recall or 0.0
    return {"n_pos": int(t.sum()), "n_neg": int((~t).sum()), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "balanced_accuracy": None if recall is None or specificity is None else (recall + specificity) / 2,
            "precision": precision, "recall": recall,
            "f1": 2 * precision * r / (precision + r) if precision + r else 0.0}


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """Probability that a positive scores above a negative (ties count half); None without both."""
    if not len(positive) or not len(negative):
        return None
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def bootstrap_mean(values: np.ndarray, rounds: int, seed: int) -> tuple[float, list[float] | None]:
    """(mean, percentile 95% interval over `rounds` resamples of the values), None interval if rounds or n < 2."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return float("nan"), None
    if rounds < 1 or len(values) < 2:
        return float(values.mean()), None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(rounds, len(values)))].mean(axis=1)
    return float(values.mean()), [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


# ------------------------------------------------------------------------------------------ the run

def explain_all(atlas: Any, group: int, experts: np.ndarray, tops: dict[int, list], cmd: Any,
                chat: tuple[Any, Any] | None, endpoint: Endpoint | None) -> dict[str, dict[int, str]]:
    """Explanations per source and expert (see the module docstring); `random` is a seeded derangement of the
    top-tokens explanations within the group."""
    out: dict[str, dict[int, str]] = {"top_tokens": {e: top_tokens_explanation(tops[e], cmd.top_tokens)
                                                     for e in experts.tolist()}}
    if "self" in cmd.sources and chat is not None:
        out["self"] = {e: explain_expert(chat[0], chat[1], atlas, group, e, samples=1, k=len(tops[e]),
                                         seed=cmd.seed)[0] for e in experts.tolist()}
    if "external" in cmd.sources and endpoint is not None:
        def listing(e: int) -> str:
            lines = []
            for n, ctx in enumerate(tops[e]):
                ex = Example(ctx["pieces"], [], True, marked=[ctx["target"]])
                lines.append(f"{n + 1}. {ex.text(marks=True)!r}")
            return "\n".join(lines)

        out["external"] = {e: endpoint.chat(EXPLAIN_PROMPT.format(examples=listing(e))).strip()
                           for e in experts.tolist()}
    if "random" in cmd.sources and len(experts) > 1:     # one expert has no other expert's explanation
        ids = experts.tolist()
        rng = np.random.default_rng([cmd.seed, group, 3])
        shift = rng.permutation(len(ids))
        # a derangement: each expert gets the explanation of the next one in a random cycle
        out["random"] = {ids[shift[n]]: out["top_tokens"][ids[shift[(n + 1) % len(ids)]]] for n in range(len(ids))}
    return out


def score_expert(explanations: dict[str, str], activating: list[Example], quiet: list[Example],
                 judge: Judge, scorers: tuple[str, ...], embedder: Embedder | None,
                 rng: np.random.Generator, weighted: bool = False) -> list[dict[str, Any]]:
    """Rows of one expert: per explanation source and scorer, the counts and metrics (`weighted`: each example
    counts with its `weight`)."""
    rows = []
    fuzz = fuzzing_examples(activating, rng) if "fuzzing" in scorers else []
    vectors = embedder([ex.text() for ex in activating + quiet]) if embedder is not None and "embedding" in scorers \
        else None
    for source, text in explanations.items():
        for scorer in scorers:
            if scorer == "embedding":
                if vectors is None:
                    continue
                sims = vectors @ embedder([text])[0]
                value = auroc(sims[:len(activating)], sims[len(activating):])
                rows.append({"source": source, "scorer": scorer, "judge": "embedding", "n_pos": len(activating),
                             "n_neg": len(quiet), "auroc": value, "balanced_accuracy": value})
                continue
            examples = activating + quiet if scorer == "detection" else fuzz
            if not examples:
                continue
            predicted = judge(text, examples, scorer)
            rows.append({"source": source, "scorer": scorer, "judge": judge.name,
                         **classification([ex.activating for ex in examples], predicted,
                                          [ex.weight for ex in examples] if weighted else None)})
    return rows


def summarize(rows: list[dict[str, Any]], rounds: int, seed: int) -> list[dict[str, Any]]:
    """Per (group, source, scorer) and pooled over groups ("all"): experts scored, mean balanced accuracy and
    F1 with bootstrap 95% intervals over experts, and the mean paired difference to the random control."""
    out = []
    keys = sorted({(r["group"], r["source"], r["scorer"]) for r in rows}, key=str)
    groups = sorted({r["group"] for r in rows})
    keys += sorted({("all", s, sc) for _, s, sc in keys}, key=str) if len(groups) > 1 else []
    for n, (group, source, scorer) in enumerate(keys):
        mine = {(r["group"], r["expert"]): r for r in rows if r["source"] == source and r["scorer"] == scorer
                and group in ("all", r["group"]) and r["balanced_accuracy"] is not None}
        if not mine:
            continue
        acc = np.asarray([r["balanced_accuracy"] for r in mine.values()])
        entry: dict[str, Any] = {"group": group, "source": source, "scorer": scorer, "experts": len(mine)}
        entry["balanced_accuracy"], entry["balanced_accuracy_ci95"] = bootstrap_mean(acc, rounds, seed + n)
        if scorer != "embedding":
            entry["f1"], entry["f1_ci95"] = bootstrap_mean(np.asarray([r["f1"] for r in mine.values()]),
                                                           rounds, seed + n)
        control = {(r["group"], r["expert"]): r["balanced_accuracy"] for r in rows
                   if r["source"] == "random" and r["scorer"] == scorer and r["balanced_accuracy"] is not None}
        paired = [mine[k]["balanced_accuracy"] - control[k] for k in mine if k in control]
        if source != "random" and paired:
            entry["minus_random"], entry["minus_random_ci95"] = bootstrap_mean(np.asarray(paired), rounds, seed + n)
        out.append(entry)
    return out


def histogram(rows: list[dict[str, Any]], path: Path) -> None:
    """Per scorer, histograms of the per-expert balanced accuracy of every explanation source (delphi's plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorers = sorted({r["scorer"] for r in rows}) or ["detection"]
    fig, axes = plt.subplots(1, len(scorers), figsize=(5 * len(scorers), 3.6), squeeze=False)
    bins = np.linspace(0.0, 1.0, 21)
    for ax, scorer in zip(axes[0], scorers, strict=True):
        for source in SOURCES:
            values = [r["balanced_accuracy"] for r in rows
                      if r["scorer"] == scorer and r["source"] == source and r["balanced_accuracy"] is not None]
            if values:
                ax.hist(values, bins=bins, alpha=0.5, label=f"{source} (n={len(values)})")
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_title(scorer + (" (AUROC)" if scorer == "embedding" else ""))
        ax.set_xlabel("balanced accuracy per expert")
        ax.set_ylabel("experts")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def ci(value: float | None, interval: list[float] | None) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    group = kind_of(meta["kind"]).group_word
    weighting = " (held-out examples weighted by their band's share of activations)" \
        if meta.get("weighting") == "activations" else ""
    lines = [f"Autointerp of {meta['atlas']} ({meta['kind']}), judge `{meta['judge']}`{weighting}; balanced accuracy "
             "(embedding: AUROC) and F1 per expert, mean [bootstrap 95% interval over experts]; chance 0.5.", "",
             f"| {group} | source | scorer | experts | balanced accuracy | F1 | minus random |",
             "|---|---|---|---|---|---|---|"]
    for e in summary:
        lines.append(f"| {e['group']} | {e['source']} | {e['scorer']} | {e['experts']} | "
                     f"{ci(e['balanced_accuracy'], e['balanced_accuracy_ci95'])} | "
                     f"{ci(e.get('f1'), e.get('f1_ci95'))} | "
                     f"{ci(e.get('minus_random'), e.get('minus_random_ci95'))} |")
    lines += ["", f"Experts scored: {meta['experts_scored']} ({meta['experts_without_held_out']} sampled experts "
              f"had no held-out band sample; {meta['experts_without_negatives']} no non-activating window in the "
              "pool). "
              f"Held-out activating examples per expert: mean {meta['activating_mean']:.1f} "
              f"(at most {meta['activating_max']} asked); non-activating: mean {meta['quiet_mean']:.1f}."]
    return "\n".join(lines) + "\n"


def autointerp(cmd: Any) -> dict[str, Any]:
    """`monet autointerp`: sample experts, explain, score, write OUT (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq


    started = time.time()
    atlas = Atlas(cmd.atlas)
    run = cmd.run or atlas.manifest["model"].get("run")
    if not run or not Path(run).exists():
        raise MonetError("non-activating contexts are found by running the atlas's model on its corpus: pass "
                         f"--run RUN (the run the atlas {cmd.atlas} was built from)")
    device = resolve_device(cmd.device)
    model, _ = load_checkpoint(run, device)
    atlas.check_model(model)
    groups = list(cmd.groups) if cmd.groups else atlas.groups
    for g in groups:
        atlas.check_expert(g, 0)
    judge = make_judge(cmd.judge, cmd.judge_model, cmd.api_key_env, str(device))
    endpoint = Endpoint(cmd.explainer, cmd.explainer_model, cmd.api_key_env) if cmd.explainer else None
    chat = load_checkpoint(cmd.chat_model, device) if cmd.chat_model else None
    if chat is not None:
        check_same_vocabulary(atlas, chat[1], cmd.chat_model)
    embedder = Embedder(cmd.embedder, str(device)) if cmd.embedder else None
    pool = quiet_pool(model, atlas, cmd.pool, cmd.batch_size, cmd.seed)
    rows: list[dict[str, Any]] = []
    explained: list[dict[str, Any]] = []
    n_act: list[int] = []
    n_quiet: list[int] = []
    sampled = skipped = 0
    for group in groups:
        counts = np.rint(atlas.densities(group) * float(atlas.manifest["tokens"])).astype(np.int64)
        experts = sample_experts(counts, cmd.experts, cmd.strata, cmd.min_count, cmd.seed + group)
        tops = {e: atlas.top_contexts(group, e, cmd.explain_k) for e in experts.tolist()}
        explanations = explain_all(atlas, group, experts, tops, cmd, chat, endpoint)
        for expert in experts.tolist():
            rng = np.random.default_rng([cmd.seed, group, expert])
            activating = held_out_activating(atlas, group, expert, tops[expert], cmd.max_activating)
            if not activating:
                skipped += 1
                continue
            windows = pool.quiet_windows(group, expert, cmd.quiet * atlas.expert(group, expert)["max_score"])
            wanted = cmd.negatives if cmd.negatives is not None else len(activating)
            chosen = rng.choice(windows, size=min(wanted, len(windows)), replace=False) if len(windows) else []
            quiet = [Example(pool.pieces[w], [0.0] * len(pool.pieces[w]), False) for w in chosen]
            n_act.append(len(activating))
            n_quiet.append(len(quiet))
            sampled += 1
            mine = {source: by_expert[expert] for source, by_expert in explanations.items() if source in cmd.sources}
            for row in score_expert(mine, activating, quiet, judge, tuple(cmd.scorers), embedder, rng,
                                    cmd.weighting == "activations"):
                rows.append({"group": group, "expert": expert, "count": int(counts[expert]),
                             "density": float(counts[expert]) / float(atlas.manifest["tokens"]),
                             "explanation": mine[row["source"]], **row})
            explained += [{"group": group, "expert": expert, "source": s, "explanation": t} for s, t in mine.items()]
    if not rows:
        raise MonetError(f"no expert of {cmd.atlas} has {cmd.min_count} activations and held-out band samples; "
                         "lower --min-count or build the atlas with more --max-tokens / --samples")
    meta = {"atlas": str(Path(cmd.atlas).resolve()), "kind": atlas.manifest["kind"], "run": str(run),
            "judge": judge.name if cmd.judge == "overlap" else cmd.judge, "sources": list(cmd.sources),
            "scorers": list(cmd.scorers), "groups": groups, "experts_per_group": cmd.experts, "strata": cmd.strata,
            "min_count": cmd.min_count, "quiet": cmd.quiet, "weighting": cmd.weighting, "pool": cmd.pool,
            "seed": cmd.seed,
            "bootstrap": cmd.bootstrap, "activating_max": cmd.max_activating,
            "experts_scored": sampled, "experts_without_held_out": skipped,
            "experts_without_negatives": int(sum(n == 0 for n in n_quiet)),
            "activating_mean": float(np.mean(n_act)), "quiet_mean": float(np.mean(n_quiet)),
            "judge_failures": getattr(judge, "failures", 0), "seconds": None}
    summary = summarize(rows, cmd.bootstrap, cmd.seed)
    meta["seconds"] = round(time.time() - started, 1)
    report = {**meta, "summary": summary}
    columns = ["group", "expert", "count", "density", "source", "scorer", "judge", "n_pos", "n_neg", "tp", "fp",
               "tn", "fn", "balanced_accuracy", "precision", "recall", "f1", "auroc", "explanation"]
    with output_directory(cmd.out, "autointerp", cmd.force, "an autointerp report") as tmp:
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), tmp / SCORES_FILE)
        pq.write_table(pa.Table.from_pylist(explained), tmp / EXPLANATIONS_FILE)
        write_json(tmp / SUMMARY_JSON, report)
        (tmp / SUMMARY_MD).write_text(markdown(summary, meta), encoding="utf-8")
        histogram(rows, tmp / HISTOGRAM)
    return report


def check_same_vocabulary(atlas: Any, tokenizer: Any, where: str) -> None:
    """Self-explanation feeds the mean embedding of the expert's tokens: the chat model must share the atlas's
    tokenizer (same pieces for the same ids)."""
    probe = [i for i in range(0, len(atlas.vocab), max(len(atlas.vocab) // 50, 1))]
    if any(tokenizer.decode([i]) != atlas.piece(i) for i in probe):
        raise MonetError(f"--chat-model {where} does not share the atlas's tokenizer; self-explanation needs the "
                         "chat version of the atlas's own model (e.g. Monet-1.4B-Chat for a Monet-1.4B atlas)")


__all__ = ["EXPLAIN_PROMPT", "Endpoint", "EndpointJudge", "Example", "LocalJudge", "OverlapJudge", "autointerp",
           "classification", "explanation_terms", "fuzzing_examples", "held_out_activating", "quiet_pool",
           "sample_experts", "summarize", "top_tokens_explanation"]
