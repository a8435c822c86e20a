"""Data: labelled offline corpora, a local byte-level tokenizer, memory-mapped token storage.

Typical use::

    from monet.data import build_corpus, TokenDataset, PackedSequences, load_tokenizer
    path = build_corpus("code", "runs/data/code")          # or `monet data build --source code`
    train = PackedSequences(TokenDataset(path, "train"), seq_len=256)
    x = train[0]                                           # LongTensor [257]: inputs x[:-1], targets x[1:]
"""

from monet.data.build import SOURCES, build_corpus, collect_documents
from monet.data.documents import Document, content_hash, split_of
from monet.data.packages import cache_dir
from monet.data.storage import PackedSequences, TokenDataset, read_manifest
from monet.data.tokenizer import load_tokenizer

__all__ = ["SOURCES", "Document", "PackedSequences", "TokenDataset", "build_corpus", "cache_dir", "collect_documents",
           "content_hash", "load_tokenizer", "read_manifest", "split_of"]
