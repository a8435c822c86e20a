"""The atlas equals a brute-force recomputation; merge of shards equals one pass; queries; bad inputs."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from atlas_fixtures import OPTIONS, atlas_of, build_settings, corpus, load, save_run, tiny_config, window_tokens

from monet.data import TokenDataset
from monet.errors import MonetError
from monet.interp.atlas import (
    BAND_EDGES,
    BUFFER_ROWS,
    CONTEXT_AFTER,
    CONTEXT_BEFORE,
    TABLES,
    GroupStats,
    TopK,
    build_atlas,
    collect,
    merge,
    plan_windows,
    sample_key,
)
from monet.interp.criteria import skewness
from monet.interp.monosemanticity import measure, summarize_atlas
from monet.interp.query import Atlas, parse_expert
from monet.interp.units import KeptRouting, batch_inputs, batches_of


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp()
    data = corpus(base)
    work = tmp_path_factory.mktemp("atlas")
    run = save_run(work / "run", tiny_config(), data, seed=0)
    other = save_run(work / "other", tiny_config(), data, seed=1)
    return {"data": data, "run": run, "other": other, "atlas": atlas_of(run, data, work / "atlas")}


def brute_force(model, dataset, options):
    """Every token's experts from the naive E x E grid of g1_hi g2_hj summed over heads (tiny E only)."""
    windows = plan_windows(dataset.docs, options.seq_len, options.max_tokens)
    scores: dict[int, dict[int, list]] = defaultdict(lambda: defaultdict(list))   # group -> expert -> rows
    for batch in batches_of(windows, options.batch_size):
        ids, valid = batch_inputs(dataset, batch)
        with torch.no_grad():
            out = model(input_ids=ids, output_router_probs=True, use_cache=False)
        routing = [r for r in out.router_probs if r is not None]
        for group, (g1, g2) in enumerate(routing):
            grid = torch.einsum("bthi,bthj->btij", g1.double(), g2.double()).flatten(-2)   # [B, T, N]
            for b, (doc, offset, length) in enumerate(batch):
                for t in range(int(length)):
                    for expert in torch.nonzero(grid[b, t]).flatten().tolist():
                        scores[group][expert].append((float(grid[b, t, expert]), int(doc), int(offset + t)))
    return scores, windows


@pytest.mark.slow
def test_atlas_equals_brute_force(setup):
    model, _ = load(setup["run"])
    dataset = TokenDataset(setup["data"], "validation")
    atlas = Atlas(setup["atlas"], model)
    expected, windows = brute_force(model, dataset, OPTIONS)
    assert atlas.manifest["tokens"] == int(windows[:, 2].sum()) == OPTIONS.max_tokens
    labels = dataset.docs[:, 2]
    k = OPTIONS.top_k
    for group in atlas.groups:
        _, mass = atlas.label_mass(group)
        for expert in range(atlas.num_experts):
            rows = expected[group].get(expert, [])
            stats = atlas.expert(group, expert)
            assert stats["count"] == len(rows)
            want_mass = np.zeros(len(atlas.labels))
            for score, doc, _ in rows:
                want_mass[labels[doc]] += score
            np.testing.assert_allclose(mass[:, expert], want_mass, rtol=1e-5, atol=1e-6)
            assert sum(stats["histogram"]["counts"]) == len(rows)
            naive = {(doc, pos): score for score, doc, pos in rows}
            best = sorted(rows, key=lambda r: (-r[0], r[1], r[2]))[:k]
            got = atlas.top_contexts(group, expert)
            assert len(got) == len(best)
            for rank, (ctx, want) in enumerate(zip(got, best, strict=True)):
                assert ctx["rank"] == rank
                # Same score as the brute force at this rank; the context may differ only within a tie.
                assert naive[(ctx["doc"], ctx["pos"])] == pytest.approx(want[0], abs=1e-6)
                assert ctx["score"] == pytest.approx(want[0], abs=1e-6)
                assert ctx["percent"] == pytest.approx(100 * want[0] / model.config.moe_heads, abs=1e-4)
                assert ctx["tokens"] == window_tokens(dataset, ctx["doc"], ctx["pos"])
                assert ctx["tokens"][ctx["target"]] == ctx["token"] == int(dataset.document(ctx["doc"])[ctx["pos"]])
                assert ctx["label"] == dataset.document_label(ctx["doc"])
            assert len({(c["doc"], c["pos"]) for c in got}) == len(got)


