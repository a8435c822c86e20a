"""VisionMonet (paper B.3): a tiny tower + tiny Monet fine-tune on image–caption pairs, save, reload, caption."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from atlas_fixtures import save_run, tiny_config
from PIL import Image
from runs import weights
from safetensors.torch import load_file, save_file

from monet.data.images import read_pairs, write_pairs
from monet.errors import MonetError
from monet.settings import VisionTrainSettings
from monet.vision import VisionMonetForCausalLM, caption, collate_pairs, load_vision, train_vision

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 30)}


@pytest.fixture(scope="module")
def text_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_run(tmp_path_factory.mktemp("vision") / "text", tiny_config(), corpus)


@pytest.fixture(scope="module")
def pairs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 images 16x16: a coloured square on white, captioned with its colour and shape."""
    images, texts, groups = [], [], []
    for n in range(16):
        name = list(COLOURS)[n % 4]
        image = np.full((16, 16, 3), 255, dtype=np.uint8)
        lo = 2 + n // 4
        image[lo : lo + 8, lo : lo + 8] = COLOURS[name]
        images.append(image)
        texts.append(f"a {name} square")
        groups.append(name)
    out = tmp_path_factory.mktemp("vision") / "pairs"
    return write_pairs(out, np.stack(images), texts, groups, corpus, splits=["train"] * 16)


def settings(pairs: Path, text_run: Path, out: Path, **values) -> VisionTrainSettings:
    base = dict(data=str(pairs), out=str(out), init_from=str(text_run), max_steps=3, batch_size=4, seq_len=24,
                image_size=16, patch_size=8, vision_width=32, lr=1e-2, warmup_steps=1, eval_interval=0,
                save_interval=2, quiet=True, device="cpu")
    return VisionTrainSettings(**{**base, **values})


def router_keys(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if ".router.w1." in k or ".router.w2." in k}


@pytest.mark.parametrize("tower", ["patch", "clip"])
def test_fine_tune_freezes_routers_saves_reloads_and_captions(pairs: Path, text_run: Path, tmp_path: Path,
                                                             tower: str) -> None:
    summary = train_vision(settings(pairs, text_run, tmp_path / "run", vision_tower=tower))
    checkpoint = Path(summary["checkpoint"])
    before = weights(Path(text_run) / "checkpoints" / "step-0000001")
    after = weights(checkpoint)
    # B.2/B.3: the routers' key matrices are bitwise those of the text model; the rest of the model learned.
    frozen = router_keys(after, "language_model.")
    assert frozen and frozen.keys() == router_keys(before).keys()
    assert all(torch.equal(frozen[k], before[k]) for k in frozen)
    assert not torch.equal(after["language_model.lm_head.weight"], before["lm_head.weight"])
    assert any(k.startswith("vision_tower.") for k in after) and "projector.0.weight" in after

    model, tokenizer = load_vision(tmp_path / "run")
    assert model.config.num_image_tokens == 4
    batch = collate_pairs([(read_pairs(pairs).images[n], [1, 50, 60, 2]) for n in range(3)], model.config, 24, 3)
    again_dir = tmp_path / "again"
    model.save_pretrained(again_dir)
    again = VisionMonetForCausalLM.from_pretrained(again_dir).eval()
    with torch.no_grad():
        first, second = model(**batch).logits, again(**batch).logits
    assert torch.equal(first, second)
    # Images matter: another image changes the caption's logits.
    with torch.no_grad():
        swapped = model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)}).logits
    assert not torch.allclose(first[0], swapped[0])

    texts = caption(model, tokenizer, read_pairs(pairs).images[:2], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_resume_is_exact(pairs: Path, text_run: Path, tmp_path: Path) -> None:
    """Resuming from the step-2 checkpoint (the step-4 one deleted) gives bitwise the weights of the whole run."""
    whole = train_vision(settings(pairs, text_run, tmp_path / "run", max_steps=4, keep_last=0))
    final = Path(whole["checkpoint"])
    expected = weights(final)
    shutil.rmtree(final)
    resumed = train_vision(settings(pairs, text_run, tmp_path / "run", max_steps=4, keep_last=0))
    assert resumed["resumed_from"] == 2
    got = weights(Path(resumed["checkpoint"]))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_strict_loading_and_placeholder_count(pairs: Path, text_run: Path, tmp_path: Path) -> None:
    summary = train_vision(settings(pairs, text_run, tmp_path / "run", max_steps=1))
    model, _ = load_vision(tmp_path / "run")
    model.save_pretrained(tmp_path / "copy")
    tensors = load_file(tmp_path / "copy" / "model.safetensors")
    del tensors["projector.0.weight"]
    save_file(tensors, tmp_path / "copy" / "model.safetensors")
    with pytest.raises(MonetError, match="projector.0.weight"):
        VisionMonetForCausalLM.from_pretrained(tmp_path / "copy")
    with pytest.raises(MonetError, match="not a VisionMonet"):
        VisionMonetForCausalLM.from_pretrained(Path(text_run) / "checkpoints" / "step-0000001")
    ids = torch.tensor([[1, 5, 6, 7]])   # no placeholder tokens
    with pytest.raises(MonetError, match="image placeholder"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 16, 16))
    assert summary["steps"] == 1


