"""The paper's metric for unlearning: benchmark accuracy of the edited model (paper §5, Figure 3 and Table 3).

`monet unlearn ... --lm-eval-task LABEL=TASK` masks each label's experts, evaluates every named lm-eval task on
the edited model *in memory* (lm-eval's `HFLM` wraps our model object; the mask is the same context manager the
loss protocol uses, so no weights are copied), and reports the accuracy matrix (masked label x task): accuracy
before and after, Δ accuracy with a paired bootstrap 95 % CI over the task's items, and the same random-mask
control as the loss protocol (masks of as many experts per group, drawn from the experts the atlas saw), each
measured on the same items. Local YAML tasks (e.g. `dataset_path: json` on a local file) load with
`--lm-eval-include-path DIR`; nothing is downloaded unless a named task needs its data from the hub.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from monet.data.tasks import checked_manager, parse_task_specs
from monet.errors import MonetError
from monet.experiments.protocol_stats import random_masks
from monet.interp.criteria import Selection
from monet.interp.units import units_of

BOOTSTRAP_ROUNDS = 1000
HEATMAP = "lm_eval_heatmap.png"


class Benchmark:
    """The tasks to evaluate (checked against lm-eval before any model work) and which label names which."""

    def __init__(self, task_specs: dict[str, list[str]], manager: Any):
        self.task_specs, self.manager = task_specs, manager
        self.tasks = list(dict.fromkeys(task for label_tasks in task_specs.values() for task in label_tasks))
        self._task_dict: Any = None

    def task_dict(self) -> Any:
        """lm-eval's loaded tasks (their documents read once, reused by every evaluation)."""
        if self._task_dict is None:
            from lm_eval.tasks import get_task_dict

            try:
                self._task_dict = get_task_dict(self.tasks, self.manager)
            except Exception as exc:  # a task whose data cannot be loaded (offline, missing file)
                raise MonetError(f"lm-eval could not load the task(s) {', '.join(self.tasks)}: {exc}") from exc
        return self._task_dict


def prepare_benchmark(specs: Iterable[str], include_path: str | Path | None, targets: list[str]) -> Benchmark | None:
    """None without --lm-eval-task; else the parsed, checked tasks (unknown task or label: one clear line)."""
    specs = list(specs)
    if not specs:
        if include_path is not None:
            raise MonetError("--lm-eval-include-path goes with --lm-eval-task LABEL=TASK")
        return None
    task_specs = parse_task_specs(specs)
    missing = [label for label in task_specs if label not in targets]
    if missing:
        raise MonetError(f"--lm-eval-task names label(s) {', '.join(missing)} that are not unlearned here; "
                         f"the labels are: {', '.join(targets)}")
    benchmark = Benchmark(task_specs, None)
    benchmark.manager = checked_manager(benchmark.tasks, include_path)
    return benchmark


def item_accuracies(model: nn.Module, tokenizer: Any, benchmark: Benchmark, batch_size: int = 16,
                    limit: int | None = None) -> dict[str, np.ndarray]:
    """Per-item accuracy (0/1, in document order) of each task on the model as it is now (edits included)."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    previous = logging.getLogger("lm_eval").level
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        out = evaluate(lm=lm, task_dict=benchmark.task_dict(), limit=limit, bootstrap_iters=0, log_samples=True,
                       verbosity="ERROR")
    finally:
        logging.getLogger("lm_eval").setLevel(previous)
    result = {}
    for task in benchmark.tasks:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        if not samples or "acc" not in samples[0]:
            raise MonetError(f"lm-eval task {task} reports no per-item `acc` (use a multiple-choice task)")
        result[task] = np.array([float(s["acc"]) for s in samples])
    return result


def paired_ci(before: np.ndarray, after: np.ndarray, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of mean(after - before), resampling items."""
    diff = after - before
    if len(diff) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(rounds, len(diff)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def unlearning_accuracy(model: nn.Module, tokenizer: Any, targets: list[str], select: Callable[[str], Selection],
                        seen: list[np.ndarray], benchmark: Benchmark, random_count: int = 5, batch_size: int = 16,
                        limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The accuracy matrix: for each masked label (its operating-point selection), every task's accuracy
    before and after, Δ with a 95 % CI over items, and `random_count` random masks of the same size."""
    tasks, task_specs = benchmark.tasks, benchmark.task_specs
    before = item_accuracies(model, tokenizer, benchmark, batch_size, limit)
    result: dict[str, Any] = {
        "tasks": tasks, "task_of_label": task_specs, "limit": limit, "random_masks": random_count,
        "metric": "accuracy (lm-eval `acc`); delta = masked - unmasked on the same items; 95 % CI: paired "
                  "bootstrap over items; random: masks of as many experts per group, drawn from the experts the "
                  "atlas saw, on the same items",
        "before": {task: {"accuracy": float(acc.mean()), "items": len(acc)} for task, acc in before.items()},
        "masked": {},
    }
    for target in [label for label in targets if label in task_specs]:
        selection = select(target)
        if selection.total == 0:
            result["masked"][target] = {"masked_experts": 0, "note": "no expert selected"}
            continue
        with units_of(model).masked(selection):
            after = item_accuracies(model, tokenizer, benchmark, batch_size, limit)
        controls = []
        for ids in random_masks(selection.counts(), seen, n=random_count, seed=seed) if random_count else []:
            control = Selection(selection.units_per_group, selection.groups, ids, criterion="random (seen units)")
            with units_of(model).masked(control):
                controls.append(item_accuracies(model, tokenizer, benchmark, batch_size, limit))
        entry: dict[str, Any] = {"masked_experts": int(selection.total), "tasks": {}}
        for task in tasks:
            deltas = [float((c[task] - before[task]).mean()) for c in controls]
            entry["tasks"][task] = {
                "accuracy": float(after[task].mean()),
                "delta": float((after[task] - before[task]).mean()),
                "delta_ci95": paired_ci(before[task], after[task], seed=seed),
                "random_deltas": deltas,
                "random_mean": float(np.mean(deltas)) if deltas else None,
                "random_p05": float(np.percentile(deltas, 5)) if deltas else None,
                "own_task": task in task_specs[target],
            }
        result["masked"][target] = entry
    return result


def accuracy_matrix(result: dict[str, Any]) -> tuple[list[str], list[str], np.ndarray]:
    """(masked labels, tasks, Δ accuracy [label, task]) for the heatmap; nan where nothing was masked."""
    labels, tasks = list(result["masked"]), list(result["tasks"])
    matrix = np.full((len(labels), len(tasks)), np.nan)
    for i, label in enumerate(labels):
        for j, task in enumerate(tasks):
            cell = result["masked"][label].get("tasks", {}).get(task)
            if cell is not None:
                matrix[i, j] = cell["delta"]
    return labels, tasks, matrix


def plot_accuracy_heatmap(result: dict[str, Any], path: Path) -> None:
    """Figure-3-style heatmap: Δ accuracy (percentage points) of every task when each label's experts are masked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, tasks, matrix = accuracy_matrix(result)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tasks), 1.0 + 0.5 * len(labels)))
    bound = max(1e-6, float(np.nanmax(np.abs(matrix))) * 100) if np.isfinite(matrix).any() else 1.0
    image = ax.imshow(matrix * 100, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("masked label")
    for i in range(len(labels)):
        for j in range(len(tasks)):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j] * 100:+.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="Δ accuracy (points)")
    ax.set_title("accuracy change when a label's experts are deleted")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
