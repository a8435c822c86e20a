"""The ``domains`` corpus: GCIDE dictionary senses labelled by their subject tag.

GCIDE (Debian ``dict-gcide``) is the 1913 Webster plus later additions in dictd format: an index of
``headword<TAB>offset<TAB>length`` (base64 numbers) into a gzip-compressed text. Many senses start
with a subject tag such as ``(Zool.)`` or ``(Law)``; each tagged sense becomes one document
``"Headword: definition"`` labelled with the domain, and its headword and definition are kept in the
metadata for the headword multiple-choice task.
"""

from __future__ import annotations

import contextlib
import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from monet.data.documents import Document
from monet.data.packages import deb_root, find_path
from monet.errors import MonetError

GCIDE_DICT = "/usr/share/dictd/gcide.dict.dz"
GCIDE_PACKAGE = "dict-gcide"

# domain label -> its GCIDE subject tags (tags of one field are merged).
DOMAIN_TAGS = {
    "anatomy": ("Anat.", "Physiol."),
    "architecture": ("Arch.",),
    "astronomy": ("Astron.",),
    "biology": ("Biol.",),
    "botany": ("Bot.",),
    "chemistry": ("Chem.", "Physiol. Chem."),
    "computing": ("Computers",),
    "geology": ("Geol.", "Min.", "Paleon.", "Crystallog."),
    "grammar": ("Gram.", "Rhet.", "Pros."),
    "law": ("Law", "Scots Law", "Eng. Law", "O. Eng. Law"),
    "mathematics": ("Math.", "Geom."),
    "medicine": ("Med.", "Surg."),
    "military": ("Mil.", "Fort.", "Gun."),
    "music": ("Mus.",),
    "nautical": ("Naut.", "Shipbuilding"),
    "physics": ("Physics", "Mech.", "Elec.", "Opt."),
    "religion": ("Eccl.", "Theol.", "R. C. Ch.", "Eccl. Hist."),
    "zoology": ("Zool.",),
}
TAG_DOMAINS = {tag: domain for domain, tags in DOMAIN_TAGS.items() for tag in tags}

# A source line ("[1913 Webster]"), sometimes followed by a stray headword of the next entry.
_SOURCE_LINE = re.compile(r"^\s*\[[^\]\n]*\]\s*$|^\s*\[[^\]\n]*(?:Webster|PJC|WordNet|Century)[^\]\n]*\].*$",
                          re.MULTILINE)
_TAG = r"\((?P<tag>[A-Z][A-Za-z. ]{1,20})\)"
_SENSE_START = re.compile(r"^\s*(?:\d+\.\s+)?(?:\([a-z]\)\s+)?" + _TAG + r"[,:]?\s+(?P<rest>\S.*)$", re.DOTALL)
_HEADER_TAG = re.compile(_TAG + r",?\s*$")
_NUMBERED = re.compile(r"^\s*\d+\.\s+")
_SUBENTRY = re.compile(r"^\s*\{(?P<head>[^}]{1,60})\}\s*" + _TAG + r"[,:]?\s+(?P<rest>\S.*)$", re.DOTALL)
_DIACRITIC = re.compile(r"\[[=^~.'`\"\-]?([A-Za-z])[=^~.'`\"\-]?\]")
_NAMED_ACCENT = re.compile(r"\[([A-Za-z])(?:mac|sl|um|cir|acute|grave|tilde|cedil|ring|dot|breve)\]")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@dataclass(frozen=True)
class Sense:
    """One dictionary sense: headword, definition text and its subject tag (None when untagged)."""

    headword: str
    definition: str
    tag: str | None
    offset: int


def b64_number(text: str) -> int:
    """Decode dictd's base64 numbers (most significant digit first)."""
    return sum(_B64.index(char) * 64**power for power, char in enumerate(reversed(text)))


def clean(text: str) -> str:
    """Plain text from GCIDE markup: {links} unwrapped, accent codes reduced, whitespace collapsed."""
    text = text.replace("{", "").replace("}", "")
    text = _NAMED_ACCENT.sub(r"\1", _DIACRITIC.sub(r"\1", text.replace("[ae]", "ae").replace("[oe]", "oe")))
    return " ".join(text.split())


def headword_of(chunk: str) -> str:
    """The first headword of an entry: the text before its pronunciation ``\\...\\``."""
    first = chunk.split("\\", 1)[0].split("\n", 1)[0]
    return clean(first).replace('"', "").replace("*", "").replace("`", "").strip(" ,")


