"""``model.download.fetch`` against a real local HTTP server (no internet on the test machines)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from model import download
from model.download import DownloadError, fetch


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the directory, and /short/<name> with a Content-Length larger than what it sends."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/short/"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()
    httpd.server_close()


def hashed_file(root: Path, payload: bytes, stem: str = "sam_fake") -> str:
    """Write payload under a torch-hub style name carrying its own sha256 prefix; return the name."""
    name = f"{stem}_{hashlib.sha256(payload).hexdigest()[:6]}.pth"
    (root / name).write_bytes(payload)
    return name


def test_downloads_verifies_and_reuses_offline(server, tmp_path):
    base, root = server
    payload = b"weights" * 300_000
    name = hashed_file(root, payload)
    dest = tmp_path / "models"
    path = fetch(base + name, dest, progress=False)
    assert path == dest / name and path.read_bytes() == payload
    assert [p.name for p in dest.iterdir()] == [name]  # no temporary file left behind
    (root / name).unlink()  # the server no longer has it: the verified local copy is reused
    assert fetch(base + name, dest, progress=False) == path


def test_wrong_hash_is_rejected_and_nothing_is_kept(server, tmp_path):
    base, root = server
    (root / "sam_fake_abcdef.pth").write_bytes(b"not what the name promises")
    dest = tmp_path / "models"
    with pytest.raises(DownloadError, match="does not match"):
        fetch(base + "sam_fake_abcdef.pth", dest, progress=False)
    assert list(dest.iterdir()) == []


def test_corrupt_local_copy_is_downloaded_again(server, tmp_path):
    base, root = server
    payload = b"good bytes" * 1000
    name = hashed_file(root, payload)
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / name).write_bytes(b"half a file")
    assert fetch(base + name, dest, progress=False).read_bytes() == payload


def test_official_table_entry_is_checked_against_its_hash(server, tmp_path, monkeypatch):
    base, root = server
    (root / "sam_vit_b_01ec64.pth").write_bytes(b"an impostor")
    entry = download.CHECKPOINTS["vit_b"]
    monkeypatch.setitem(download.CHECKPOINTS, "vit_b", replace(entry, url=base + "sam_vit_b_01ec64.pth"))
    with pytest.raises(DownloadError, match="01ec64"):
        fetch("vit_b", tmp_path, progress=False)
    assert not (tmp_path / "sam_vit_b_01ec64.pth").exists()


def test_file_without_known_hash_downloads(server, tmp_path, monkeypatch):
    base, root = server
    (root / "sam_b.pt").write_bytes(b"ultralytics weights")
    monkeypatch.setitem(download.CHECKPOINTS, "sam_b", replace(download.CHECKPOINTS["sam_b"], url=base + "sam_b.pt"))
    assert fetch("sam_b.pt", tmp_path, progress=False).read_bytes() == b"ultralytics weights"


def test_http_errors_and_short_transfers(server, tmp_path):
    base, _ = server
    dest = tmp_path / "models"
    with pytest.raises(DownloadError, match="404"):
        fetch(base + "missing.pth", dest, progress=False)
    with pytest.raises(DownloadError):
        fetch(base + "short/sam.pth", dest, progress=False)
    assert list(dest.iterdir()) == []


def test_unknown_names_and_unreachable_hosts(tmp_path):
    with pytest.raises(ValueError, match="vit_b"):
        fetch("vit_x", tmp_path)
    with pytest.raises(DownloadError):
        fetch("http://127.0.0.1:9/sam_vit_b_01ec64.pth", tmp_path, progress=False, timeout=2)


def test_table_names_resolve():
    assert download.resolve("vit_h").url.endswith("sam_vit_h_4b8939.pth")
    assert download.resolve("sam_vit_l_0b3195.pth").sha256 == "0b3195"
    assert download.resolve("mobile_sam").filename == "mobile_sam.pt"
    assert download.resolve("https://example.org/x/sam_vit_b_01ec64.pth").sha256 == "01ec64"


def test_sam2_names_resolve_to_meta_without_invented_hashes():
    for size in ("tiny", "small", "base_plus", "large"):
        entry = download.resolve(f"sam2.1_hiera_{size}")
        assert entry.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{size}.pt"
        assert entry.filename == f"sam2.1_hiera_{size}.pt" and entry.sha256 is None
        assert download.resolve(f"sam2.1_hiera_{size}.pt") == entry
        assert download.resolve(f"sam2_hiera_{size}").url.endswith(f"/072824/sam2_hiera_{size}.pt")


def test_sam2_checkpoint_downloads_and_loads(server, tmp_path, monkeypatch):
    """A SAM 2.1 file through its table entry (served locally), then loaded and checked by its contents."""
    import torch

    from model.sam2_checkpoint import Sam2Config, load_with_config
    from testsupport.sam2_checkpoints import SMALL, small_checkpoint

    base, root = server
    path, _ = small_checkpoint(root, seed=2)
    path.rename(root / "sam2.1_hiera_tiny.pt")
    entry = download.CHECKPOINTS["sam2.1_hiera_tiny"]
    monkeypatch.setitem(download.CHECKPOINTS, "sam2.1_hiera_tiny", replace(entry, url=base + "sam2.1_hiera_tiny.pt"))
    local = fetch("sam2.1_hiera_tiny", tmp_path / "models", progress=False)
    config = Sam2Config(num_heads=1, global_att_blocks=SMALL["global_att_blocks"], window_spec=SMALL["window_spec"],
                        image_size=SMALL["image_size"])
    sam = load_with_config(local, config, device="cpu", dtype=torch.float32)
    assert sam.fingerprint == hashlib.sha256(local.read_bytes()).hexdigest()[:16]