def test_rasterise_and_caption_corpus(tmp_path: Path) -> None:
    """An SVG is drawn onto white at the asked size; a caption corpus loads as a training dataset."""
    from monet.data import TokenDataset
    from monet.data.images import rasterise, write_text_corpus

    svg = tmp_path / "half.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10">'
                   '<rect x="0" y="0" width="5" height="10" fill="#ff0000"/></svg>', encoding="utf-8")
    image = rasterise([svg], 8)
    assert image.shape == (1, 8, 8, 3) and image.dtype == np.uint8
    assert tuple(image[0, 4, 1]) == (255, 0, 0) and tuple(image[0, 4, 6]) == (255, 255, 255)
    texts = [f"{c} {s}" for c in COLOURS for s in ("square", "circle", "star", "heart", "moon")] * 3
    labels = [t.split()[0] for t in texts]
    corpus = write_text_corpus(tmp_path / "text", texts, labels, ["validation" if n % 5 == 0 else "train"
                                                                  for n in range(len(texts))])
    train_set = TokenDataset(corpus, "train")
    assert train_set.num_documents == 48 and train_set.labels == sorted(COLOURS)


def test_command_line_trains_and_captions(pairs: Path, text_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from monet.cli import main

    run = tmp_path / "run"
    assert main(["vision", "train", "--data", str(pairs), "--out", str(run), "--init-from", str(text_run),
                 "--max-steps", "1", "--batch-size", "2", "--seq-len", "16", "--image-size", "16", "--eval-interval",
                 "0", "--device", "cpu", "--quiet"]) == 0
    image = tmp_path / "red.png"
    Image.fromarray(read_pairs(pairs).images[0]).save(image)
    assert main(["vision", "caption", str(run), "--image", str(image), "--max-new-tokens", "3"]) == 0
    assert f"{image}: " in capsys.readouterr().out
    assert main(["vision", "caption", str(Path(text_run)), "--image", str(image)]) != 0   # a text-only Monet


def test_a_local_hugging_face_tower_is_loaded_and_kept_frozen(pairs: Path, text_run: Path, tmp_path: Path) -> None:
    """--vision-tower DIR: a saved CLIPVisionModel (as a download of openai/clip-vit-base-patch16 would be) is
    used as it is and not trained (LLaVA), while the projector and the language model learn."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2))
    tower.save_pretrained(tmp_path / "clip")
    summary = train_vision(settings(pairs, text_run, tmp_path / "run", vision_tower=str(tmp_path / "clip")))
    after = weights(Path(summary["checkpoint"]))
    original = tower.state_dict()
    for key, value in original.items():
        assert torch.equal(after[f"vision_tower.{key}"], value), key
    model, _ = load_vision(tmp_path / "run")
    assert model.config.vision_config.model_type == "clip_vision_model" and model.config.num_image_tokens == 4


@pytest.mark.slow
def test_image_examples_page_in_headless_chromium(pairs: Path, text_run: Path, tmp_path: Path) -> None:
    """An expert's top images (the patch outlined) and top captions (the token marked), shown in Chromium."""
    import os
    import shutil as sh

    from monet.interp.image_examples import top_examples, write_image_atlas
    from monet.vision import tokenize_captions

    train_vision(settings(pairs, text_run, tmp_path / "run", max_steps=1))
    model, tokenizer = load_vision(tmp_path / "run")
    data = read_pairs(pairs)
    captions = tokenize_captions(tokenizer, data.texts)
    examples = top_examples(model, tokenizer, data.images, captions, top_k=3, batch=5)
    assert examples.image_scores.shape[-1] == 3 and (examples.image_scores[..., 0] > 0).any()
    patches = examples.image_refs[..., 1][examples.image_scores > 0]
    assert patches.min() >= 0 and patches.max() < model.config.num_image_tokens
    # The recorded patch is really the expert's best patch of that image (checked against a direct forward).
    group, expert = np.unravel_index(int(np.argmax(examples.image_scores[..., 0])), examples.image_scores.shape[:2])
    image, patch = examples.image_refs[group, expert, 0]
    from monet.interp.capture import capture_routing
    from monet.vision import image_prompt, pixels

    ids = torch.tensor([image_prompt(model.config, tokenizer.bos_token_id)])
    with torch.no_grad(), capture_routing(model.language_model) as capture:
        model(input_ids=ids, pixel_values=pixels(data.images[image : image + 1], model.config), use_cache=False)
        token, ids_, score = capture.experts(int(group)).entries()
    scores = torch.zeros(ids.shape[1])
    scores.index_add_(0, token[ids_ == expert], score[ids_ == expert].float())
    assert int(scores[1:].argmax()) == patch
    assert float(scores[1:].max()) == pytest.approx(float(examples.image_scores[group, expert, 0]), rel=1e-5)

    page_file = write_image_atlas(examples, data.images, captions, tokenizer, tmp_path / "atlas", names=data.texts)
    chromium = sh.which("chromium") or sh.which("chromium-browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(page_file.as_uri())
        first = page.locator("section.expert").first
        assert first.locator(".tile").count() >= 1
        assert first.locator(".tile .patch").count() == first.locator(".tile").count()
        assert first.locator(".captions mark").count() == first.locator(".captions li").count() >= 1
        loaded = page.eval_on_selector("section.expert img", "img => img.complete && img.naturalWidth")
        assert loaded == 16
        shots = Path(os.environ.get("MONET_SCREENSHOT", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "vision-image-examples.png"), full_page=True)
        browser.close()


def test_token_pieces_keep_characters_split_over_tokens_whole(corpus: Path) -> None:
    from monet.data.tokenizer import load_tokenizer
    from monet.interp.image_examples import token_pieces

    tokenizer = load_tokenizer(corpus)
    text = "Japanese “vacancy” button 🐍"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# ------------------------------------------------------------------------------ image tokens in the atlas


@pytest.fixture(scope="module")
def vision_atlas(pairs: Path, text_run: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Path, Path]:
    """(vision run, its atlas built by `monet atlas build RUN --data CORPUS --images PAIRS`)."""
    from monet.cli import main

    base = tmp_path_factory.mktemp("vision-atlas")
    train_vision(settings(pairs, text_run, base / "run", max_steps=1))
    assert main(["atlas", "build", str(base / "run"), "--data", str(corpus), "--out", str(base / "atlas"), "--images",
                 str(pairs), "--max-tokens", "1500", "--top-k", "3", "--batch-size", "4", "--device", "cpu",
                 "--quiet"]) == 0
    return base / "run", base / "atlas"


def patch_scores(model, tokenizer, images: np.ndarray, batch: int) -> list[np.ndarray]:
    """Oracle: per group, the dense [images, P, N] table of every expert's score at every patch (images alone)."""
    from monet.interp.capture import capture_routing
    from monet.vision import image_prompt, pixels

    prompt = image_prompt(model.config, tokenizer.bos_token_id)
    count, experts = model.config.num_image_tokens, model.config.text_config.moe_experts ** 2
    out = [np.zeros((len(images), count, experts), np.float32)
           for _ in range(model.config.text_config.num_routing_groups)]
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        with torch.no_grad(), capture_routing(model.language_model) as capture:
            model(input_ids=torch.tensor([prompt] * len(chunk)), pixel_values=pixels(chunk, model.config),
                  use_cache=False)
            for group, table in enumerate(out):
                token, expert, score = (t.numpy() for t in capture.experts(group).entries())
                row, position = np.divmod(token, len(prompt))
                patch = position - (len(prompt) - count)
                keep = patch >= 0   # not <s>
                table[start + row[keep], patch[keep], expert[keep]] = score[keep]
    return out


def test_atlas_build_records_image_patches_beside_text(vision_atlas: tuple[Path, Path], pairs: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from monet.cli import main
    from monet.interp.query import Atlas

    run, path = vision_atlas
    atlas = Atlas(path)   # verifies every table, the image tables included, against the manifest's hashes
    section = atlas.manifest["images"]
    assert atlas.version == 3 and atlas.has_images and "images.parquet" in atlas.manifest["tables"]
    assert section["images"] == 16 and section["patches"] == 4 and section["grid"] == 2
    assert set(section["labels"]) == set(COLOURS)
    # The text side is an ordinary atlas of the language model on the corpus.
    assert atlas.manifest["tokens"] == 1500 and any(atlas.top_contexts(0, e) for e in range(atlas.num_experts))

    model, tokenizer = load_vision(run)
    data = read_pairs(pairs, "train")
    dense = patch_scores(model, tokenizer, data.images, batch=4)   # the build's batches: the same numbers
    checked = 0
    for group, table in enumerate(dense):
        best = table.max(axis=1)                       # [images, N]: an image's best patch per expert
        for expert in range(atlas.num_experts):
            found = atlas.image_examples(group, expert)
            order = sorted((i for i in range(len(best)) if best[i, expert] > 0), key=lambda i: (-best[i, expert], i))
            assert [r["image"] for r in found] == order[:3], (group, expert)
            for r in found:
                assert r["score"] == pytest.approx(float(best[r["image"], expert]), rel=1e-6, abs=1e-9)
                assert r["patch"] == int(np.argmax(table[r["image"], :, expert]))   # first best patch
                assert (r["row"], r["col"]) == divmod(r["patch"], 2)
                assert r["label"] == data.groups[r["image"]] and r["caption"] == data.texts[r["image"]]
            checked += len(found)
    assert checked > 0

    group, expert = next((g, e) for g in atlas.groups for e in range(atlas.num_experts)
                         if atlas.image_examples(g, e))
    image = atlas.image_examples(group, expert)[0]["image"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(atlas.image_png(image)))), data.images[image])
    assert main(["atlas", "query", str(path), "--expert", f"{group}:{expert}"]) == 0
    out = capsys.readouterr().out
    assert "top images" in out and f"image {image} (" in out and "patch" in out


def test_image_atlas_refusals_and_damage(vision_atlas: tuple[Path, Path], pairs: Path, text_run: Path,
                                         corpus: Path, tmp_path: Path) -> None:
    from monet.interp.atlas import build_atlas_command
    from monet.interp.image_examples import vision_atlas_parts
    from monet.interp.query import Atlas
    from monet.settings import AtlasBuild

    def build(run: Path, out: Path, **values) -> None:
        build_atlas_command(AtlasBuild(run=str(run), data=str(corpus), out=str(out), images=str(pairs),
                                       max_tokens=100, device="cpu", quiet=True, **values), vision=vision_atlas_parts)

    with pytest.raises(MonetError, match="--images records image examples of a VisionMonet"):
        build(text_run, tmp_path / "a")
    with pytest.raises(MonetError, match="no validation pairs"):
        build(vision_atlas[0], tmp_path / "b", split="validation")
    with pytest.raises(MonetError, match="is a VisionMonet checkpoint"):   # a library call without the loader
        build_atlas_command(AtlasBuild(run=str(vision_atlas[0]), data=str(corpus), out=str(tmp_path / "c"),
                                       device="cpu", quiet=True))
    assert not any((tmp_path / name).exists() for name in "abc")
    # Without --images a VisionMonet gets a text-only atlas of its language model: format 2, as before.
    build_atlas_command(AtlasBuild(run=str(vision_atlas[0]), data=str(corpus), out=str(tmp_path / "text"),
                                   max_tokens=200, device="cpu", quiet=True), vision=vision_atlas_parts)
    text_only = Atlas(tmp_path / "text")
    assert text_only.version == 2 and not text_only.has_images and "images" not in text_only.manifest
    assert not (tmp_path / "text" / "images.parquet").exists() and text_only.image_examples(0, 0) == []
    with pytest.raises(MonetError, match="records no images"):
        text_only.image_png(0)
    damaged = tmp_path / "damaged"
    shutil.copytree(vision_atlas[1], damaged)
    with open(damaged / "images.parquet", "r+b") as handle:
        handle.seek(40)
        handle.write(b"\0" * 8)
    with pytest.raises(MonetError, match="images.parquet is damaged"):
        Atlas(damaged)
    shutil.copy(vision_atlas[1] / "images.parquet", damaged / "images.parquet")
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["images"]["grid"] = 0
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MonetError, match="images.grid must be a positive integer"):
        Atlas(damaged)
    atlas = Atlas(vision_atlas[1])
    with pytest.raises(MonetError, match="not stored in this atlas"):
        atlas.image_png(10**6)


