"""Make the compact copy of the tutorial's ants/bees set that ships in this repo.

    python tools/make_compact_hymenoptera.py SOURCE [--out common/bundled/hymenoptera_data]

SOURCE is the original `hymenoptera_data.zip` (https://download.pytorch.org/tutorial/) or the
folder it extracts to. Every image that torchvision's ImageFolder counts (244 train, 153 val;
the stray `train/ants/imageNotFound.gif` is left out as the loaders leave it out) is decoded,
turned upright by its EXIF orientation (as the loaders do), converted to RGB and, when its
shorter side is over --short-side pixels, resized (Lanczos) so that it is --short-side; then
saved as JPEG at --quality without EXIF. MANIFEST.tsv lists each file with its sha256 and the
original's size in bytes and pixels, and the original's sha256.
"""

import argparse
import hashlib
import io
import os
import shutil
import sys
import tempfile
import zipfile

from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.data import IMG_EXTENSIONS  # noqa: E402


def originals(source):
    """(relative path under train/ or val/, bytes) of every image ImageFolder counts."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            for name in sorted(zf.namelist()):
                parts = name.split("/")
                if len(parts) == 4 and parts[1] in ("train", "val") and \
                        parts[3].lower().endswith(IMG_EXTENSIONS) and not parts[3].startswith("."):
                    yield "/".join(parts[1:]), zf.read(name)
        return
    for split in ("train", "val"):
        for cls in sorted(os.listdir(os.path.join(source, split))):
            folder = os.path.join(source, split, cls)
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
                    with open(os.path.join(folder, name), "rb") as fh:
                        yield f"{split}/{cls}/{name}", fh.read()


def compact(data, short_side, quality):
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        size = img.size
        scale = short_side / min(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.LANCZOS)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue(), size


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="hymenoptera_data.zip or its extracted folder")
    parser.add_argument("--out", default=os.path.join("common", "bundled", "hymenoptera_data"))
    parser.add_argument("--short-side", type=int, default=320)
    parser.add_argument("--quality", type=int, default=85)
    args = parser.parse_args()
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".compact-", dir=parent)
    rows, total = [], 0
    for rel, data in originals(args.source):
        small, (w, h) = compact(data, args.short_side, args.quality)
        rel_out = os.path.splitext(rel)[0] + ".jpg"
        os.makedirs(os.path.dirname(os.path.join(tmp, rel_out)), exist_ok=True)
        with open(os.path.join(tmp, rel_out), "wb") as fh:
            fh.write(small)
        total += len(small)
        rows.append("\t".join([rel_out, hashlib.sha256(small).hexdigest(), rel, str(len(data)),
                               f"{w}x{h}", hashlib.sha256(data).hexdigest()]))
    with open(os.path.join(tmp, "MANIFEST.tsv"), "w") as fh:
        fh.write("file\tsha256\toriginal\toriginal_bytes\toriginal_size\toriginal_sha256\n")
        fh.write("\n".join(rows) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(f"{len(rows)} images, {total / 2**20:.1f} MiB -> {args.out}")


if __name__ == "__main__":
    main()