@pytest.mark.slow
def test_values_samples_and_label_counts_equal_brute_force(setup):
    """Every stored context's per-token values are the expert's scores at those tokens (0 where inactive, None
    where the build never ran the token); samples are the S largest hash keys of each (expert, band)."""
    model, _ = load(setup["run"])
    dataset = TokenDataset(setup["data"], "validation")
    atlas = Atlas(setup["atlas"], model)
    assert atlas.version == 2 and atlas.has_values
    expected, windows = brute_force(model, dataset, OPTIONS)
    covered = {(int(d), int(s) + t) for d, s, n in windows for t in range(int(n))}
    labels = dataset.docs[:, 2]
    samples = atlas.manifest["bands"]["samples"]
    assert samples == OPTIONS.samples > 0
    checked = 0
    for group in atlas.groups:
        for expert in range(atlas.num_experts):
            rows = expected[group].get(expert, [])
            at = {(doc, pos): score for score, doc, pos in rows}
            stats = atlas.expert(group, expert)
            want_counts = np.bincount([labels[doc] for _, doc, _ in rows], minlength=len(atlas.labels))
            assert list(stats["label_count"].values()) == want_counts.tolist()
            bands = atlas.band_samples(group, expert)
            contexts = atlas.top_contexts(group, expert) + [c for b in bands for c in b["contexts"]]
            for ctx in contexts:
                doc_tokens = dataset.document(ctx["doc"])
                first = max(0, ctx["pos"] - CONTEXT_BEFORE)
                last = min(len(doc_tokens), ctx["pos"] + CONTEXT_AFTER + 1)
                assert len(ctx["values"]) == len(ctx["tokens"]) == last - first
                for offset, value in enumerate(ctx["values"]):
                    where = (ctx["doc"], first + offset)
                    if where not in covered:
                        assert value is None
                    else:
                        want = 100 * at.get(where, 0.0) / atlas.scale
                        assert value == pytest.approx(want, abs=1e-4), (group, expert, ctx, offset)
                        checked += 1
                assert ctx["values"][ctx["target"]] == pytest.approx(ctx["percent"])
            # Samples: per band with activations, min(S, count) contexts: the largest keys of that band.
            shares = np.array([score for score, _, _ in rows]) / atlas.scale
            band_of = np.clip(np.searchsorted(BAND_EDGES, shares, side="right") - 1, 0, len(BAND_EDGES) - 2)
            assert sum(b["count"] for b in bands) == len(rows)
            for band in bands:
                mine = [(score, doc, pos) for (score, doc, pos), b in zip(rows, band_of, strict=True)
                        if b == band["band"]]
                assert band["count"] == len(mine) and len(band["contexts"]) == min(samples, len(mine))
                keys = sample_key(np.array([d for _, d, _ in mine]), np.array([p for _, _, p in mine]),
                                  np.full(len(mine), expert))
                best = sorted(zip(-keys, [d for _, d, _ in mine], [p for _, _, p in mine], strict=True))[:samples]
                assert {(c["doc"], c["pos"]) for c in band["contexts"]} == {(d, p) for _, d, p in best}
                for c in band["contexts"]:
                    assert band["low_percent"] <= c["percent"] or band["band"] == 0
                    assert c["percent"] <= band["high_percent"] + 1e-9
    assert checked > 1000