@pytest.mark.slow
def test_viewer_shows_image_examples_in_headless_chromium(vision_atlas: tuple[Path, Path], pairs: Path,
                                                          tmp_path: Path) -> None:
    """`monet view` on a VisionMonet atlas: an expert's top images, the patch outlined, beside its text contexts."""
    import os
    import threading
    import urllib.error
    import urllib.request

    from monet.interp.query import Atlas
    from monet.interp.viewer.server import make_server

    atlas = Atlas(vision_atlas[1])
    group, expert = max(((g, e) for g in atlas.groups for e in range(atlas.num_experts)),
                        key=lambda ge: (len(atlas.image_examples(*ge)), bool(atlas.top_contexts(*ge)), -ge[1]))
    wanted = atlas.image_examples(group, expert)
    assert len(wanted) == 3
    server = make_server(atlas, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        def get(path: str) -> tuple[bytes, str]:
            with urllib.request.urlopen(base + path, timeout=30) as answer:
                return answer.read(), answer.headers["Content-Type"]

        assert json.loads(get("/api/info")[0])["has_images"] is True
        page_data = json.loads(get(f"/api/expert/{group}/{expert}")[0])
        assert [r["image"] for r in page_data["images"]] == [r["image"] for r in wanted]
        png, kind = get(f"/api/image/{wanted[0]['image']}")
        assert kind == "image/png" and png == atlas.image_png(wanted[0]["image"])
        for bad in ("/api/image/99999", "/api/image/-1", "/api/image/x"):
            with pytest.raises(urllib.error.HTTPError) as error:
                get(bad)
            assert error.value.code in (400, 404)

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
        if chromium is None:
            pytest.skip("chromium is not installed (apt-get install -y chromium)")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{base}/#/expert/{group}/{expert}")
            page.wait_for_selector("#images .tile img")
            tiles = page.locator("#images .tile")
            assert tiles.count() == len(wanted) and page.locator("#images .tile .patch").count() == len(wanted)
            assert page.locator("#contexts").count() == 1    # the text contexts are on the same page
            for _ in range(600):   # (a wait_for_function string would be eval'd, which the CSP forbids)
                if all(page.eval_on_selector_all("#images img", "images => images.map(i => i.complete)")):
                    break
                page.wait_for_timeout(100)
            widths = page.eval_on_selector_all("#images img", "images => images.map(i => i.naturalWidth)")
            assert widths == [16] * len(wanted)                 # the stored 16x16 images, loaded
            for tile, record in zip(tiles.all(), wanted, strict=True):
                frame, patch = tile.locator(".frame").bounding_box(), tile.locator(".patch").bounding_box()
                side = frame["width"] / record["grid"]
                assert patch["x"] - frame["x"] == pytest.approx(record["col"] * side, abs=2)
                assert patch["y"] - frame["y"] == pytest.approx(record["row"] * side, abs=2)
                assert patch["width"] == pytest.approx(side, abs=2)
                assert record["label"] in tile.inner_text() and record["caption"] in tile.inner_text()
            shots = Path(os.environ.get("MONET_SCREENSHOT", tmp_path))
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "viewer-image-examples.png"), full_page=True)
            browser.close()
        assert errors == []
    finally:
        server.shutdown()
        server.server_close()
