"""Sparse probing: how well do k single units predict a token's label? (`monet probe`)

k-sparse probing (Gurnee et al. 2023, "Finding Neurons in a Haystack"; SAEBench) asks whether a few units --
Monet experts, or a dense model's MLP neurons, on the same tokens -- carry a label (a programming language,
a domain, ...) so plainly that a logistic regression on k of them predicts it. The protocol (train/test split
by document, two streaming passes: class-mean-difference selection then the candidates' features, balanced
binary and multiclass probes, the random control, bootstrap intervals over test documents) is described step
by step in docs/probing.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monet.checkpoint import check_data_fits, load_checkpoint, read_config, resolve_checkpoint, trained_seq_len
from monet.data import TokenDataset
from monet.errors import MonetError
from monet.interp.units import Units, cut_document, expect_kind, units_of
from monet.io import atomic_write, output_directory, write_json
from monet.runtime import resolve_device
from monet.settings import ProbeSettings

REPORT_JSON = "probe.json"
REPORT_MD = "probe.md"
SELECTION = ("class-mean difference |mean(label) - mean(other labels)| on the probe-train tokens "
             "(Gurnee et al. 2023; SAEBench)")
TOP_SHOWN = 5   # best units per label listed in the report

# One batch of tokens: labels [n], documents [n], and per group the active units as triples
# (token index in 0..n-1, unit id, activation).
Triples = tuple[np.ndarray, np.ndarray, np.ndarray]
Batch = tuple[np.ndarray, np.ndarray, list[Triples]]


# ----------------------------------------------------------------------------------------------- tokens

def split_documents(dataset: TokenDataset, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                                      list[str]]:
    """(probe-train documents, probe-test documents, skipped labels): each label's documents in a seeded
    random order, the first `test_fraction` of them (at least one) for testing. Labels with fewer than two
    documents cannot be on both sides and are skipped."""
    rng = np.random.default_rng(seed)
    train, test, skipped = [], [], []
    for label, name in enumerate(dataset.labels):
        docs = rng.permutation(np.flatnonzero(dataset.docs[:, 2] == label))
        if len(docs) < 2:
            skipped.append(name)
            continue
        n_test = min(max(int(round(len(docs) * test_fraction)), 1), len(docs) - 1)
        test.extend(docs[:n_test].tolist())
        train.extend(docs[n_test:].tolist())
    return np.asarray(train, np.int64), np.asarray(test, np.int64), skipped


def label_windows(dataset: TokenDataset, docs: np.ndarray, per_label: int, seq_len: int,
                  rng: np.random.Generator) -> np.ndarray:
    """[n, 3] windows (doc, start, length): every document of `docs` cut into windows of `seq_len` tokens,
    then, per label, windows drawn in a random order until `per_label` tokens that are not a document's
    first token (the last window may be cut short). Drawing windows rather than documents spreads a label's
    tokens over many documents, which the bootstrap over documents needs."""
    windows: dict[int, list[tuple[int, int, int]]] = {}
    for doc in docs.tolist():
        start, end, label = dataset.docs[doc, :3].tolist()
        windows.setdefault(label, []).extend(cut_document(doc, end - start, seq_len))
    rows = []
    for label in sorted(windows):
        have = 0
        for index in rng.permutation(len(windows[label])).tolist():
            doc, start, size = windows[label][index]
            first = 1 if start == 0 else 0                      # the document's <s> is not counted
            size = min(size, per_label - have + first)
            if size - first > 0:
                rows.append((doc, start, size))
                have += size - first
            if have >= per_label:
                break
    return np.asarray(sorted(rows), np.int64).reshape(-1, 3)


def model_batches(units: Units, dataset: TokenDataset, windows: np.ndarray, batch_size: int,
                  progress: bool = False, desc: str = "probe", pool: str = "token") -> Iterator[Batch]:
    """Run the model over the windows; yield each batch's examples (labels, documents) and active units.

    An example is a token (`pool="token"`), or a window with each unit's mean activation over its tokens
    (`pool="window"`, the sequence-level probing of SAEBench)."""
    for read in units.stream(dataset, windows, batch_size, desc, progress):
        batch, valid = read.windows, read.valid
        positions = batch[:, 1:2] + np.arange(valid.shape[1])[None]
        mask = valid & (positions > 0)                          # no document-start tokens
        index = np.full(mask.shape, -1, np.int64)               # example number of each token
        if pool == "window":
            rows = np.flatnonzero(mask.any(axis=1))
            index[rows] = np.arange(len(rows))[:, None]
            docs = batch[rows, 0]
            size = mask.sum(axis=1)[rows].astype(np.float64)
        else:
            index[mask] = np.arange(int(mask.sum()))
            docs = np.broadcast_to(batch[:, :1], mask.shape)[mask]
        labels = dataset.docs[docs, 2].astype(np.int64)
        groups = []
        for b, t, unit, score in read.groups:
            keep = mask[b, t]
            example, unit, score = index[b[keep], t[keep]], unit[keep], score[keep].astype(np.float64)
            if pool == "window":   # mean over the window's tokens (inactive tokens count as 0)
                keys, inverse = np.unique((example << 32) | unit, return_inverse=True)
                example, unit = keys >> 32, keys & 0xFFFFFFFF
                score = np.bincount(inverse, weights=score, minlength=len(keys)) / size[example]
            groups.append((example, unit, score.astype(np.float32)))
        yield labels, docs, groups


# -------------------------------------------------------------------------------------------- selection

def label_sums(batches: Iterable[Batch], groups: int, units: int, num_labels: int) -> tuple[list[np.ndarray],
                                                                                             np.ndarray]:
    """Pass 1: per group the sum of every unit's activation over each label's tokens [labels, units], and
    the number of tokens per label."""
    sums = [np.zeros((num_labels, units), np.float64) for _ in range(groups)]
    counts = np.zeros(num_labels, np.int64)
    for labels, _docs, per_group in batches:
        counts += np.bincount(labels, minlength=num_labels)
        for total, (token, unit, score) in zip(sums, per_group, strict=True):
            flat = labels[token] * units + unit
            total += np.bincount(flat, weights=score, minlength=num_labels * units).reshape(num_labels, units)
    return sums, counts


def class_mean_difference(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[labels, units]: mean activation over each label's tokens minus the mean over all other tokens."""
    total, n = sums.sum(axis=0), counts.sum()
    mean_in = sums / np.maximum(counts, 1)[:, None]
    mean_out = (total[None] - sums) / np.maximum(n - counts, 1)[:, None]
    return mean_in - mean_out


