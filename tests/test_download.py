"""The tutorial dataset download: served from 127.0.0.1, verified, extracted atomically."""

import functools
import http.server
import os
import threading
import time
import zipfile

import pytest

from common.download import HYMENOPTERA_DIGEST, download_and_extract, tree_digest
from conftest import make_image_folder, run_script


@pytest.fixture
def served_zip(tmp_path):
    """A tiny dataset zip served over HTTP on 127.0.0.1; yields (url, digest of its content)."""
    src = make_image_folder(tmp_path / "src" / "tiny_data", counts={"train": 2, "val": 1})
    www = tmp_path / "www"
    www.mkdir()
    with zipfile.ZipFile(www / "tiny.zip", "w") as zf:
        for dirpath, _, files in os.walk(src):
            for f in files:
                full = os.path.join(dirpath, f)
                zf.write(full, os.path.relpath(full, tmp_path / "src"))
    (www / "broken.zip").write_bytes(b"PK\3\4 not really a zip")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tree_digest(src)
    server.shutdown()


def test_download_verifies_and_extracts_into_place(served_zip, tmp_path):
    url, digest = served_zip
    dest = tmp_path / "data" / "tiny_data"
    assert download_and_extract(f"{url}/tiny.zip", str(dest), digest) == str(dest)
    assert sorted(os.listdir(dest)) == ["train", "val"]
    assert len(os.listdir(dest / "train" / "cat")) == 2
    assert os.listdir(tmp_path / "data") == ["tiny_data"]  # no temporary leftovers


@pytest.mark.parametrize("name, digest, message", [
    ("tiny.zip", "0" * 64, "checksum mismatch"),
    ("broken.zip", None, "not a valid zip"),
    ("missing.zip", None, "could not download"),
])
def test_bad_download_leaves_nothing_behind(served_zip, tmp_path, name, digest, message):
    from common.errors import UserError

    url, good = served_zip
    dest = tmp_path / "data" / "tiny_data"
    with pytest.raises(UserError, match=message):
        download_and_extract(f"{url}/{name}", str(dest), digest or good)
    assert os.listdir(tmp_path / "data") == []


def test_no_network_fails_fast_naming_data_dir(tmp_path, offline_env):
    env = dict(offline_env, TL_HYMENOPTERA_URL="http://127.0.0.1:9/hymenoptera_data.zip")
    t0 = time.time()
    proc = run_script("train_finetune.py", ["--model", "timm:test_resnet", "--no-pretrained",
                                            "--download-original-data",
                                            "--output-dir", tmp_path / "run",
                                            "--report-to", "none"], env, cwd=tmp_path)
    assert proc.returncode == 1  # a failure while running, not a usage error
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not download") and "--data-dir" in last
    assert "Traceback" not in proc.stderr
    assert time.time() - t0 < 60


def test_pinned_digest_matches_the_real_dataset(shared_dir):
    assert tree_digest(shared_dir["data"]) == HYMENOPTERA_DIGEST