@pytest.mark.slow
def test_merge_of_two_shards_equals_one_pass(setup):
    model, _ = load(setup["run"])
    dataset = TokenDataset(setup["data"], "validation")
    windows = plan_windows(dataset.docs, OPTIONS.seq_len, OPTIONS.max_tokens)
    half = (len(windows) // 2 // OPTIONS.batch_size) * OPTIONS.batch_size
    whole, _ = collect(model, dataset, OPTIONS, windows, progress=False)
    first, _ = collect(model, dataset, OPTIONS, windows[:half], progress=False)
    second, _ = collect(model, dataset, OPTIONS, windows[half:], progress=False)
    for one, a, b in zip(whole, first, second, strict=True):
        merged = merge([b, a])
        np.testing.assert_array_equal(merged.count, one.count)
        np.testing.assert_allclose(merged.mass, one.mass, rtol=1e-12)
        np.testing.assert_array_equal(merged.hist, one.hist)
        np.testing.assert_array_equal(merged.label_count, one.label_count)
        for got, want in zip(merged.top.rows(), one.top.rows(), strict=True):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(merged.sample.rows(), one.sample.rows(), strict=True):
            np.testing.assert_array_equal(got, want)
        assert len(one.sample.rows()[0]) > 0


@pytest.mark.slow
def test_one_pass_values_equal_a_second_pass_bitwise(setup, tmp_path, monkeypatch):
    """The values read from the routing the first pass kept (`KeptRouting`) give the same files, byte for byte,
    as running the batches again (KEEP_BYTES = 0, the two-pass build), also when only some batches fit the
    budget; the kept batches are not run again."""
    import monet.interp.atlas as atlas_module

    model, tokenizer = load(setup["run"])
    reruns: list[int] = []
    original = atlas_module.run_windows

    def counting(model, dataset, batches, desc, progress):
        reruns.append(len(batches))
        return original(model, dataset, batches, desc, progress)

    monkeypatch.setattr(atlas_module, "run_windows", counting)
    built = {}
    for name, budget in (("two-pass", 0), ("one-pass", 1 << 40), ("mixed", None)):
        if budget is None:   # room for about half of the batches
            kept: list = []
            collect(model, TokenDataset(setup["data"], "validation"), OPTIONS, progress=False, kept=kept)
            budget = sum(k.nbytes for k in kept[: len(kept) // 2])
        monkeypatch.setattr(atlas_module, "KEEP_BYTES", budget)
        reruns.clear()
        out = tmp_path / name
        build_atlas(model, tokenizer, build_settings(setup["run"], setup["data"], out, force=True))
        built[name] = (out, list(reruns))
    batches = -(-len(plan_windows(TokenDataset(setup["data"], "validation").docs, OPTIONS.seq_len,
                                  OPTIONS.max_tokens)) // OPTIONS.batch_size)
    assert built["two-pass"][1][0] > 0 and built["one-pass"][1] == [0]
    assert 0 < built["mixed"][1][0] < built["two-pass"][1][0] <= batches
    for name in ("one-pass", "mixed"):
        for table in TABLES:
            assert (built[name][0] / table).read_bytes() == (built["two-pass"][0] / table).read_bytes(), (name, table)


def test_kept_routing_rebuilds_the_captured_routing_exactly():
    g1 = torch.zeros(2, 3, 2, 5)
    g1[0, 1, 0, 2], g1[1, 2, 1, 4], g1[0, 0, 1, 1] = 0.25, 1.0, -0.0
    g2 = torch.rand(2, 3, 2, 5) * (torch.rand(2, 3, 2, 5) > 0.5)
    kept = KeptRouting.of([(g1, g2)])
    (lookup,) = kept.lookups()
    np.testing.assert_array_equal(lookup.g1.view(np.int32), g1.numpy().view(np.int32))   # -0.0 stays -0.0
    np.testing.assert_array_equal(lookup.g2, g2.numpy())
    assert kept.nbytes == sum(w.nbytes + v.nbytes for w, v in kept.sides) and len(kept.sides[0][0]) == 3
    # the flat-index gather is the fancy index g1[b, t, :, i] * g2[b, t, :, j] summed over heads, bit for bit
    rng = np.random.default_rng(0)
    b, t, unit = rng.integers(0, 2, 200), rng.integers(0, 3, 200), rng.integers(0, 25, 200)
    g1, g2 = (torch.rand(2, 3, 2, 5) * (torch.rand(2, 3, 2, 5) > 0.3)).numpy(), torch.rand(2, 3, 2, 5).numpy()
    i, j = np.divmod(unit, 5)
    np.testing.assert_array_equal(type(lookup)(g1, g2)(b, t, unit), (g1[b, t, :, i] * g2[b, t, :, j]).sum(-1))


def test_topk_prunes_to_k_with_deterministic_ties(monkeypatch):
    monkeypatch.setattr("monet.interp.atlas.BUFFER_ROWS", 5)   # prune often
    rng = np.random.default_rng(0)
    units, k = 7, 3
    cells = rng.choice(units * 50 * 50, size=400, replace=False)      # distinct (unit, doc, pos)
    unit, doc, pos = cells // 2500, (cells // 50) % 50, cells % 50
    score = rng.integers(0, 6, len(cells)).astype(np.float32)         # many ties
    top = TopK(units, k)
    order = rng.permutation(len(cells))                                # any arrival order
    for s in range(0, len(order), 13):
        chunk = order[s:s + 13]
        top.add(unit[chunk], score[chunk], doc[chunk], pos[chunk])
    got_unit, got_rank, got_score, got_doc, got_pos = top.rows()
    for u in range(units):
        want = sorted((-float(score[i]), int(doc[i]), int(pos[i])) for i in np.flatnonzero(unit == u))[:k]
        mine = got_unit == u
        assert [(-float(a), int(b), int(c)) for a, b, c in
                zip(got_score[mine], got_doc[mine], got_pos[mine], strict=True)] == want
        assert got_rank[mine].tolist() == list(range(len(want)))
    assert BUFFER_ROWS > 5


def test_group_stats_bounded_memory():
    stats = GroupStats(units=1000, num_labels=3, top_k=4, scale=2.0)
    rng = np.random.default_rng(1)
    for step in range(20):
        n = 5000
        stats.add(rng.integers(0, 1000, n), rng.random(n), rng.integers(0, 3, n), np.full(n, step), np.arange(n))
    assert len(stats.top.rows()[0]) <= 1000 * 4
    assert stats.count.sum() == 20 * 5000 == stats.hist.sum()


def test_queries(setup):
    atlas = Atlas(setup["atlas"])
    assert atlas.labels and atlas.groups == [0, 1] and atlas.num_experts == 64
    group, expert = max(((g, e) for g in atlas.groups for e in range(64)),
                        key=lambda ge: atlas.expert(*ge)["count"])
    top = atlas.top_contexts(group, expert, 2)
    assert len(top) == 2 and top[0]["score"] >= top[1]["score"]
    hits = atlas.experts_for_token(top[0]["token"])
    assert any(h["group"] == group and h["expert"] == expert for h in hits)
    piece_hits = atlas.experts_for_token(atlas.piece(top[0]["token"]))
    assert {(h["group"], h["expert"]) for h in hits} <= {(h["group"], h["expert"]) for h in piece_hits} | set()
    labels, mass = atlas.label_mass(group)
    assert labels == atlas.labels and mass.shape == (len(labels), 64) and mass.dtype == np.float64
    label = labels[int(np.argmax(mass.sum(axis=1)))]
    ranked = atlas.experts_for_label(label, n=5, min_count=1)
    prob = atlas.label_probability(ranked[0]["group"])
    assert ranked[0]["skewness"] == pytest.approx(skewness(prob, labels.index(label))[ranked[0]["expert"]])
    assert [r["skewness"] for r in ranked] == sorted((r["skewness"] for r in ranked), reverse=True)
    summary = summarize_atlas(atlas, min_count=1)
    assert len(summary) == 2 and 0 < summary[0]["mean_purity"] <= 1


def test_cli_query_and_json(setup, capsys):
    from monet.cli import main

    def call(*argv):
        return main(list(argv))

    assert call("atlas", "query", str(setup["atlas"]), "--expert", "0:1", "--top", "2") == 0
    out = capsys.readouterr().out
    assert "expert 0:1" in out and "[[" in out and "%" in out and "labels:" in out and "\nband " in out
    assert call("atlas", "query", str(setup["atlas"]), "--contains", "IN", "--top", "3") == 0
    out = capsys.readouterr().out
    assert "vocabulary tokens contain 'IN'" in out and "of its top contexts on" in out
    assert call("atlas", "query", str(setup["atlas"]), "--contains", "in", "--token", "x") == 2
    assert "exactly one of" in capsys.readouterr().err
    assert call("atlas", "query", str(setup["atlas"]), "--label", "python", "--json") == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
    assert call("atlas", "query", str(setup["atlas"]), "--text", "int main(void)", "--run", str(setup["run"])) == 0
    assert "'int'" in capsys.readouterr().out
    assert call("atlas", "query", str(setup["atlas"]), "--text", "x") == 2
    assert "--text needs the model" in capsys.readouterr().err
    assert call("atlas", "--help") == 0 and "monet atlas query" in capsys.readouterr().out


def test_bad_inputs(setup, tmp_path):
    with pytest.raises(MonetError, match="no atlas at"):
        Atlas(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    with pytest.raises(MonetError, match="not a complete atlas"):
        Atlas(tmp_path / "half")
    other, _ = load(setup["other"])
    with pytest.raises(MonetError, match="different model"):
        Atlas(setup["atlas"], other)
    atlas = Atlas(setup["atlas"])
    for bad in ("0:64", "2:1", "0:-1", "zero:1", "0", "0:1:2"):
        with pytest.raises(MonetError):
            parse_expert(bad, atlas)
    with pytest.raises(MonetError, match="unknown expert"):
        atlas.top_contexts(0, 10**6)
    with pytest.raises(MonetError, match="unknown label 'klingon'"):
        atlas.experts_for_label("klingon")
    with pytest.raises(MonetError, match="no vocabulary token"):
        atlas.experts_for_token("\u2603\u2603\u2603 not a token")
    model, tokenizer = load(setup["run"])
    from monet.interp.atlas import build_atlas

    with pytest.raises(MonetError, match="already exists"):
        build_atlas(model, tokenizer, build_settings(setup["run"], setup["data"], setup["atlas"]))
    with pytest.raises(MonetError, match="top-k"):
        build_atlas(model, tokenizer, build_settings(setup["run"], setup["data"], tmp_path / "a", top_k=0))
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.tmp").exists()


def test_dense_neurons_and_monosemanticity(setup):
    """The same build measures a dense LLaMA baseline: units are MLP neurons scored by relu(act(g) * up)."""
    from monet.model import MonetForCausalLM

    torch.manual_seed(0)
    dense = MonetForCausalLM(tiny_config(mlp_type="dense")).eval()
    dataset = TokenDataset(setup["data"], "validation")
    report = measure(dense, dataset, max_tokens=600, seq_len=32, min_count=1, progress=False)
    assert report["kind"] == "dense" and len(report["groups"]) == 4 and report["groups"][0]["units"] == 64
    stats, tokens = collect(dense, dataset, OPTIONS.__class__(max_tokens=200, top_k=2, seq_len=32), progress=False)
    ids = torch.from_numpy(np.asarray(dataset.document(int(plan_windows(dataset.docs, 32, 200)[0, 0]))[:32],
                                      dtype=np.int64))[None]
    acts = []
    mlp = dense.model.layers[0].mlp
    hook = mlp.register_forward_hook(
        lambda m, a, o: acts.append(torch.relu(m.act(m.gate_proj(a[0])) * m.up_proj(a[0]))))
    with torch.no_grad():
        dense(ids)
    hook.remove()
    first = acts[0][0]
    top_neuron = int(first.max(dim=0).values.argmax())
    assert stats[0].count[top_neuron] >= int((first[:, top_neuron] > 0).sum())
    monet_report = measure(load(setup["run"])[0], dataset, max_tokens=600, seq_len=32, min_count=1, progress=False)
    assert monet_report["kind"] == "monet" and monet_report["groups"][0]["units"] == 64


def test_windows_balance_labels_whatever_the_document_lengths():
    # label 0: one long document; label 1: many short ones; label 2: one short document.
    docs = np.array([[0, 1000, 0]] + [[1000 + 10 * k, 1010 + 10 * k, 1] for k in range(50)] + [[1500, 1530, 2]])
    windows = plan_windows(docs, seq_len=16, max_tokens=200)
    assert int(windows[:, 2].sum()) == 200
    per_label = {label: int(windows[docs[windows[:, 0], 2] == label, 2].sum()) for label in (0, 1, 2)}
    assert per_label[2] == 30                       # the small label is covered completely
    assert abs(per_label[0] - per_label[1]) <= 16   # the others share the rest evenly


def format1_copy(atlas: Path, out: Path) -> Path:
    """The atlas as format 1 wrote it: no values, samples, per-label counts or table hashes; 10 histogram bins."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shutil.copytree(atlas, out)
    (out / "samples.parquet").unlink()
    contexts = pq.read_table(out / "contexts.parquet")
    pq.write_table(contexts.drop_columns(["values"]), out / "contexts.parquet")
    experts = pq.read_table(out / "experts.parquet")
    hist = [c for c in experts.column_names if c.startswith("hist_")]
    coarse = {f"hist_{b:02d}": pc.add(pc.add(experts[hist[4 * b]], experts[hist[4 * b + 1]]),
                                       pc.add(experts[hist[4 * b + 2]], experts[hist[4 * b + 3]])) for b in range(10)}
    experts = experts.drop_columns(hist + [c for c in experts.column_names if c.startswith("count_")])
    for name, column in coarse.items():
        experts = experts.append_column(name, column)
    pq.write_table(experts, out / "experts.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("tables", "bands", "seconds"):
        manifest.pop(key)
    manifest.update(format_version=1, hist_edges=BAND_EDGES.tolist())
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_format1_atlases_are_still_read(setup, tmp_path):
    old = Atlas(format1_copy(setup["atlas"], tmp_path / "v1"))
    new = Atlas(setup["atlas"])
    assert old.version == 1 and not old.has_values
    ctx = old.top_contexts(0, 1)
    assert [c["tokens"] for c in ctx] == [c["tokens"] for c in new.top_contexts(0, 1)]
    assert all(c["values"] is None for c in ctx)
    assert old.band_samples(0, 1) == []
    stats = old.expert(0, 1)
    assert stats["label_count"] is None and len(stats["histogram"]["counts"]) == 10
    assert sum(stats["histogram"]["counts"]) == new.expert(0, 1)["count"]


def test_damaged_tables_are_refused_with_the_file_named(setup, tmp_path, capsys):
    from monet.cli import main

    truncated = tmp_path / "truncated"
    shutil.copytree(setup["atlas"], truncated)
    data = (truncated / "contexts.parquet").read_bytes()
    (truncated / "contexts.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(MonetError, match=r"contexts\.parquet is damaged: .* bytes where the build wrote"):
        Atlas(truncated)
    flipped = tmp_path / "flipped"
    shutil.copytree(setup["atlas"], flipped)
    data = bytearray((flipped / "experts.parquet").read_bytes())
    data[len(data) // 3] ^= 0xFF
    (flipped / "experts.parquet").write_bytes(bytes(data))
    with pytest.raises(MonetError, match=r"experts\.parquet is damaged: its SHA-256 differs"):
        Atlas(flipped)
    old = format1_copy(setup["atlas"], tmp_path / "old")   # format 1 has no hashes: the Parquet footer is checked
    data = (old / "vocab.parquet").read_bytes()
    (old / "vocab.parquet").write_bytes(data[:-20])
    with pytest.raises(MonetError, match=r"vocab\.parquet is not a readable Parquet file"):
        Atlas(old)
    for argv in (["atlas", "query", str(truncated), "--expert", "0:1"], ["view", str(truncated), "--port", "0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "contexts.parquet is damaged" in err and "Traceback" not in err


def test_top_k_row_order_is_the_four_key_sort_with_a_sorted_table_first():
    """`atlas._order` (one int64 key, then ties by (doc, pos)) equals lexsort by (unit, -score, doc, pos), when the
    rows start with an already ordered table (as in a prune) and carry many tied scores and repeated units."""
    from monet.interp.atlas import _order

    rng = np.random.default_rng(3)
    unit = rng.integers(0, 50, 5000)
    score = rng.choice(np.float32([0.5, 0.25, 1e-3, 3.0, 7e-8]), 5000)
    doc, pos = rng.integers(0, 40, 5000), rng.integers(0, 64, 5000)
    table = np.lexsort((pos[:2000], doc[:2000], -score[:2000], unit[:2000]))   # an ordered table first
    unit[:2000], score[:2000], doc[:2000], pos[:2000] = unit[table], score[table], doc[table], pos[table]
    want = np.lexsort((pos, doc, -score, unit))
    np.testing.assert_array_equal(_order(unit, score, doc, pos), want)
