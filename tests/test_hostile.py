"""Bad input from a new user, table-driven: each case gives the exit code, the one-line message, and that
nothing was deleted or half-written. The table in docs/cli.md lists the same cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from atlas_fixtures import system_code_roots
from runs import train_run

from monet.cli import main
from monet.data import build_corpus

SMALL = {"preset": "tiny", "batch_size": 4, "seq_len": 16, "warmup_steps": 1, "eval_interval": 0,
         "save_interval": 2, "max_steps": 2}


@pytest.fixture(scope="module")
def world(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained tiny run, its atlas, another corpus with another tokenizer, and bystander files."""
    base = tmp_path_factory.mktemp("hostile")
    run = base / "run"
    train_run(corpus, run, SMALL)
    assert main(["atlas", "build", str(run), "--data", str(corpus), "--out", str(base / "atlas"), "--max-tokens",
                 "2000", "--top-k", "2", "--quiet"]) == 0
    other = build_corpus("code", base / "other-data", max_bytes=200_000, vocab_size=600, progress=False,
                         cache_dir=base / "cache", source_options={"roots": system_code_roots()})
    (base / "notes.txt").write_text("my notes")
    (base / "mine").mkdir()
    (base / "mine" / "thesis.tex").write_text("do not delete")
    return {"data": corpus, "run": run, "atlas": base / "atlas", "other": other, "base": base}


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or the file itself) with its bytes: to show nothing was touched."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# (name, argv built from the fixture paths, exit code, text the one-line message must contain)
CASES = [
    ("unlearn --out at a file", lambda w: ["unlearn", w["run"], "--data", w["data"], "--atlas", w["atlas"],
                                           "--out", w["base"] / "notes.txt"], 2, "is a file"),
    ("unlearn --out at a training run", lambda w: ["unlearn", w["run"], "--data", w["data"], "--atlas", w["atlas"],
                                                   "--out", w["run"]], 2, "holds the output of `monet train`"),
    ("unlearn --out at an unrelated folder", lambda w: ["unlearn", w["run"], "--data", w["data"], "--atlas",
                                                        w["atlas"], "--out", w["base"] / "mine"], 2,
     "is not an unlearning report"),
    ("data build --out at an unrelated folder", lambda w: ["data", "build", "--source", "code", "--out",
                                                           w["base"] / "mine"], 2, "is not a dataset"),
    ("atlas build --out below a file", lambda w: ["atlas", "build", w["run"], "--data", w["data"], "--out",
                                                  w["base"] / "notes.txt" / "atlas"], 2, "is a file, not a directory"),
    ("atlas build over an existing atlas", lambda w: ["atlas", "build", w["run"], "--data", w["data"], "--out",
                                                      w["atlas"]], 2, "already exists; pass --force"),
    ("train --out below a file", lambda w: ["train", "--data", w["data"], "--out", w["base"] / "notes.txt" / "run"],
     2, "is a file, not a directory"),
    ("train --out at an unrelated folder", lambda w: ["train", "--data", w["data"], "--out", w["base"] / "mine"],
     2, "is not a training run"),
    ("eval on data from another tokenizer", lambda w: ["eval", w["run"], "--data", w["other"]], 2,
     "another tokenizer"),
    ("atlas build on data from another tokenizer", lambda w: ["atlas", "build", w["run"], "--data", w["other"],
                                                              "--out", w["base"] / "x"], 2, "another tokenizer"),
    ("unlearn with data from another tokenizer", lambda w: ["unlearn", w["run"], "--data", w["other"], "--atlas",
                                                            w["atlas"], "--out", w["base"] / "x"], 2,
     "another tokenizer"),
    ("data build --labels on a corpus with fixed labels", lambda w: ["data", "build", "--source", "domains", "--out",
                                                                     w["base"] / "x", "--labels", "law"], 2,
     "--labels picks code or human languages"),
    ("data build --validation-fraction 1", lambda w: ["data", "build", "--source", "code", "--out", w["base"] / "x",
                                                      "--validation-fraction", "1"], 2, "--validation-fraction"),
    ("unlearn --sweep 0.5", lambda w: ["unlearn", w["run"], "--data", w["data"], "--atlas", w["atlas"], "--out",
                                       w["base"] / "x", "--sweep", "0.5"], 2, "--sweep ratios must be finite and >= 1"),
    ("unlearn --random-masks -1", lambda w: ["unlearn", w["run"], "--data", w["data"], "--atlas", w["atlas"], "--out",
                                             w["base"] / "x", "--random-masks", "-1"], 2, "--random-masks"),
    ("eval --max-batches 0", lambda w: ["eval", w["run"], "--data", w["data"], "--max-batches", "0"], 2,
     "--max-batches must be a positive integer"),
    ("eval --max-batches -3", lambda w: ["eval", w["run"], "--data", w["data"], "--max-batches", "-3"], 2,
     "--max-batches must be a positive integer"),
    ("eval --batch-size 0", lambda w: ["eval", w["run"], "--data", w["data"], "--batch-size", "0"], 2,
     "--batch-size must be a positive integer"),
    ("toxicity --thresholds -1", lambda w: ["toxicity", w["run"], "--data", w["data"], "--out", w["base"] / "x",
                                            "--thresholds", "-1"], 2, "--thresholds must be"),
    ("toxicity --prompts 0", lambda w: ["toxicity", w["run"], "--data", w["data"], "--out", w["base"] / "x",
                                        "--prompts", "0"], 2, "--prompts must be a positive integer"),
    ("toxicity --corr-tokens 0", lambda w: ["toxicity", w["run"], "--data", w["data"], "--out", w["base"] / "x",
                                            "--corr-tokens", "0"], 2, "--corr-tokens must be a positive integer"),
    ("explain --temperature -1", lambda w: ["explain", w["run"], "--atlas", w["atlas"], "--expert", "0:1",
                                            "--temperature", "-1"], 2, "--temperature must be a positive number"),
    ("train --lr nan", lambda w: ["train", "--data", w["data"], "--out", w["base"] / "x", "--lr", "nan"], 2,
     "--lr must be a positive number, got nan"),
    ("train --beta1 2", lambda w: ["train", "--data", w["data"], "--out", w["base"] / "x", "--beta1", "2"], 2,
     "--beta1 must be a finite number >= 0 and < 1"),
    ("train --set with an unknown field", lambda w: ["train", "--data", w["data"], "--out", w["base"] / "x",
                                                     "--set", "moe_expert=4"], 2, "unknown model field"),
    ("eval --device tpu", lambda w: ["eval", w["run"], "--data", w["data"], "--device", "tpu"], 2,
     "--device must be auto, cpu, cuda or cuda:N"),
    ("eval --device cuda without CUDA", lambda w: ["eval", w["run"], "--data", w["data"], "--device", "cuda"], 2,
     "no CUDA device"),
    ("view --port 99999", lambda w: ["view", w["atlas"], "--port", "99999"], 2, "--port must be"),
    ("an unknown command", lambda w: ["trian"], 2, "unknown command 'trian'"),
    ("a command group without its subcommand", lambda w: ["atlas"], 2, "monet atlas build"),
    ("an option of another command", lambda w: ["eval", w["run"], "--data", w["data"], "--lr", "1"], 2, "--lr"),
    ("a missing run", lambda w: ["eval", w["base"] / "nope", "--data", w["data"]], 2, "does not exist"),
    # second round (issue 28): --force never replaces a run, a dataset or the command's own input
    ("atlas build --out RUN --force", lambda w: ["atlas", "build", w["run"], "--data", w["data"], "--out", w["run"],
                                                  "--force"], 2, "holds the output of `monet train`"),
    ("unlearn --out RUN --force", lambda w: ["unlearn", w["run"], "--data", w["data"], "--atlas", w["atlas"], "--out",
                                              w["run"], "--force"], 2, "it is never replaced"),
    ("data build --out RUN --force", lambda w: ["data", "build", "--source", "code", "--out", w["run"], "--force"], 2,
     "holds the output of `monet train`"),
    ("data build --out DATA-of-another-kind --force", lambda w: ["data", "build", "--source", "code", "--out",
                                                                 w["atlas"], "--force"], 2, "not a dataset"),
    ("unlearn --out at a folder with files --force", lambda w: ["unlearn", w["run"], "--data", w["data"], "--atlas",
                                                                 w["atlas"], "--out", w["base"] / "mine", "--force"], 2,
     "may hold files of yours"),
    ("atlas build --out a file --force", lambda w: ["atlas", "build", w["run"], "--data", w["data"], "--out",
                                                     w["base"] / "notes.txt", "--force"], 2, "is a file"),
    ("atlas build --out the folder holding the run --force", lambda w: ["atlas", "build", w["run"], "--data",
                                                                         w["data"], "--out", w["base"], "--force"], 2,
     "choose another --out"),
    ("eval --data RUN gives no --force hint", lambda w: ["eval", w["run"], "--data", w["run"]], 2,
     "pass the directory that `monet data build` wrote"),
    ("eval --data ATLAS gives no --force hint", lambda w: ["eval", w["run"], "--data", w["atlas"]], 2,
     "pass the directory that `monet data build` wrote"),
    ("view RUN gives no --force hint", lambda w: ["view", w["run"]], 2, "pass the directory that `monet atlas build`"),
    ("atlas query DATA gives no --force hint", lambda w: ["atlas", "query", w["data"], "--expert", "0:1"], 2,
     "pass the directory that `monet atlas build`"),
    ("eval --seq-len above max_position_embeddings", lambda w: ["eval", w["run"], "--data", w["data"], "--seq-len",
                                                                "100000"], 2, "exceeds the model's max_position"),
    ("probe --baseline with a Monet run", lambda w: ["probe", w["run"], "--data", w["data"], "--out", w["base"] / "x",
                                                     "--baseline", w["run"]], 2, "the baseline is a dense model"),
    ("view --host that is not this machine", lambda w: ["view", w["atlas"], "--host", "evil.invalid"], 2,
     "choose another --host"),
    ("train --set hidden_act=os.system", lambda w: ["train", "--data", w["data"], "--out", w["base"] / "x", "--set",
                                                    "hidden_act=os.system"], 2, "unknown hidden_act"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, argv, code, message", CASES, ids=[case[0] for case in CASES])
def test_bad_input_gets_one_clear_line_and_deletes_nothing(world, capsys, name, argv, code, message) -> None:
    if "CUDA" in name:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has CUDA")
    before = {key: snapshot(path) for key, path in world.items() if path.exists()}
    assert main([str(part) for part in argv(world)]) == code
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert {key: snapshot(path) for key, path in world.items() if path.exists()} == before   # nothing touched
    assert not (world["base"] / "x").exists()                                                 # nothing half-made


def test_flipped_byte_in_the_weights_is_caught_and_no_verify_skips_the_check(world, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01                     # one bit inside a tensor: the size is unchanged
    weights.write_bytes(bytes(data))
    assert main(["eval", str(checkpoint), "--data", str(world["data"]), "--max-batches", "1"]) == 2
    assert "does not match its SHA-256" in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--data", str(world["data"]), "--max-batches", "1", "--no-verify"]) == 0


def test_every_checkpoint_damaged_stops_training_without_losing_metrics(world, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "model.safetensors").write_bytes(b"broken")
    metrics = (run / "metrics.csv").read_bytes()
    argv = ["train", "--data", str(world["data"]), "--out", str(run)]
    argv += [part for key, value in {**SMALL, "max_steps": 4}.items() for part in (f"--{key.replace('_', '-')}",
                                                                                      str(value))]
    assert main(argv) == 2
    assert "every checkpoint" in capsys.readouterr().err
    assert (run / "metrics.csv").read_bytes() == metrics


def test_atlas_takes_the_window_length_the_model_was_trained_with(world) -> None:
    manifest = json.loads((world["atlas"] / "manifest.json").read_text())
    assert manifest["options"]["seq_len"] == SMALL["seq_len"]


def test_control_characters_from_the_corpus_reach_the_terminal_visible(world, capsys, monkeypatch) -> None:
    from monet.interp.query import Atlas

    real = Atlas.top_contexts

    def hostile(self, group, expert, k=None):
        contexts = real(self, group, expert, k)
        for context in contexts:
            context["pieces"] = ["\x1b]0;pwned\x07", "\u202eevil", *context["pieces"][2:]]
        return contexts

    monkeypatch.setattr(Atlas, "top_contexts", hostile)
    assert main(["atlas", "query", str(world["atlas"]), "--expert", "0:1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "\u241b" in out and "⟨U+202E⟩" in out


@pytest.mark.slow
def test_stale_temporaries_of_a_killed_build_are_swept(world, tmp_path) -> None:
    stale = tmp_path / ".tmp-data-999999999-abc"          # a temporary of a process that no longer exists
    stale.mkdir()
    (stale / "half.tokens").write_bytes(b"x")
    build_corpus("code", tmp_path / "data", max_bytes=100_000, vocab_size=512, progress=False,
                 cache_dir=world["base"] / "cache", source_options={"roots": system_code_roots()})
    assert not stale.exists() and (tmp_path / "data" / "manifest.json").is_file()


def test_debug_shows_the_traceback_and_version_answers(world, capsys) -> None:
    assert main(["--debug", "eval", str(world["base"] / "nope"), "--data", str(world["data"])]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("monet ")


def test_peer_sized_experts_compare_with_vd_marked_not_applicable(capsys) -> None:
    assert main(["info", "--compare", "--dim", "2048", "--experts", str(1024**2), "--heads", "8",
                 "--moe-dim", "1"]) == 0
    out = capsys.readouterr().out
    assert "monet-hd" in out and "not applicable" in out


def test_every_option_has_help_text() -> None:
    """Each settings field carries its help: a comment on its line or a docstring below it (tyro reads both)."""
    import ast
    import inspect

    from monet import settings

    source = inspect.getsource(settings)
    lines = source.splitlines()
    missing = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and any(getattr(base, "id", "") in ("Settings", "AtlasOptions")
                                                  for base in node.bases):
            for index, item in enumerate(node.body):
                if isinstance(item, ast.AnnAssign):
                    nxt = node.body[index + 1] if index + 1 < len(node.body) else None
                    documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    if not documented and "  # " not in lines[item.end_lineno - 1]:
                        missing.append(f"{node.name}.{item.target.id}")
    assert not missing, missing


# ------------------------------------------------------------------------------------------------------------------
# Second round (issue 28): damaged or forged files, terminal injection, the viewer's request checks


def copy_checkpoint(world, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    return sorted((run / "checkpoints").iterdir())[-1]


def rehash(checkpoint: Path) -> None:
    """Rewrite checkpoint.json's sizes and hashes: a forged checkpoint that passes the SHA-256 check."""
    from monet.io import sha256_file

    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    for name in manifest["files"]:
        file = checkpoint / name
        manifest["files"][name] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("value", [float("nan"), 1e30])
def test_weights_with_nan_or_huge_values_are_refused_at_load(world, tmp_path, capsys, value) -> None:
    from safetensors.torch import load_file, save_file

    checkpoint = copy_checkpoint(world, tmp_path)
    tensors = load_file(checkpoint / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    rehash(checkpoint)
    assert main(["eval", str(checkpoint), "--data", str(world["data"]), "--max-batches", "1"]) == 2
    err = capsys.readouterr().err
    assert f"weight {name} holds" in err and "cannot be used" in err or "damaged" in err, err


def test_an_edits_file_with_nan_is_refused(world, tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    from monet.checkpoint import load_checkpoint
    from monet.edits import EDITS_FORMAT, EDITS_VERSION, model_shape

    model, _ = load_checkpoint(world["run"], load_tokenizer=False)
    experts, groups, per_group = model_shape(model)
    metadata = {"format": EDITS_FORMAT, "version": EDITS_VERSION, "moe_experts": str(experts),
                "routing_groups": str(groups), "moe_groups": str(per_group),
                "num_layers": str(model.config.num_hidden_layers)}
    index = 0
    edits = tmp_path / "expert_edits.safetensors"
    save_file({f"layers.{index}.ids": torch_tensor([0, 1], "int64"),
               f"layers.{index}.removal": torch_tensor([float("nan"), 1e30], "float32")}, edits, metadata=metadata)
    assert main(["generate", str(world["run"]), "--prompt", "def", "--max-new-tokens", "2", "--edits", str(edits)]) == 2
    assert "NaN, infinite or beyond" in capsys.readouterr().err


def torch_tensor(values, dtype: str):
    import torch

    return torch.tensor(values, dtype=getattr(torch, dtype))


def test_file_names_in_checkpoint_json_stay_inside_the_checkpoint(world, tmp_path, capsys) -> None:
    checkpoint = copy_checkpoint(world, tmp_path)
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    manifest["files"]["../../../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))
    assert main(["eval", str(checkpoint), "--data", str(world["data"]), "--max-batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "not a file inside the checkpoint" in err and "bytes" not in err, err


def test_no_verify_is_suggested_only_where_it_helps(world, tmp_path, capsys) -> None:
    checkpoint = copy_checkpoint(world, tmp_path)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])            # truncated: --no-verify checks sizes too
    assert main(["eval", str(checkpoint), "--data", str(world["data"]), "--max-batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "--no-verify" not in err, err


@pytest.mark.parametrize("field, value", [("score_scale", 0), ("groups", 10**9), ("units_per_group", 10**12),
                                          ("labels", "code"), ("score_scale", "nan")])
def test_atlas_manifest_numbers_out_of_range_are_one_line(world, tmp_path, capsys, field, value) -> None:
    atlas = tmp_path / "atlas"
    shutil.copytree(world["atlas"], atlas)
    manifest = json.loads((atlas / "manifest.json").read_text())
    manifest[field] = value
    (atlas / "manifest.json").write_text(json.dumps(manifest))
    assert main(["atlas", "query", str(atlas), "--expert", "0:1"]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and field in err and "Traceback" not in err, err


def hostile_dataset(world, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["labels"][0] = "\x1b]0;pwned\x07" + manifest["labels"][0]
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def test_label_names_reach_the_terminal_visible(world, tmp_path, capsys) -> None:
    data = hostile_dataset(world, tmp_path)
    assert main(["data", "info", str(data)]) == 0
    assert main(["eval", str(world["run"]), "--data", str(data), "--max-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and out.count("\u241b]0;pwned") >= 2


def test_generated_text_streams_and_reaches_the_terminal_visible(world, capsys, monkeypatch) -> None:
    import monet.generate

    seen, notes = [], []

    def hostile(model, tokenizer, prompt, stream=None, **options):
        for piece in (prompt, "\x1b]0;pwned\x07", " \u202eevil"):
            shown = capsys.readouterr()
            seen.append(shown.out)   # what the terminal showed before this piece
            notes.append(shown.err)
            stream(piece)
        return ["".join((prompt, "\x1b]0;pwned\x07", " \u202eevil"))]

    monkeypatch.setattr(monet.generate, "generate_text", hostile)
    assert main(["generate", str(world["run"]), "--prompt", "def", "--greedy", "--temperature", "0.5"]) == 0
    captured = capsys.readouterr()
    assert seen[2] == "\u241b]0;pwned\u2407"                  # printed as it came, before the next piece
    assert "\x1b" not in captured.out and "\u202e" not in captured.out and "⟨U+202E⟩evil" in captured.out
    assert "--temperature ignored" in notes[0]


def test_streamed_pieces_join_to_the_generated_text(world) -> None:
    from monet.checkpoint import load_checkpoint
    from monet.generate import generate_text

    model, tokenizer = load_checkpoint(world["run"])
    pieces: list[str] = []
    text = generate_text(model, tokenizer, "def", max_new_tokens=12, greedy=True, stream=pieces.append)[0]
    assert len(pieces) >= 2 and "".join(pieces) == text


def test_explanations_reach_the_terminal_visible(world, capsys, monkeypatch) -> None:
    import monet.interp.explain

    monkeypatch.setattr(monet.interp.explain, "explain_command", lambda cmd: ["\x1b[2J\x07cleared"])
    assert main(["explain", str(world["run"]), "--atlas", str(world["atlas"]), "--expert", "0:1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u241b[2J" in out


@pytest.fixture(scope="module")
def viewer_url(world):
    import threading

    from monet.interp.query import Atlas
    from monet.interp.viewer.server import make_server

    server = make_server(Atlas(world["atlas"]), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def request(address: str, method: str, target: str, headers: dict[str, str] | None = None,
            body: bytes = b"") -> tuple[int, dict]:
    import http.client

    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
    for key, value in {"Host": address, **(headers or {})}.items():
        conn.putheader(key, value)
    if body:
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body or None)
    response = conn.getresponse()
    status, text = response.status, response.read()
    conn.close()
    return status, json.loads(text) if text.startswith(b"{") else {}


@pytest.mark.parametrize("target", ["/%61pi/info", "/api%2Finfo", "/%2561pi/info", "/api/../api/info",
                                    "/nothing/../api/info"])
def test_viewer_cross_site_block_sees_the_decoded_path(viewer_url, target) -> None:
    assert request(viewer_url, "GET", target, {"Sec-Fetch-Site": "cross-site"})[0] in (403, 404)
    if target == "/%61pi/info":
        assert request(viewer_url, "GET", target, {"Sec-Fetch-Site": "cross-site"})[0] == 403
        assert request(viewer_url, "GET", target)[0] == 200           # the same request from the viewer's page


def test_viewer_refuses_absolute_form_targets_and_foreign_origins(viewer_url) -> None:
    assert request(viewer_url, "GET", f"http://{viewer_url}/api/info", {"Sec-Fetch-Site": "cross-site"})[0] == 400
    assert request(viewer_url, "GET", f"//{viewer_url}/api/info")[0] in (400, 404)   # http.server folds "//"
    for origin, status in (("http://evil.example", 403), ("null", 403), (f"http://{viewer_url}", 200),
                           (f"http://localhost:{viewer_url.rsplit(':', 1)[1]}", 200)):
        assert request(viewer_url, "GET", "/api/info", {"Origin": origin})[0] == status, origin
    body = json.dumps({"text": "x", "group": 0, "expert": 1}).encode()
    assert request(viewer_url, "POST", "/api/activation", {"Origin": "http://evil.example"}, body)[0] == 403
    assert request(viewer_url, "GET", "/", {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"})[0] == 200


def test_viewer_deeply_nested_body_and_a_missing_group_are_400_with_the_fix(viewer_url) -> None:
    status, answer = request(viewer_url, "POST", "/api/activation", {}, b"[" * 10_000 + b"]" * 10_000)
    assert status == 400 and "nests more than" in answer["error"]
    status, answer = request(viewer_url, "POST", "/api/activation", {}, b'{"text": ' + b"[" * 50 + b"]" * 50 + b"}")
    assert status == 400 and "nests more than" in answer["error"]
    status, answer = request(viewer_url, "GET", "/api/random?group=7")
    assert status == 400 and "group 7 does not exist" in answer["error"]


# ---------------------------------------------------------------------------------------------------------
# Issue 29: silent or misleading defaults. Every `--steer` counts, an evaluation leak is said aloud, and the
# command table's defaults are the demo's protocol.

STEER_CASES = [
    ("generate --steer with an unknown group first", lambda w: ["generate", w["run"], "--prompt", "x", "--steer",
                                                                "9:1=2", "--steer", "0:1=2"], 2,
     "routing group 9 does not exist"),
    ("generate --steer with an unknown group last", lambda w: ["generate", w["run"], "--prompt", "x", "--steer",
                                                               "0:1=2", "--steer", "9:1=2"], 2,
     "routing group 9 does not exist"),
    ("generate --steer naming one expert twice", lambda w: ["generate", w["run"], "--prompt", "x", "--steer",
                                                            "0:1=2", "--steer", "0:1=0"], 2, "names 0:1 twice"),
]


@pytest.mark.parametrize("name, argv, code, message", STEER_CASES, ids=[case[0] for case in STEER_CASES])
def test_every_steer_is_checked_whatever_the_order(world, capsys, name, argv, code, message) -> None:
    test_bad_input_gets_one_clear_line_and_deletes_nothing(world, capsys, name, argv, code, message)


def test_repeated_list_options_accumulate() -> None:
    """docs/editing.md's `--steer 0:123456=0 --steer 1:77=3` applies both edits (argparse alone keeps the last)."""
    from monet.cli import parse
    from monet.edits import parse_steer

    settings = parse("generate", ["run", "--prompt", "x", "--steer", "0:123456=0", "--steer", "1:77=3"])
    assert settings.steer == ("0:123456=0", "1:77=3")
    edits = parse_steer(settings.steer)
    assert edits.experts == {0: {123456: 0.0}, 1: {77: 3.0}}
    mixed = parse("generate", ["run", "--steer=0:1=0", "0:2=0", "--prompt", "x", "--steer", "1:3=2"])
    assert mixed.steer == ("0:1=0", "0:2=0", "1:3=2") and mixed.prompt == "x" and mixed.run == "run"
    assert parse("train", ["--data", "d", "--out", "o", "--set", "moe_dim=4", "--set", "moe_heads=2"]).set == (
        "moe_dim=4", "moe_heads=2")


def test_steering_applies_every_repeated_edit(world) -> None:
    from monet.checkpoint import load_checkpoint
    from monet.edits import apply_steering, current_weights

    model, _ = load_checkpoint(world["run"], load_tokenizer=False)
    apply_steering(model, ("0:1=0", "0:5=3"))
    table = next(t for t in current_weights(model).values() if t is not None)
    assert table[1].item() == 1.0 and table[5].item() == pytest.approx(-2.0)   # 1 - alpha per expert


def test_defaults_follow_the_demo_protocol_and_select_on_train_text(world) -> None:
    from monet.experiments.demo import PLANS
    from monet.settings import AtlasOptions, UnlearnSettings

    protocol = dict(PLANS["code"].protocol)
    defaults = UnlearnSettings(run="r", data="d", atlas="a", out="o")
    assert (defaults.ratio, defaults.sweep) == (protocol["ratio"], protocol["sweep"]) == (1.5, (2.0, 1.25))
    assert AtlasOptions().split == "train"
    assert json.loads((world["atlas"] / "manifest.json").read_text())["data"]["split"] == "train"


@pytest.mark.slow
def test_atlas_on_the_evaluated_split_is_a_warning_on_the_terminal_and_in_the_report(world, tmp_path,
                                                                                     capsys) -> None:
    atlas = tmp_path / "validation-atlas"
    assert main(["atlas", "build", str(world["run"]), "--data", str(world["data"]), "--out", str(atlas),
                 "--split", "validation", "--max-tokens", "2000", "--top-k", "2", "--quiet"]) == 0
    common = [str(world["run"]), "--data", str(world["data"]), "--eval-tokens", "64", "--others-tokens", "32",
              "--random-masks", "0", "--sweep", "--mc-items", "0", "--batch-size", "4", "--quiet"]
    assert main(["unlearn", *common, "--atlas", str(atlas), "--out", str(tmp_path / "leak")]) == 0
    captured = capsys.readouterr()
    assert "warning: the atlas" in captured.err and "validation split" in captured.err
    assert "--split train" in captured.out   # the table ends with it too
    report = json.loads((tmp_path / "leak" / "report.json").read_text())
    assert len(report["warnings"]) == 1 and "--split train" in report["warnings"][0]
    assert main(["unlearn", *common, "--atlas", str(world["atlas"]), "--out", str(tmp_path / "clean")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "clean" / "report.json").read_text())["warnings"] == []


@pytest.mark.slow
def test_help_names_positionals_and_states_each_default_once(capsys) -> None:
    import re

    from monet.cli import COMMANDS

    for name in COMMANDS:
        assert main([*name.split(), "--help"]) == 0
        text = capsys.readouterr().out
        usage = text.split("\n", 1)[0]
        assert not usage.endswith(" STR"), (name, usage)           # a positional is called RUN, ATLAS, DIR
        assert "{None}" not in text and "(issue" not in text, name
        flat = re.sub(r"[│\s]+", " ", text)
        for option in re.split(r" (?=--[a-z])", flat):              # one option's help, joined over its lines
            assert option.count("default") <= 1, (name, option)
    for name in ("info", "train"):   # one default shape for both
        assert main([name, "--help"]) == 0 and "(default: tiny)" in re.sub(r"[│\s]+", " ", capsys.readouterr().out)
    from monet.settings import InfoCommand, TrainSettings

    assert InfoCommand().preset == TrainSettings(data="d", out="o").preset


def test_misspelt_model_field_gets_a_suggestion(world, capsys) -> None:
    assert main(["info", "--set", "moe_expert=4"]) == 2
    assert "did you mean moe_experts?" in capsys.readouterr().err
    assert main(["train", "--data", str(world["data"]), "--out", str(world["base"] / "x"), "--set",
                 "moe_expert=4"]) == 2
    assert "did you mean moe_experts?" in capsys.readouterr().err
    assert not (world["base"] / "x").exists()