def split_header(block: str) -> tuple[str, str]:
    """(header, body) of an entry's first block: the header ends at the first line end outside ( ) and [ ]."""
    depth, pos = 0, 0
    for line in block.splitlines(keepends=True):
        depth += line.count("[") + line.count("(") - line.count("]") - line.count(")")
        pos += len(line)
        if depth <= 0:
            return block[:pos], block[pos:]
    return block, ""


def entry_senses(chunk: str, offset: int) -> Iterator[Sense]:
    """Definitions of one entry (split at the ``[1913 Webster]`` source lines)."""
    headword = headword_of(chunk)
    if not headword:
        return
    blocks = [b for b in _SOURCE_LINE.split(chunk) if b.strip()]
    for index, block in enumerate(blocks):
        if block.startswith("        ") or block.lstrip().startswith(("Syn:", "Note:", "Usage:")):
            continue  # quotations, synonym lists and usage notes are not definitions
        head, tag = headword, None
        if index == 0:
            header, body = split_header(block)
            end = _HEADER_TAG.search(header)
            tag = end["tag"] if end else None
        else:
            sub = _SUBENTRY.match(block)
            if sub:
                head, tag, body = clean(sub["head"]), sub["tag"], sub["rest"]
            elif _NUMBERED.match(block) or _SENSE_START.match(block):
                body = block
            else:
                continue  # a continuation paragraph, not a new sense
        body = _NUMBERED.sub("", body, count=1)
        sense = _SENSE_START.match(body)
        if sense:
            tag, body = sense["tag"], sense["rest"]
        definition = clean(body)
        if len(definition) >= 15:
            yield Sense(headword=head, definition=definition, tag=tag, offset=offset)


def read_gcide(dict_path: Path) -> Iterator[Sense]:
    """Every sense in a dictd GCIDE (the ``.index`` beside the ``.dict.dz`` gives entry boundaries)."""
    index_path = Path(str(dict_path).removesuffix(".dz").removesuffix(".dict") + ".index")
    if not index_path.exists():
        raise MonetError(f"GCIDE index {index_path} is missing; "
                         "reinstall with `apt-get install --reinstall dict-gcide`")
    try:
        data = gzip.decompress(Path(dict_path).read_bytes())   # dictzip is gzip with an index
    except (OSError, EOFError) as exc:
        raise MonetError(f"cannot read {dict_path}: {exc}; reinstall dict-gcide") from exc
    spans: set[tuple[int, int]] = set()
    for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and not parts[0].startswith("00-"):
            with contextlib.suppress(ValueError):   # a malformed line is skipped
                spans.add((b64_number(parts[1]), b64_number(parts[2])))
    for start, length in sorted(spans):
        chunk = data[start : start + length].decode("utf-8", errors="replace")
        yield from entry_senses(chunk, start)


def gcide_path(cache: Path, fetch: bool) -> Path:
    """The GCIDE dictionary file, from the system or the cache; a clear error if absent."""
    found = find_path(GCIDE_DICT, [GCIDE_PACKAGE], cache, fetch)
    if found is None:
        raise MonetError(f"GCIDE is not installed ({GCIDE_DICT} not found, nor under "
                         f"{deb_root(GCIDE_PACKAGE, cache)}). Install it with `apt-get install {GCIDE_PACKAGE}`, "
                         "or rerun with --fetch to unpack it into the cache")
    return found


def domain_documents(
    max_bytes: int, seed: int = 0, *, cache: Path, fetch: bool = False, dict_path: str | Path | None = None,
    progress: bool = True,
) -> list[Document]:
    """One document per tagged GCIDE sense, labelled with its domain (balancing happens later)."""
    del max_bytes, seed  # selection is done by the common balancing step
    path = Path(dict_path) if dict_path else gcide_path(cache, fetch)
    documents = []
    for sense in tqdm(read_gcide(path), desc="gcide", unit=" senses", disable=not progress):
        domain = TAG_DOMAINS.get(sense.tag or "")
        if domain is not None:
            text = f"{sense.headword}: {sense.definition}"
            meta = {"headword": sense.headword, "definition": sense.definition, "tag": sense.tag}
            documents.append(Document(text=text, label=domain, source=f"gcide:{sense.offset}", meta=meta))
    return documents