def select_units(diff: np.ndarray, active: np.ndarray, count: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per label, the `count` units with the largest |class-mean difference| (best first, ties by id), and
    `count` random units among the active ones: two [labels, count] arrays."""
    order = np.argsort(-np.abs(diff), axis=1, kind="stable")[:, :count]
    pool = np.flatnonzero(active)
    if len(pool) < count:
        raise MonetError(f"only {len(pool)} units are ever active on the training tokens; the probes need at least "
                         f"{count} (use more --train-tokens or smaller --ks)")
    random = np.stack([rng.choice(pool, size=count, replace=False) for _ in range(diff.shape[0])])
    return order, random


def candidate_features(batches: Iterable[Batch], candidates: list[np.ndarray]) -> tuple[list[np.ndarray],
                                                                                      np.ndarray, np.ndarray]:
    """Pass 2: per group a dense [tokens, len(candidates)] matrix of the candidate units' activations (0 when
    inactive), plus every token's label and document."""
    columns = [[np.zeros((0, len(cand)), np.float32)] for cand in candidates]
    labels, docs = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for batch_labels, batch_docs, per_group in batches:
        labels.append(batch_labels)
        docs.append(batch_docs)
        for out, cand, (token, unit, score) in zip(columns, candidates, per_group, strict=True):
            block = np.zeros((len(batch_labels), len(cand)), np.float32)
            at = np.minimum(np.searchsorted(cand, unit), len(cand) - 1)
            hit = cand[at] == unit
            block[token[hit], at[hit]] = score[hit]
            out.append(block)
    return [np.concatenate(c) for c in columns], np.concatenate(labels), np.concatenate(docs)


# ------------------------------------------------------------------------------------------------ probes

