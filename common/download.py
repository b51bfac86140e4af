"""The tutorial's ants/bees dataset when no --data-dir or --dataset is given: the compact copy
that ships with the package (the default: no network needed), or, with
--download-original-data, the original archive.

The compact copy (common/bundled/hymenoptera_data: 244 train / 153 val JPEGs, shorter side
at most 320 px, made by tools/make_compact_hymenoptera.py) is checked against its
MANIFEST.tsv before use.

The archive is streamed to a temporary file with a progress bar, extracted into a temporary
folder beside the destination, checked, and only then renamed into place: an interrupted
download never leaves a half-extracted `data/hymenoptera_data` that a later run would trust.

The check is a digest of the extracted images (each file's relative path and sha256, sorted),
pinned below from the copy the tests use; it holds whatever zip tool produced the archive.
"""

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

from tqdm.auto import tqdm

from common.errors import RunFailure, UserError
from common.log import logger

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
HYMENOPTERA_DIGEST = "15d89271f257b89832a79a665d92fea577411e875ab6be14222a571af4b2b359"


def tree_digest(root: str, subdirs: tuple = ("train", "val")) -> str:
    """sha256 of the sorted lines '<relative path> <sha256 of file>' below root/subdirs."""
    lines = []
    for sub in subdirs:
        for dirpath, _, files in os.walk(os.path.join(root, sub)):
            for name in files:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                with open(path, "rb") as fh:
                    lines.append(f"{rel} {hashlib.sha256(fh.read()).hexdigest()}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def download_and_extract(url: str, dest: str, expected_digest: str, timeout: float = 15) -> str:
    """Download the zip at `url`, extract its single top folder as `dest`, verify, rename.

    Returns `dest`. Raises UserError (naming --data-dir) when the network or the check fails.
    """
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".download-", dir=parent)
    try:
        archive = os.path.join(work, "data.zip")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(archive, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc="download",
                          file=sys.stderr) as bar:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise RunFailure(f"could not download {url} ({reason}); offline, pass a local image "
                            "folder with --data-dir DIR (train/ and val/ class folders)") from None
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(os.path.join(work, "x"))
        except zipfile.BadZipFile:
            raise RunFailure(f"{url} is not a valid zip archive; download it yourself and "
                            "pass --data-dir") from None
        tops = [d for d in os.listdir(os.path.join(work, "x")) if not d.startswith(("_", "."))]
        if len(tops) != 1:
            raise UserError(f"{url}: expected one top folder in the archive, found {tops}")
        extracted = os.path.join(work, "x", tops[0])
        digest = tree_digest(extracted)
        if digest != expected_digest:
            raise RunFailure(f"{url}: content checksum mismatch (got {digest[:12]}..., expected "
                            f"{expected_digest[:12]}...); the download is corrupt or changed, "
                            "pass --data-dir with your own copy")
        os.replace(extracted, dest)  # atomic on one filesystem: all or nothing
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)


BUNDLED_HYMENOPTERA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled",
                                   "hymenoptera_data")


def bundled_hymenoptera() -> str:
    """Path of the compact ants/bees copy shipped with the package, after checking every file
    against its manifest (12 MB: a few tens of milliseconds)."""
    manifest = os.path.join(BUNDLED_HYMENOPTERA, "MANIFEST.tsv")
    try:
        with open(manifest) as fh:
            rows = [line.rstrip("\n").split("\t") for line in fh][1:]
        for rel, digest, *_ in rows:
            with open(os.path.join(BUNDLED_HYMENOPTERA, rel), "rb") as fh:
                if hashlib.sha256(fh.read()).hexdigest() != digest:
                    raise OSError(f"{rel} differs from its manifest")
    except (OSError, ValueError) as e:
        raise UserError(f"the ants/bees copy shipped with the package is incomplete ({e}); "
                        "reinstall it, pass --data-dir DIR, or --download-original-data") from None
    logger.info(f"No --data-dir or --dataset: training on the tutorial's ants/bees set, the "
                f"compact copy shipped with the package ({len(rows)} images, shorter side "
                "<= 320 px)")
    return BUNDLED_HYMENOPTERA


def ensure_hymenoptera(root: str = "data") -> str:
    """Path of the tutorial's dataset under `root`, downloading it the first time."""
    dest = os.path.join(root, "hymenoptera_data")
    if os.path.isdir(dest):
        return dest
    url = os.environ.get("TL_HYMENOPTERA_URL", HYMENOPTERA_URL)  # a mirror, or a test server
    logger.info(f"No --data-dir given: downloading the tutorial's ants/bees set from {url} "
                f"into {root}/")
    return download_and_extract(url, dest, HYMENOPTERA_DIGEST)
