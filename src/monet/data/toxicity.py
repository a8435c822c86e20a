"""The ``toxicity`` corpus: real English texts scored by a packaged classifier (toxic / non-toxic).

No toxic-comment corpus can be had offline. The texts are gettext msgids, GCIDE definitions, Debian
fortunes and, only with npm ``naughty-words``, template sentences marked ``meta.synthetic`` (docs/data.md
lists them); the labels are ``alt-profanity-check``'s: ``predict_prob`` >= ``THRESHOLD`` means ``toxic``,
and the score is kept in the metadata.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
from pathlib import Path

from monet.data.documents import Document
from monet.data.domains import GCIDE_DICT, GCIDE_PACKAGE, read_gcide
from monet.data.languages import LOCALE_DIR, catalog_entries
from monet.data.packages import find_path, npm_package
from monet.errors import MonetError

THRESHOLD = 0.5
NAUGHTY_WORDS = "naughty-words@1.2.0"
FORTUNES_DIR = "/usr/share/games/fortunes"
TEMPLATES = (
    "{word}! {sentence}",
    "{sentence} You {word}.",
    "What the {word}? {sentence}",
    "{sentence} ... {word} {word}!",
)


def load_scorer():
    """``predict_prob`` from alt-profanity-check, or a MonetError saying how to install it."""
    try:
        from profanity_check import predict_prob
    except ImportError as exc:
        raise MonetError("the toxicity source needs the alt-profanity-check classifier: "
                         "pip install 'monet-lm[toxicity]' (or pip install alt-profanity-check)") from exc
    return predict_prob


def english_messages(locale_dir: str | Path = LOCALE_DIR) -> dict[str, str]:
    """English msgids of the gettext catalogues -> the catalogue they come from. msgids are the same in
    every locale, so only the largest (most completely translated) .mo file of each text domain is read."""
    sized = []
    for path in glob.glob(os.path.join(str(locale_dir), "*", "LC_MESSAGES", "*.mo")):
        with contextlib.suppress(OSError):
            sized.append((os.path.getsize(path), path))
    largest = {Path(path).stem: path for _, path in sorted(sized)}   # the largest file of a domain comes last
    messages: dict[str, str] = {}
    for path in sorted(largest.values()):
        for msgid, _ in catalog_entries(path) or []:
            text = " ".join(msgid.split()) if isinstance(msgid, str) else ""
            if len(text) >= 10 and " " in text and text not in messages:
                messages[text] = f"gettext:{Path(path).stem}"
    return messages


def fortunes(directory: str | Path) -> list[tuple[str, str]]:
    """(text, source) of every fortune in a fortune-file directory (entries separated by ``%``)."""
    found = []
    for path in sorted(glob.glob(os.path.join(str(directory), "*"))):
        if path.endswith(".dat") or os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            entries = Path(path).read_text(encoding="utf-8").split("\n%\n")
        except (OSError, UnicodeDecodeError):
            continue
        for index, entry in enumerate(entries):
            text = entry.strip().strip("%").strip()
            if len(text) >= 10:
                found.append((text, f"fortune:{Path(path).name}:{index}"))
    return found


def naughty_templates(words: list[str], sentences: list[str], seed: int, per_word: int = 2) -> list[tuple[str, dict]]:
    """Synthetic sentences: each listed word placed, by a seeded template, around a real sentence."""
    rng = random.Random(seed)
    pool = sorted(s for s in sentences if len(s.split()) >= 4 and "%" not in s and "{" not in s)
    if not pool:
        return []
    made = []
    for word in sorted(set(words)):
        for _ in range(per_word):
            template = rng.randrange(len(TEMPLATES))
            sentence = pool[rng.randrange(len(pool))]
            text = TEMPLATES[template].format(word=word, sentence=sentence)
            made.append((text, {"synthetic": True, "word": word, "template": template, "base": sentence}))
    return made


def toxicity_documents(
    max_bytes: int, seed: int = 0, *, cache: Path, fetch: bool = False, locale_dir: str | Path = LOCALE_DIR,
    texts: list[tuple[str, str]] | None = None, progress: bool = True,
) -> list[Document]:
    """Score real (and, with naughty-words, template) texts and label them toxic / non-toxic; ``texts``
    ((text, source) pairs) replaces the default inputs, e.g. in tests."""
    del max_bytes, progress
    predict_prob = load_scorer()
    synthetic: list[tuple[str, str, dict]] = []
    if texts is None:
        messages = english_messages(locale_dir)
        texts = list(messages.items())
        gcide = find_path(GCIDE_DICT, [GCIDE_PACKAGE], cache, fetch)
        if gcide is not None:
            texts += [(f"{s.headword}: {s.definition}", f"gcide:{s.offset}") for s in read_gcide(gcide)]
        fortune_dir = find_path(FORTUNES_DIR, ["fortunes", "fortunes-min"], cache, fetch)
        if fortune_dir is not None:
            texts += fortunes(fortune_dir)
        package = npm_package(NAUGHTY_WORDS, cache, fetch)
        if package is not None:
            words = json.loads((package / "en.json").read_text(encoding="utf-8"))
            synthetic = [(text, "naughty-words+gettext", meta)
                         for text, meta in naughty_templates(words, list(messages), seed)]
    items = [(text, source, {}) for text, source in texts] + synthetic
    if not items:
        raise MonetError("no texts to score for the toxicity corpus")
    scores = predict_prob([text for text, _, _ in items])
    return [
        Document(text=text, label="toxic" if score >= THRESHOLD else "non-toxic", source=source,
                 meta={**meta, "score": round(float(score), 4)})
        for (text, source, meta), score in zip(items, scores, strict=True)
    ]
