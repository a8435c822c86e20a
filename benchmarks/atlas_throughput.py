"""Atlas throughput at a released shape: tokens/s of `build_atlas` on a randomly initialised monet-vd-850m.

    THREADS=2 PYTHONPATH=<checkout>/src python benchmarks/atlas_throughput.py DATA OUT TOKENS

Run it alternately with two checkouts on PYTHONPATH (e.g. before and after a change) to compare them; it
prints one JSON line (code path, seconds, tokens, tokens/s, load average). Results: docs/performance.md.
"""

import inspect
import json
import os
import sys
import time

import torch

import monet
from monet.data import TokenDataset, load_tokenizer


def build(model, tokenizer, data: str, out: str, **options) -> None:
    """`build_atlas` of whichever layout the checkout has (settings object; before: options + keywords)."""
    try:
        from monet.interp.atlas import build_atlas
        from monet.settings import AtlasBuild, AtlasOptions
    except ImportError:   # the layout before the issue-10 refactor
        from monet.analysis.atlas import AtlasOptions, build_atlas
        AtlasBuild = None
    if AtlasBuild is not None and "settings" in inspect.signature(build_atlas).parameters:
        build_atlas(model, tokenizer, AtlasBuild(run="", data=data, out=out, force=True, quiet=True, **options))
    else:
        build_atlas(model, tokenizer, data, out, AtlasOptions(**options), force=True, progress=False)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    data, out, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tokenizer = load_tokenizer(data)
    vocab = TokenDataset(data, "train").vocab_size
    torch.manual_seed(0)
    config = monet.preset("monet-vd-850m", vocab_size=max(vocab, 512))
    model = monet.MonetForCausalLM(config).eval()
    started = time.perf_counter()
    build(model, tokenizer, data, out, max_tokens=tokens, top_k=10, split="train", batch_size=4, seq_len=256)
    seconds = time.perf_counter() - started
    with open(os.path.join(out, "manifest.json")) as handle:
        manifest = json.load(handle)
    print(json.dumps({"code": monet.__file__, "seconds": round(seconds, 1), "tokens": manifest["tokens"],
                      "tokens_per_s": round(manifest["tokens"] / seconds, 1), "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