def fit_probe(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The decision function of a logistic regression on a few columns, inputs standardised with the training
    tokens' statistics (a constant +-1 when `y` has a single class)."""
    if len(np.unique(y)) < 2:
        return lambda z: np.full(len(z), 1.0 if y[0] else -1.0)
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:
        raise MonetError("sparse probing needs scikit-learn: pip install 'monet-lm[interp]'") from exc
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(x, y).decision_function


def balanced(labels: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of every token of `label` and as many drawn (without replacement) from the other labels."""
    positive = np.flatnonzero(labels == label)
    others = np.flatnonzero(labels != label)
    negative = rng.choice(others, size=min(len(positive), len(others)), replace=False)
    return np.sort(np.concatenate([positive, negative]))


def bootstrap_interval(sets: list[tuple[np.ndarray, np.ndarray]], doc_labels: np.ndarray, rounds: int,
                       rng: np.random.Generator) -> list[float] | None:
    """95% interval of the mean (over `sets`) accuracy when the test documents are resampled with
    replacement within each label (so every label keeps its number of documents). Each set is (correct [n]
    as 0/1, document index [n]); `doc_labels[d]` is document d's label. None when a label has fewer than
    two test documents (no interval can be estimated from one)."""
    num_docs = len(doc_labels)
    if rounds <= 0 or num_docs == 0 or np.bincount(doc_labels)[np.unique(doc_labels)].min() < 2:
        return None
    weights = np.zeros((rounds, num_docs))
    for label in np.unique(doc_labels):
        members = np.flatnonzero(doc_labels == label)
        draws = members[rng.integers(0, len(members), (rounds, len(members)))]
        np.add.at(weights, (np.arange(rounds)[:, None], draws), 1.0)
    accuracy = np.zeros(rounds)
    for correct, doc in sets:
        right = np.bincount(doc, weights=correct, minlength=num_docs)
        total = np.bincount(doc, minlength=num_docs).astype(np.float64)
        accuracy += (weights @ right) / np.maximum(weights @ total, 1e-12)
    accuracy /= len(sets)
    low, high = np.percentile(accuracy, [2.5, 97.5])
    return [float(low), float(high)]


def probe_group(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                test_docs: np.ndarray, doc_labels: np.ndarray, columns: np.ndarray, random_columns: np.ndarray,
                ks: tuple[int, ...], labels: list[int], rounds: int, seed: int) -> dict[str, Any]:
    """Binary, multiclass and random-control accuracies of one group for every k. `columns[c]` /
    `random_columns[c]` are label c's top / random units as column indices of the matrices; `test_docs`
    numbers the test tokens' documents 0, 1, ... and `doc_labels[d]` is document d's label."""
    rng = np.random.default_rng(seed)   # the same balanced sets for every k: accuracies across k are paired
    sets = [(balanced(train_y, label, rng), balanced(test_y, label, rng)) for label in labels]

    def summary(results: list[tuple[np.ndarray, np.ndarray]], ci_rng: np.random.Generator) -> dict[str, Any]:
        return {"accuracy": float(np.mean([correct.mean() for correct, _ in results])),
                "ci95": bootstrap_interval(results, doc_labels, rounds, ci_rng)}

    out: dict[str, Any] = {"binary": {}, "multiclass": {}, "random": {}}
    for k in ks:
        binary_sets, random_sets, per_label, decisions = [], [], {}, np.zeros((len(test_y), len(labels)))
        for slot, label in enumerate(labels):
            fit, check = sets[slot]
            for kind, cols, results in (("top", columns[slot][:k], binary_sets),
                                        ("random", random_columns[slot][:k], random_sets)):
                decision = fit_probe(train_x[np.ix_(fit, cols)], train_y[fit] == label)
                correct = (decision(test_x[np.ix_(check, cols)]) > 0) == (test_y[check] == label)
                results.append((correct.astype(np.float64), test_docs[check]))
                if kind == "top":
                    per_label[label] = float(correct.mean())
                    decisions[:, slot] = decision(test_x[:, cols])
        predicted = np.asarray(labels)[decisions.argmax(axis=1)]
        multiclass = (predicted == test_y).astype(np.float64)
        ci_rng = np.random.default_rng([seed, k, 1])
        out["binary"][k] = {**summary(binary_sets, ci_rng), "per_label": per_label}
        out["random"][k] = summary(random_sets, ci_rng)
        out["multiclass"][k] = summary([(multiclass, test_docs)], ci_rng)
    return out


def sparse_probe(batches: Callable[[str], Iterable[Batch]], groups: int, units: int, labels: list[int],
                 num_labels: int, ks: tuple[int, ...] = (1, 2, 5, 10, 20), seed: int = 0,
                 rounds: int = 1000) -> dict[str, Any]:
    """Probe every group of one model. `batches("train")` (called twice: statistics, then features) and
    `batches("test")` yield `Batch`es; `labels` are the label ids to probe (the others' tokens, if any, are
    ignored). Returns per group the accuracies, the units chosen per label and the token counts."""
    ks = tuple(sorted(set(ks)))
    top = max(ks)
    sums, counts = label_sums(batches("train"), groups, units, num_labels)
    missing = [label for label in labels if counts[label] == 0]
    if missing:
        raise MonetError(f"label ids {missing} have no training tokens; nothing to probe them with")
    rng = np.random.default_rng(seed)
    chosen, candidates = [], []   # per group: (top units, random units, class-mean differences); their union
    for total in sums:
        sub = total[labels]
        diff = class_mean_difference(sub, counts[labels])
        best, random = select_units(diff, sub.sum(axis=0) > 0, top, rng)
        chosen.append((best, random, diff))
        candidates.append(np.union1d(best, random))

    def features(side: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:   # the probed labels' tokens only
        x, y, docs = candidate_features(batches(side), candidates)
        keep = np.isin(y, labels)
        return [matrix[keep] for matrix in x], y[keep], docs[keep]

    (train_x, train_y, _), (test_x, test_y, test_doc_ids) = features("train"), features("test")
    if not len(test_y):
        raise MonetError("no probe-test tokens: use more --test-tokens or documents")
    _, first, test_docs = np.unique(test_doc_ids, return_index=True, return_inverse=True)
    doc_labels = test_y[first]
    results = []
    for g, (best, random, diff) in enumerate(chosen):
        # candidates are sorted and hold every unit chosen: searchsorted gives a unit's column
        group = probe_group(train_x[g], train_y, test_x[g], test_y, test_docs, doc_labels,
                            np.searchsorted(candidates[g], best), np.searchsorted(candidates[g], random), ks,
                            labels, rounds, seed)
        group["group"] = g
        group["top_units"] = {label: [[int(u), float(diff[slot, u])] for u in best[slot][:TOP_SHOWN]]
                              for slot, label in enumerate(labels)}
        results.append(group)
    test_counts = np.bincount(test_y, minlength=num_labels)
    return {"groups": results, "train_examples": counts[labels].tolist(), "test_examples": test_counts[labels].tolist(),
            "test_documents": np.bincount(doc_labels, minlength=num_labels)[labels].tolist(),
            "majority_rate": float(test_counts.max() / max(test_counts.sum(), 1))}


# --------------------------------------------------------------------------------------------- command

def probe_models(models: list[tuple[str, torch.nn.Module]], cmd: ProbeSettings) -> dict[str, Any]:
    """The whole protocol for several models on the same tokens of `cmd.data`, in windows of `cmd.seq_len`
    (given: `probe_command` fills it in from the checkpoint); returns the report (see `probe_command`)."""
    if cmd.seq_len is None:
        raise MonetError("probe_models needs settings with seq_len set (probe_command reads it from the checkpoint)")
    data_dir, seq_len = cmd.data, cmd.seq_len
    dataset = TokenDataset(data_dir, cmd.split)
    train_docs, test_docs, skipped = split_documents(dataset, cmd.test_fraction, cmd.seed)
    labels = sorted({int(dataset.docs[d, 2]) for d in train_docs.tolist()})
    if len(labels) < 2:
        raise MonetError(f"the {cmd.split} split of {data_dir} has fewer than two labels with two or more documents "
                         "(one side trains the probes, the other tests them); use --split train or a larger corpus")
    rng = np.random.default_rng([cmd.seed, 1])
    windows = {"train": label_windows(dataset, train_docs, cmd.train_tokens, seq_len, rng),
               "test": label_windows(dataset, test_docs, cmd.test_tokens, seq_len, rng)}
    report: dict[str, Any] = {
        "data": str(Path(data_dir).resolve()), "split": cmd.split, "labels": [dataset.labels[i] for i in labels],
        "skipped_labels": skipped, "seq_len": seq_len, "pool": cmd.pool, "ks": sorted(set(cmd.ks)),
        "selection": SELECTION,
        "probe": "L2 logistic regression (C=1), standardised inputs, balanced one-vs-rest per label",
        "documents": {"train": int(len(train_docs)), "test": int(len(test_docs))},
        "chance": {"binary": 0.5, "multiclass": 1.0 / len(labels)}, "bootstrap": cmd.bootstrap, "models": [],
    }
    for name, model in models:
        units = units_of(model)
        started = time.time()

        def batches(side: str, units=units, name=name) -> Iterator[Batch]:
            return model_batches(units, dataset, windows[side], cmd.batch_size, progress=not cmd.quiet,
                                 desc=f"probe {name} ({side})", pool=cmd.pool)

        result = sparse_probe(batches, units.groups, units.per_group, labels, len(dataset.labels), tuple(cmd.ks),
                              cmd.seed, cmd.bootstrap)
        for group in result["groups"]:
            group["layers"] = units.layers(group["group"])
            group["top_units"] = {dataset.labels[label]: top for label, top in group["top_units"].items()}
            for entry in group["binary"].values():
                entry["per_label"] = {dataset.labels[label]: acc for label, acc in entry["per_label"].items()}
        entry = {"name": name, "kind": units.kind, "units_per_group": units.per_group, "groups": result["groups"]}
        for key in ("train_examples", "test_examples", "test_documents"):   # per label name
            entry[key] = dict(zip(report["labels"], result[key], strict=True))
        report["models"].append({**entry, "seconds": round(time.time() - started, 1)})
        report["majority_rate"] = {"binary": 0.5, "multiclass": result["majority_rate"]}
    return report


def probe_command(cmd: ProbeSettings) -> dict[str, Any]:
    """`monet probe`: load the run (and the baseline), check the data fits them, probe, write
    OUT/probe.json and OUT/probe.md; returns the report."""
    device = resolve_device(cmd.device)
    models, seq_len = [], cmd.seq_len
    for name, run in (("run", cmd.run), ("baseline", cmd.baseline)):
        if run is None:
            continue
        checkpoint = resolve_checkpoint(run, verify=not cmd.no_verify)
        if name == "baseline":   # before loading the weights
            expect_kind(read_config(checkpoint), "dense", f"--baseline {run}", "; the baseline is a dense model "
                        "(`monet train --model dense`) whose MLP neurons are compared with the experts")
        check_data_fits(checkpoint, cmd.data)
        model, _ = load_checkpoint(checkpoint, device=device, load_tokenizer=False, verify=False)
        if seq_len is None:
            seq_len = trained_seq_len(checkpoint, model)
        models.append((name, model))
    report = probe_models(models, replace(cmd, seq_len=seq_len))
    report["runs"] = {"run": cmd.run, "baseline": cmd.baseline}
    with output_directory(cmd.out, "probe", cmd.force, "a probe report") as tmp:
        write_json(tmp / REPORT_JSON, report)
        atomic_write(tmp / REPORT_MD, markdown(report))
    return report


# ---------------------------------------------------------------------------------------------- report

def _cell(entry: dict[str, Any]) -> str:
    ci = entry.get("ci95")
    return f"{100 * entry['accuracy']:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables (accuracies in %, 95% bootstrap intervals over test documents)."""
    ks = report["ks"]
    example = ("each window's label from its units' mean activation over the window's tokens"
               if report.get("pool") == "window" else "each token's label from its units' activations")
    lines = [f"Sparse probing on the {report['split']} split, {len(report['labels'])} labels "
             f"({', '.join(report['labels'])}), predicting {example}; held-out accuracy in % [95% interval, "
             "bootstrap over test documents].",
             f"Selection: {report['selection']}. Probe: {report['probe']}.", ""]
    for title, key, chance in (("Binary (label vs rest, balanced), mean over labels", "binary",
                                f"chance = majority rate = {100 * report['chance']['binary']:.0f}%"),
                               ("Multiclass (argmax over the label probes)", "multiclass",
                                f"chance {100 * report['chance']['multiclass']:.1f}%, majority-class rate "
                                f"{100 * report['majority_rate']['multiclass']:.1f}%")):
        columns = [(f"k={k}", key, k) for k in ks]   # (header, result, k)
        if key == "binary":   # and the random control at the largest k
            columns.append((f"random k={ks[-1]}", "random", ks[-1]))
        lines += [f"**{title}** ({chance})", "",
                  "| model | group (layers) | units | " + " | ".join(header for header, _, _ in columns) + " |",
                  "|---|---|---:|" + "---:|" * len(columns)]
        for model in report["models"]:
            for group in model["groups"]:
                cells = " | ".join(_cell(group[result][k]) for _, result, k in columns)
                layers = ",".join(map(str, group["layers"]))
                lines.append(f"| {model['kind']} ({model['name']}) | {group['group']} ({layers}) | "
                             f"{model['units_per_group']:,} | {cells} |")
        lines.append("")
    if report["models"]:
        first = report["models"][0]
        train, test, docs = (first[key].values() for key in ("train_examples", "test_examples", "test_documents"))
        what = "Windows" if report.get("pool") == "window" else "Tokens"
        lines.append(f"{what} per label: {min(train):,}-{max(train):,} train, {min(test):,}-{max(test):,} test, the "
                     f"test ones from {min(docs)}-{max(docs)} documents per label (documents on the train side: "
                     f"{report['documents']['train']}, test side: {report['documents']['test']}).")
        if any(group["binary"][ks[0]]["ci95"] is None for model in report["models"] for group in model["groups"]):
            lines.append("No intervals where a label has fewer than two test documents (or --bootstrap 0).")
    if report["skipped_labels"]:
        lines.append(f"Skipped (fewer than two documents): {', '.join(report['skipped_labels'])}.")
    return "\n".join(lines) + "\n"


__all__ = ["REPORT_JSON", "REPORT_MD", "class_mean_difference", "label_windows", "markdown", "probe_command",
           "probe_models", "sparse_probe", "split_documents"]
