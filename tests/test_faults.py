"""Faults and malformed files of the second hostile-input audit that need no trained model: out-of-range
options, damaged dataset manifests, hostile YAML, a full disk and a closed pipe. Each becomes one clear line
(exit 2) or a quiet exit, never a traceback, a hang or silent nonsense. Each test fails on the code before
the fix."""

from __future__ import annotations

import errno
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from monet import cli
from monet.cli import main
from monet.errors import MonetError
from monet.settings import InfoCommand

# (argv, text the one-line message must contain)
OPTION_CASES = [
    (["generate", "RUN", "--prompt", "a", "--num-samples", "1000000000"], "--num-samples must be at most 1,000"),
    (["generate", "RUN", "--prompt", "a", "--seed", str(2**64)], "--seed must be at most 4,294,967,295"),
    (["explain", "RUN", "--atlas", "A", "--expert", "0:1", "--samples", "1000000000"], "--samples must be at most"),
    (["probe", "RUN", "--data", "D", "--out", "O", "--bootstrap", "1000000000"], "--bootstrap must be at most 100,000"),
    (["info", "--compare", "--dim", "8", "--experts", str(10**40), "--heads", "1", "--moe-dim", "1"],
     "--experts must be at most"),
    (["unlearn", "RUN", "--data", "D", "--atlas", "A", "--out", "O", "--seed", "-1"],
     "--seed must be a non-negative integer"),
    (["demo", "--seed", "-5"], "--seed must be a non-negative integer"),
    (["info", "--set", "num_hidden_layers=1000000"], "num_hidden_layers must be at most 1,024"),
    (["info", "--set", "moe_experts=100000000"], "moe_experts must be at most"),
    (["info", "--set", "hidden_act=os.system"], "unknown hidden_act 'os.system'"),
    (["info", "--set", "dense_hidden_act=eval"], "unknown dense_hidden_act 'eval'"),
]


@pytest.mark.parametrize("argv, message", OPTION_CASES, ids=[" ".join(c[0])[:60] for c in OPTION_CASES])
def test_out_of_range_options_are_one_line(argv, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    start = time.time()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert time.time() - start < 30 and list(tmp_path.iterdir()) == []


def test_a_huge_model_for_training_is_refused_with_a_memory_estimate() -> None:
    import torch

    from monet.config import preset
    from monet.train import Runtime, check_memory

    config = preset("tiny", hidden_size=16384, moe_dim=16384, moe_experts=1024, num_hidden_layers=64, vocab_size=512)
    with pytest.raises(MonetError, match=r"training needs about [\d,.]+ GiB"):
        check_memory(config, Runtime(0, 1, torch.device("cpu"), None, False))


# ------------------------------------------------------------------------------------------- datasets


def dataset(path: Path, **changes) -> Path:
    """A tiny, valid dataset directory written by hand, with manifest fields replaced by `changes`."""
    path.mkdir()
    tokens = np.array([1, 5, 6, 2, 1, 7, 2], dtype=np.uint16)
    docs = np.array([[0, 4, 0], [4, 7, 1]], dtype=np.int64)
    for split in ("train", "validation"):
        with open(path / f"{split}.tokens", "wb") as fh:
            np.save(fh, tokens, allow_pickle=False)
        with open(path / f"{split}.docs.npy", "wb") as fh:
            np.save(fh, docs, allow_pickle=False)
        (path / f"{split}.meta.jsonl").write_text('{"label": "a"}\n{"label": "b"}\n')
    manifest = {"format_version": 1, "source": "code", "labels": ["a", "b"], "vocab_size": 512,
                "splits": {"train": {}, "validation": {}}, **changes}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"labels": "ab"}, "labels must be a non-empty list of names"),
    ({"labels": [1.5, 2.5]}, "labels must be a non-empty list of names"),
    ({"labels": ["a", "a"]}, "labels repeat a name"),
    ({"vocab_size": "abc"}, "vocab_size must be an integer"),
    ({"vocab_size": 10**12}, "vocab_size must be an integer"),
    ({"splits": []}, "splits must hold train and validation"),
    ({"source": ["code"]}, "source must be a name"),
], ids=["labels as a string", "float labels", "repeated labels", "vocab_size text", "vocab_size huge", "splits []",
        "source list"])
def test_damaged_dataset_manifests_are_one_line(tmp_path, changes, message) -> None:
    from monet.data import TokenDataset

    with pytest.raises(MonetError, match=message) as caught:
        TokenDataset(dataset(tmp_path / "data", **changes))
    assert "--force" not in str(caught.value)   # not a directory `monet data build` wrote: no --force hint


def test_an_empty_tokens_file_and_a_float_document_table_are_one_line(tmp_path) -> None:
    from monet.data import TokenDataset

    data = dataset(tmp_path / "data")
    assert TokenDataset(data).num_documents == 2
    (data / "train.tokens").write_bytes(b"")
    with pytest.raises(MonetError, match="cannot read the train split"):
        TokenDataset(data)
    data = dataset(tmp_path / "data2")
    with open(data / "train.docs.npy", "wb") as fh:
        np.save(fh, np.array([[0, 4, 0.5], [4, 7, 1]]), allow_pickle=False)
    with pytest.raises(MonetError, match="expected integers"):
        TokenDataset(data)


def test_a_run_or_a_folder_passed_as_data_never_gets_a_force_hint(tmp_path, capsys) -> None:
    from monet.io import MARKER

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / MARKER).write_text("train\n")
    for folder in (run, tmp_path):
        assert main(["data", "info", str(folder)]) == 2
        err = capsys.readouterr().err
        assert "is not a (complete) dataset" in err and "--force" not in err, err


