"""Write src/monet/data/code.lock.json: the lock of the code corpus as this machine builds it.

    python benchmarks/unlearning/lock_corpus.py            # the demo's corpus (4.8 MB) and the default (8 MB)

Run it only to move the lock on purpose (new package versions, a new corpus version), commit the file with
the reason, and rerun the seeds it invalidates: a build whose documents differ from the lock is refused
(`--allow-drift` overrides and is recorded). Reads the package cache; `--fetch` downloads what is missing.
"""

from __future__ import annotations

import argparse

from monet.data import collect_documents
from monet.data.code import DEFAULT_LANGUAGES
from monet.data.lock import LOCK_PATH, corpus_entry, entry_hash, write_lock

CONFIGS = ((4_800_000, 0), (8_000_000, 0))   # (max_bytes, seed): `monet demo`, `monet data build --source code`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fetch", action="store_true", help="download missing packages into the cache")
    args = parser.parse_args()
    entries = []
    for max_bytes, seed in CONFIGS:
        documents = collect_documents("code", max_bytes, seed, fetch=args.fetch, progress=False)
        entry = corpus_entry(documents, "code", max_bytes, seed, list(DEFAULT_LANGUAGES))
        entries.append(entry)
        print(f"{max_bytes:,} bytes, seed {seed}: {entry['documents']} documents, lock {entry_hash(entry)[:16]}")
    print(f"wrote {write_lock(entries, LOCK_PATH)}")


if __name__ == "__main__":
    main()
