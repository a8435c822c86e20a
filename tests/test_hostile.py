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