# ----------------------------------------------------------------------------------------------- YAML


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path) -> None:
    from monet.train import load_settings

    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f'{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},'
              f'*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]' for i in range(8)]
    lines.append("moe_dim: *i")
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(lines) + "\n")
    start = time.time()
    with pytest.raises(MonetError, match="uses YAML aliases"):
        load_settings(config)
    assert time.time() - start < 10
    config.write_text("x: " + "y" * (2 << 20) + "\n")
    with pytest.raises(MonetError, match="larger than"):
        load_settings(config)


def test_yaml_set_as_one_string_or_a_mapping_is_read_whole(tmp_path) -> None:
    from monet.train import load_settings

    config = tmp_path / "c.yaml"
    config.write_text('set: "moe_dim=4"\n')
    assert load_settings(config).model_fields()["moe_dim"] == 4
    config.write_text("set:\n  moe_dim: 6\n")
    assert load_settings(config).model_fields()["moe_dim"] == 6


def test_set_max_position_embeddings_below_seq_len_is_refused() -> None:
    from monet.settings import TrainSettings
    from monet.train import build_model_config

    settings = TrainSettings(data="d", out="o", seq_len=16, set=("max_position_embeddings=4",))
    with pytest.raises(MonetError, match="max_position_embeddings=4 is shorter than --seq-len 16"):
        build_model_config(settings, 512)


def test_a_config_json_that_is_not_an_object_is_one_line(tmp_path) -> None:
    from monet.checkpoint import read_config

    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(MonetError, match="holds a JSON list, not an object"):
        read_config(tmp_path)


# ------------------------------------------------------------------------------------ disk and pipes


def failing_info(exc: BaseException):
    def handler(cmd: InfoCommand) -> None:
        print("partial output")
        raise exc
    return (InfoCommand, handler)


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/3: "
                 "file write failed"),
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
], ids=["OSError", "torch.save", "safetensors"])
def test_a_full_disk_is_one_line(monkeypatch, capsys, exc) -> None:
    monkeypatch.setitem(cli.COMMANDS, "info", failing_info(exc))
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert "the disk (or quota) is full" in err and "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. "
                                                              "DefaultCPUAllocator: can't allocate memory"),
                                 RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")],
                         ids=["MemoryError", "CPU allocator", "CUDA"])
def test_running_out_of_memory_is_one_line(monkeypatch, capsys, exc) -> None:
    monkeypatch.setitem(cli.COMMANDS, "info", failing_info(exc))
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert "out of memory; lower --batch-size" in err and "Traceback" not in err, err


def test_an_unexpected_error_still_shows_its_traceback(monkeypatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "info", failing_info(KeyError("bug")))
    with pytest.raises(KeyError):
        main(["info"])


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys) -> None:
    monkeypatch.setitem(cli.COMMANDS, "info", failing_info(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    assert main(["info"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_head_on_a_long_output_ends_quietly(tmp_path) -> None:
    import subprocess

    script = ("import sys; from monet import cli; from monet.settings import InfoCommand\n"
              "def many(cmd):\n    for i in range(200000): print('line', i)\n"
              "cli.COMMANDS['info'] = (InfoCommand, many)\nsys.exit(cli.main(['info']))\n")
    env = {"PYTHONPATH": ":".join(sys.path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(f"'{sys.executable}' -c \"$SCRIPT\" | head -n 2", shell=True, capture_output=True,
                            text=True, env={**env, "SCRIPT": script}, timeout=120)
    assert result.stdout == "line 0\nline 1\n"
    assert result.stderr == "", result.stderr


def test_error_lines_show_control_characters_in_file_names(tmp_path, capsys) -> None:
    hostile = tmp_path / "data\x1b]0;pwned\x07"
    assert main(["data", "info", str(hostile)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\u241b" in err


def test_a_label_asked_for_without_training_documents_is_refused(tmp_path) -> None:
    from atlas_fixtures import system_code_roots

    from monet.data import build_corpus

    with pytest.raises(MonetError, match="no training documents for go within the byte budget"):
        build_corpus("code", tmp_path / "data", max_bytes=20_000, vocab_size=512, progress=False,
                     cache_dir=tmp_path / "cache",
                     source_options={"roots": system_code_roots(), "languages": ["c", "python", "go"]})
    assert not (tmp_path / "data").exists()


def test_bench_json_and_markdown_at_one_file_is_refused(tmp_path, capsys) -> None:
    same = tmp_path / "report"
    assert main(["bench", "--quick", "--json", str(same), "--markdown", str(same)]) == 2
    assert "name the same file" in capsys.readouterr().err and not same.exists()


def test_an_output_that_would_be_refused_is_refused_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    import monet.interp.probe

    monkeypatch.setattr(monet.interp.probe, "probe_command", lambda cmd: pytest.fail("the probe ran"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    assert main(["probe", "RUN", "--data", "D", "--out", str(tmp_path / "mine"), "--force"]) == 2
    assert "may hold files of yours" in capsys.readouterr().err


def test_a_yaml_error_is_one_line(tmp_path) -> None:
    from monet.train import load_settings

    config = tmp_path / "c.yaml"
    config.write_text("x: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(MonetError) as caught:
        load_settings(config)
    assert "\n" not in str(caught.value) and "not valid YAML" in str(caught.value)
