"""Security and data-loss cases of the second hostile-input audit that need no trained model: archives that
try to write outside the cache, what --out / --force may replace, the per-output lock, and stale-temporary
sweeping that must never touch another live process's files. Each test fails on the code before the fix."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from monet.cli import main
from monet.errors import MonetError
from monet.io import (
    MARKER,
    check_output,
    command_inputs,
    exclusive_lock,
    output_directory,
    stale_temporary,
    write_marker,
)


def tar_bytes(members: dict[str, bytes], mode: str = "w:xz", links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ archives


def test_a_source_tarball_member_with_dotdot_is_refused_and_writes_nothing_outside(tmp_path) -> None:
    from monet.data.code import SOURCES, _extract_tar

    archive = tmp_path / "glibc-2.36.tar.xz"
    archive.write_bytes(tar_bytes({"g/ok.c": b"int ok;\n", "g/../../escaped.c": b"int pwned;\n"}))
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(MonetError, match="would be written outside"):
        _extract_tar(str(archive), SOURCES["c"][0], cache / "glibc-source.src")
    assert not (tmp_path / "escaped.c").exists() and not (cache / "escaped.c").exists()
    assert sorted(p.name for p in cache.iterdir()) == []        # no half-unpacked temporary either


def test_a_clean_source_tarball_still_unpacks_its_wanted_files(tmp_path) -> None:
    from monet.data.code import SOURCES, _extract_tar

    archive = tmp_path / "src.tar.xz"
    archive.write_bytes(tar_bytes({"g/a.c": b"int a;\n", "g/notes.txt": b"skip", "g/b.h": b"int b;\n"}))
    out = _extract_tar(str(archive), SOURCES["c"][0], tmp_path / "x.src")
    assert (out / "g" / "a.c").read_bytes() == b"int a;\n" and (out / "g" / "b.h").is_file()
    assert not (out / "g" / "notes.txt").exists()


def test_extract_tar_strips_absolute_names_and_skips_links_leaving_the_destination(tmp_path) -> None:
    from monet.data.packages import extract_tar

    outside = tmp_path / "outside"
    outside.mkdir()
    data = tar_bytes({f"{outside}/abs.c": b"x", "package/index.js": b"y"}, mode="w:gz",
                     links={"package/up": "../../outside", "package/abs": str(outside)})
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_tar(io.BytesIO(data), dest, "pkg.tgz")
    assert list(outside.iterdir()) == []
    assert (dest / "package" / "index.js").read_bytes() == b"y"
    assert not (dest / "package" / "up").exists() and not (dest / "package" / "abs").exists()
    assert (dest / str(outside).lstrip("/") / "abs.c").is_file()   # "/x/abs.c" lands inside, as "x/abs.c"


def test_extract_tar_refuses_a_damaged_archive_in_one_line(tmp_path) -> None:
    from monet.data.packages import extract_tar

    with pytest.raises(MonetError, match="not a readable tar archive"):
        extract_tar(io.BytesIO(b"\xfd7zXZ\x00 truncated"), tmp_path, "broken.tar.xz")


def test_zip_members_that_leave_the_archive_are_never_walked(tmp_path) -> None:
    from monet.data.code import SOURCES, walk

    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name in ("java/ok/A.java", "../evil/B.java", "/abs/C.java", "a/../../D.java"):
            handle.writestr(name, "class X {}\n")
    assert [ref.member for ref in walk(str(archive), SOURCES["java"][0])] == ["java/ok/A.java"]


# ----------------------------------------------------------------------------------- what --out replaces


def output(path: Path, kind: str, files: dict[str, str], listed: bool = True) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    if listed:
        write_marker(path, kind)
    else:
        (path / MARKER).write_text(kind + "\n")
    return path


@pytest.mark.parametrize("kind_there", ["train", "data build", "atlas build", "probe"])
def test_force_never_replaces_an_output_of_another_command(tmp_path, kind_there) -> None:
    there = output(tmp_path / "out", kind_there, {"precious.bin": "x"})
    with pytest.raises(MonetError, match="never replaced") as caught:
        check_output(there, "unlearn", force=True, noun="an unlearning report")
    assert "--force" not in str(caught.value)


def test_force_never_replaces_a_file_or_a_folder_without_marker(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("mine")
    for path, message in ((tmp_path / "notes.txt", "is a file"), (tmp_path / "mine", "may hold files of yours")):
        with pytest.raises(MonetError, match=message) as caught:
            check_output(path, "atlas build", force=True, noun="an atlas")
        assert "pass --force" not in str(caught.value)


def test_force_replaces_its_own_output_but_not_files_someone_added(tmp_path) -> None:
    atlas = output(tmp_path / "atlas", "atlas build", {"manifest.json": "{}"})
    with pytest.raises(MonetError, match="already exists; pass --force"):
        check_output(atlas, "atlas build", noun="an atlas", replace_own=False)
    assert check_output(atlas, "atlas build", force=True, noun="an atlas", replace_own=False) == atlas
    (atlas / "my-notes.md").write_text("added by hand")
    with pytest.raises(MonetError, match="my-notes.md, which monet did not write"):
        check_output(atlas, "atlas build", force=True, noun="an atlas", replace_own=False)
    old = output(tmp_path / "old", "atlas build", {"manifest.json": "{}"}, listed=False)   # an older marker
    assert check_output(old, "atlas build", force=True, noun="an atlas", replace_own=False) == old


def test_the_marker_lists_what_the_command_wrote(tmp_path) -> None:
    with output_directory(tmp_path / "report", "probe", noun="a probe report") as tmp:
        (tmp / "probe.json").write_text("{}")
    assert (tmp_path / "report" / MARKER).read_text().splitlines() == ["probe", "probe.json"]


@pytest.mark.parametrize("where", ["itself", "parent", "inside"])
def test_an_output_is_never_the_commands_own_input(tmp_path, where) -> None:
    atlas = output(tmp_path / "report" / "atlas", "atlas build", {"manifest.json": "{}"})
    report = tmp_path / "report"
    (report / "report.json").write_text("{}")
    write_marker(report, "unlearn")   # an earlier report that (oddly) holds the atlas this command reads
    source = {"itself": report, "parent": atlas, "inside": tmp_path / "report"}[where]
    out = {"itself": report, "parent": report, "inside": atlas}[where]
    with command_inputs([source]), pytest.raises(MonetError, match="this command's input"):
        check_output(out, "unlearn" if out == report else "atlas build", force=True)
    with command_inputs([tmp_path / "elsewhere-that-does-not-exist"]):
        check_output(report, "unlearn", force=True)


def test_symbolic_links_as_out_are_refused(tmp_path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(MonetError, match="does not exist; pass a real path"):
        check_output(tmp_path / "dangling", "probe", force=True)
    with pytest.raises(MonetError, match="is a symbolic link"):
        check_output(tmp_path / "link", "probe", force=True)
    assert (tmp_path / "dangling").is_symlink() and (tmp_path / "link").is_symlink()


def test_train_into_a_dangling_symlink_is_one_clear_line(tmp_path, capsys) -> None:
    (tmp_path / "run").symlink_to(tmp_path / "nowhere")
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]) == 2
    assert "does not exist; pass a real path" in capsys.readouterr().err
    assert (tmp_path / "run").is_symlink() and not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------------------------------------ locks

HOLD = """
import sys, time
from monet.io import exclusive_lock
with exclusive_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_lock(path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, env=env, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.slow
def test_a_second_train_on_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        assert main(["train", "--data", str(tmp_path / "data"), "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"being written by another monet process (pid {holder.pid})" in err, err
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(run):   # the kernel dropped the dead holder's lock: no stale lock to clear by hand
        pass
    assert not (tmp_path / ".run.monet-lock").exists()


def test_two_writers_of_one_output_directory_exclude_each_other(tmp_path) -> None:
    with exclusive_lock(tmp_path / "atlas"):
        with pytest.raises(MonetError, match="another monet process"):
            with output_directory(tmp_path / "atlas", "atlas build", noun="an atlas"):
                pass
    with output_directory(tmp_path / "atlas", "atlas build", noun="an atlas") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "atlas" / "x").is_file()


def test_pruning_keeps_another_live_process_temporaries(tmp_path) -> None:
    from monet.checkpoint import prune_checkpoints

    root = tmp_path / "run" / "checkpoints"
    live = root / f".tmp-step-0000004-{os.getpid()}-abc123_"
    dead = root / ".tmp-step-0000002-999999999-abc123_"
    trash = root / ".trash-step-0000001-5-1"
    for path in (live, dead, trash):
        path.mkdir(parents=True)
    prune_checkpoints(tmp_path / "run", keep_last=3)
    assert live.is_dir() and not dead.exists() and not trash.exists()
    assert stale_temporary(dead.name) and not stale_temporary(live.name) and stale_temporary(".tmp-old-style")


def test_a_lock_file_removed_under_a_waiter_is_not_trusted(tmp_path, monkeypatch) -> None:
    """The holder unlinks the lock file on release; a process that opened the old file before that must not
    believe it holds the lock (it retries on the new file)."""
    import fcntl

    import monet.io as mio

    calls = []
    real_flock = fcntl.flock

    def flock_after_unlink(fd, op):
        if not calls:   # first attempt: the previous holder removes the file between our open and our lock
            calls.append(fd)
            (tmp_path / ".out.monet-lock").unlink()
        return real_flock(fd, op)

    monkeypatch.setattr(mio.fcntl, "flock", flock_after_unlink)
    start = time.time()
    with exclusive_lock(tmp_path / "out"):
        assert (tmp_path / ".out.monet-lock").read_text().strip() == str(os.getpid())
    assert len(calls) == 1 and time.time() - start < 5
