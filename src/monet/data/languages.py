"""The ``languages`` corpus: translated strings of gettext catalogues, labelled by human language.

Every Debian machine carries thousands of compiled catalogues (``/usr/share/locale/*/LC_MESSAGES/*.mo``):
real translations of program messages by human translators. The translated strings of one catalogue
are joined line by line and cut into documents of a few KiB; the label is the ISO 639 language code
of the locale directory (``pt_BR`` and ``pt`` are both ``pt``).
"""

from __future__ import annotations

import gettext
import glob
import os
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from monet.data.documents import Document, seeded_key
from monet.errors import MonetError

LOCALE_DIR = "/usr/share/locale"
DEFAULT_LANGUAGES = ("de", "es", "fr", "id", "it", "pl", "ru", "sv", "tr", "uk")
CHUNK_BYTES = 1024


def catalog_entries(path: str | Path) -> list[tuple[str, object]] | None:
    """(msgid, translation) of each entry of a compiled catalogue (one per plural form); None if unreadable."""
    try:
        with open(path, "rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog
    except (OSError, UnicodeDecodeError, ValueError, LookupError, IndexError):
        return None
    return [(key[0] if isinstance(key, tuple) else key, value) for key, value in catalog.items()]


def read_catalog(path: str | Path) -> tuple[list[str], list[str]] | None:
    """(msgids, translations) of a compiled catalogue, without untranslated entries and entries whose
    translation equals the English text; None if it is not a readable .mo file."""
    entries = catalog_entries(path)
    if entries is None:
        return None
    kept = [(msgid, value) for msgid, value in entries if msgid and isinstance(value, str) and value.strip()
            and value != msgid]
    return [msgid for msgid, _ in kept], [value for _, value in kept]


def chunk_lines(lines: list[str], chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Join lines with newlines into pieces of at most ``chunk_bytes`` UTF-8 bytes (a longer line alone)."""
    piece: list[str] = []
    size = 0
    for line in lines:
        length = len(line.encode("utf-8")) + 1
        if piece and size + length > chunk_bytes:
            yield "\n".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += length
    if piece:
        yield "\n".join(piece)


def catalogues(locale_dir: str | Path, languages: tuple[str, ...]) -> dict[str, list[str]]:
    """Paths of the .mo files per language under ``locale_dir``."""
    if not os.path.isdir(locale_dir):
        raise MonetError(f"locale directory {locale_dir} does not exist; gettext catalogues come with Debian packages "
                         "(e.g. `apt-get install coreutils gettext-base`) or pass another directory")
    found: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(str(locale_dir), "*", "LC_MESSAGES", "*.mo"))):
        locale = Path(path).parts[-3]
        language = locale.split("@", 1)[0].split("_", 1)[0].split(".", 1)[0].lower()   # pt_BR, sr@latin -> pt, sr
        if language in languages:
            found.setdefault(language, []).append(path)
    return found


def language_documents(
    max_bytes: int, seed: int = 0, *, cache: Path | None = None, fetch: bool = False,
    locale_dir: str | Path = LOCALE_DIR, languages: tuple[str, ...] | list[str] = DEFAULT_LANGUAGES,
    progress: bool = True,
) -> list[Document]:
    """Documents of translated strings, reading catalogues in seeded order up to each language's budget."""
    del cache, fetch  # everything needed is already on the machine
    found = catalogues(locale_dir, tuple(languages))
    if not found:
        raise MonetError(f"no gettext catalogues for {', '.join(languages)} under {locale_dir}; "
                         "install translated packages (e.g. `apt-get install coreutils`) or choose other languages")
    budget = max(1, max_bytes // len(found))
    documents: list[Document] = []
    with tqdm(total=budget * len(found), unit="B", unit_scale=True, desc="languages", disable=not progress) as bar:
        for language in sorted(found):
            used = 0
            for path in sorted(found[language], key=lambda p: seeded_key(seed, p)):
                read = read_catalog(path)
                lines = [" ".join(t.split()) for t in read[1]] if read else []
                for index, text in enumerate(chunk_lines([x for x in lines if x])):
                    meta = {"chunk": index, "domain": Path(path).stem}
                    documents.append(Document(text=text, label=language, source=path, meta=meta))
                    size = len(text.encode("utf-8"))
                    used += size
                    bar.update(size)
                if used >= budget:
                    break
    return documents
