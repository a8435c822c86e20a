"""lm-eval tasks: the names a user gives (LABEL=TASK), checked against lm-eval, and a task's documents as text.

Two commands meet lm-eval here. `monet unlearn --lm-eval-task LABEL=TASK` evaluates tasks on an edited model
(`monet.experiments.benchmarks`), and `monet data build --source lm-eval --task LABEL=TASK` turns the tasks'
documents into a labelled corpus, so that a label's experts can be selected on the label's own text, as the
paper selected each MMLU domain's experts (paper §5.1, D.1). A document's text is what lm-eval shows the model
(`doc_to_text`) followed by the gold answer (the target delimiter, then the gold choice or target string).

Which documents: `split` picks the task's training, validation, test or few-shot documents. The default,
validation, keeps the corpus apart from the test items lm-eval evaluates by default; `test` selects experts on
the very items they are then judged on (an evaluation leak, said so in the manifest's options and the docs).
Local YAML tasks load from `include_path` without building lm-eval's index of its ~15,000 tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from monet.data.documents import Document
from monet.errors import MonetError

TASK_SPLITS = ("train", "validation", "test", "fewshot")


def parse_task_specs(specs: Iterable[str], option: str = "--lm-eval-task") -> dict[str, list[str]]:
    """{label: [task, ...]} from LABEL=TASK strings (a label may name several tasks)."""
    tasks: dict[str, list[str]] = {}
    for spec in specs:
        label, sep, task = spec.partition("=")
        if not sep or not label.strip() or not task.strip():
            raise MonetError(f"{option} takes LABEL=TASK (e.g. chemistry=mmlu_college_chemistry), got {spec!r}")
        tasks.setdefault(label.strip(), [])
        if task.strip() not in tasks[label.strip()]:
            tasks[label.strip()].append(task.strip())
    return tasks


def task_manager(include_path: str | Path | None = None, include_defaults: bool = True,
                 option: str = "--lm-eval-include-path") -> Any:
    """lm-eval's TaskManager (with the YAML tasks under `include_path`), with a clear error when lm-eval is missing."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise MonetError("lm-eval tasks need lm-evaluation-harness: pip install 'monet-lm[eval]'") from exc
    if include_path is not None and not Path(include_path).is_dir():
        raise MonetError(f"{option} {include_path} is not a directory of lm-eval task YAML files")
    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)


def check_tasks(tasks: Iterable[str], manager: Any, option: str = "--lm-eval-include-path") -> None:
    """MonetError naming the tasks lm-eval does not know (before any model work)."""
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise MonetError(f"lm-eval does not know the task(s) {', '.join(unknown)}; list them with `lm_eval --tasks "
                         f"list`, or pass {option} DIR for a local YAML task")


def checked_manager(tasks: list[str], include_path: str | Path | None) -> Any:
    """A TaskManager that knows every one of `tasks` (else one clear line). lm-eval's own index of ~15k tasks
    takes a minute to build: it is skipped when the local tasks under `include_path` are all there are."""
    manager = task_manager(include_path, include_defaults=False) if include_path is not None else None
    if manager is None or any(task not in set(manager.all_tasks) for task in tasks):
        manager = task_manager(include_path)
    check_tasks(tasks, manager)
    return manager


def load_tasks(tasks: list[str], manager: Any) -> dict[str, Any]:
    """{task name: lm-eval Task} with a group named in `tasks` expanded into its member tasks."""
    from lm_eval.api.task import Task
    from lm_eval.tasks import get_task_dict

    try:
        loaded = get_task_dict(tasks, manager)
    except Exception as exc:  # a task whose data cannot be loaded (offline, missing file)
        raise MonetError(f"lm-eval could not load the task(s) {', '.join(tasks)}: {exc}") from exc
    found: dict[str, Any] = {}

    def walk(node: Any) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value)
            elif isinstance(value, Task):
                found[getattr(getattr(value, "config", None), "task", None) or str(key)] = value
    walk(loaded)
    return found


def task_documents(task: Any, split: str) -> Iterable[dict]:
    """The task's documents of `split` (train, validation, test or fewshot), or one clear line when it has none."""
    have = [name for name, has in (("train", task.has_training_docs()), ("validation", task.has_validation_docs()),
                                   ("test", task.has_test_docs())) if has]
    docs = None
    if split == "fewshot":
        try:
            docs = task.fewshot_docs()
        except Exception:  # lm-eval raises for tasks without any few-shot source
            docs = None
    elif split in have:
        docs = {"train": task.training_docs, "validation": task.validation_docs, "test": task.test_docs}[split]()
    if docs is None:
        name = task.config.task if hasattr(task, "config") else task
        raise MonetError(f"lm-eval task {name} has no {split} documents; it has: {', '.join(have) or 'none'} "
                         "(choose one with --lm-eval-split)")
    return docs


def document_text(task: Any, doc: dict) -> str:
    """What lm-eval shows the model for `doc`, then the gold answer: doc_to_text + target delimiter + the gold
    choice (multiple choice) or target string (generation)."""
    prompt = task.doc_to_text(doc)
    if not isinstance(prompt, str):
        raise MonetError(f"lm-eval task {task.config.task} gives its prompts as {type(prompt).__name__}, not text "
                         "(a task like winogrande that varies the context); it cannot be read as a corpus")
    target = task.doc_to_target(doc)
    if task.config.output_type == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(target, list):
            target = target[0] if target else None
        answer = choices[target] if isinstance(target, int) and 0 <= target < len(choices) else target
    else:
        answer = target[0] if isinstance(target, list) and target else target
    if answer is None or answer == "":
        return prompt
    return prompt + str(task.config.target_delimiter or "") + str(answer)


def iter_task_documents(specs: dict[str, list[str]], manager: Any, split: str = "validation") -> Iterator[Document]:
    """A labelled document per lm-eval document of each label's tasks (label = the LABEL of LABEL=TASK)."""
    for label, names in specs.items():
        for name, task in load_tasks(names, manager).items():
            count = 0
            for index, doc in enumerate(task_documents(task, split)):
                text = document_text(task, doc)
                if text.strip():
                    count += 1
                    yield Document(text, label, f"lm-eval:{name}:{split}:{index}")
            if count == 0:
                raise MonetError(f"lm-eval task {name} has no {split} documents with text")


__all__ = ["TASK_SPLITS", "check_tasks", "checked_manager", "document_text", "iter_task_documents", "load_tasks",
           "parse_task_specs", "task_documents", "task_manager"]
