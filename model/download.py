"""Official SAM checkpoints: where they live, how to check them, and a safe download.

A download streams into a temporary file beside the destination, is hashed on the way, and is
renamed into place only once complete and verified, so the destination name never holds a partial
or wrong file and an existing file there can be reused offline.

The table is the one list of official checkpoints: the backend's settings resolve ``SAM_CHECKPOINT=vit_b`` through
it too, so the name a user serves and the file ``sam-backend download`` writes cannot drift apart. That is why this
module imports neither torch nor, until a download starts, the HTTP client: reading the table must stay cheap.

Meta's file names carry the first 6 hex digits of the file's sha256 (``sam_vit_b_01ec64.pth``), the
torch-hub convention: that prefix is what we check. For files whose hash we do not know (MobileSAM,
the Ultralytics assets, SAM 2 / 2.1 from Meta or Ultralytics) no hash is invented; they are checked for a complete transfer only.

SAM 2 / SAM 2.1 (``sam2.1_hiera_{tiny,small,base_plus,large}``, ``sam2_hiera_*``): Meta publishes no
checksum for them (neither in the file names nor beside them in its download script), so none is
listed; a download is checked for a complete transfer (the byte count the server announced), and
``model.load`` then checks the contents: a file that is not a whole SAM 2 state dict of a released
architecture, with every image-path tensor of the right shape, is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

META = "https://dl.fbaipublicfiles.com/segment_anything/"
ULTRALYTICS = "https://github.com/ultralytics/assets/releases/download/v8.3.0/"
# Ultralytics' SAM 2 / 2.1 files: the release ultralytics 8.4 downloads them from (attempt_download_asset).
ULTRALYTICS_SAM2 = "https://github.com/ultralytics/assets/releases/download/v8.4.0/"
META_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"
META_SAM2_1 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_SAM2_SIZES = ("tiny", "small", "base_plus", "large")
_CHUNK = 1 << 20
# torch-hub style hash in a file name: name_<hex>.ext or name-<hex>.ext.
_HASH_IN_NAME = re.compile(r"[_-]([0-9a-f]{6,64})\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Checkpoint:
    url: str
    filename: str
    sha256: str | None  # full hash or a prefix of it; None when unknown


CHECKPOINTS: dict[str, Checkpoint] = {
    "vit_b": Checkpoint(META + "sam_vit_b_01ec64.pth", "sam_vit_b_01ec64.pth", "01ec64"),
    "vit_l": Checkpoint(META + "sam_vit_l_0b3195.pth", "sam_vit_l_0b3195.pth", "0b3195"),
    "vit_h": Checkpoint(META + "sam_vit_h_4b8939.pth", "sam_vit_h_4b8939.pth", "4b8939"),
    "vit_t": Checkpoint("https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
                        "mobile_sam.pt", None),
    "sam_b": Checkpoint(ULTRALYTICS + "sam_b.pt", "sam_b.pt", None),
    "sam_l": Checkpoint(ULTRALYTICS + "sam_l.pt", "sam_l.pt", None),
    "ultralytics_mobile_sam": Checkpoint(ULTRALYTICS + "mobile_sam.pt", "ultralytics_mobile_sam.pt", None),
}
# SAM 2.1 and SAM 2 (no published checksums, see above).
CHECKPOINTS.update({f"sam2.1_hiera_{size}": Checkpoint(f"{META_SAM2_1}sam2.1_hiera_{size}.pt",
                                                       f"sam2.1_hiera_{size}.pt", None) for size in _SAM2_SIZES})
CHECKPOINTS.update({f"sam2_hiera_{size}": Checkpoint(f"{META_SAM2}sam2_hiera_{size}.pt", f"sam2_hiera_{size}.pt", None)
                    for size in _SAM2_SIZES})
# Ultralytics' SAM 2.1 and SAM 2 files (Meta's weights in Meta's key layout, see model.sam2_checkpoint): t(iny),
# s(mall), b(ase+), l(arge). Ultralytics publishes no checksum for them either.
CHECKPOINTS.update({f"{version}_{size}": Checkpoint(f"{ULTRALYTICS_SAM2}{version}_{size}.pt", f"{version}_{size}.pt", None)
                    for version in ("sam2.1", "sam2") for size in "tsbl"})
# Other spellings users type for an official name (matched like names: trimmed, any case).
ALIASES: dict[str, str] = {
    "mobile_sam": "vit_t", "mobilesam": "vit_t", "sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h",
}


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded or did not verify."""


def official_name(text: str) -> str | None:
    """The table's name for ``text`` (a name or an alias, trimmed, any case), else None.

    File names are not names: a file name is a path to whoever reads it (``SAM_CHECKPOINT=mobile_sam.pt`` may
    be a file in the working directory); ``resolve`` maps the table's file names separately.
    """
    key = text.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in CHECKPOINTS else None


def resolve(name_or_url: str) -> Checkpoint:
    """A table entry by name / alias / the entry's file name, or an ad-hoc entry for an http(s) URL."""
    name = official_name(name_or_url)
    if name is not None:
        return CHECKPOINTS[name]
    by_filename = {entry.filename: entry for entry in CHECKPOINTS.values()}
    if name_or_url in by_filename:
        return by_filename[name_or_url]
    parsed = urlparse(name_or_url)
    if parsed.scheme in ("http", "https") and parsed.netloc:
        filename = Path(unquote(parsed.path)).name
        if not filename:
            raise ValueError(f"{name_or_url}: the URL does not end in a file name")
        match = _HASH_IN_NAME.search(filename)
        return Checkpoint(name_or_url, filename, match.group(1) if match else None)
    known = ", ".join(sorted(CHECKPOINTS))
    raise ValueError(f"unknown checkpoint {name_or_url!r}: give an http(s) URL or one of {known}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(digest: str, expected: str | None) -> bool:
    return expected is None or digest.startswith(expected.lower())


def manual_download_hint(name_or_url: str, dest_dir: str | os.PathLike) -> str:
    """What to do when the download fails (no network, a proxy, a blocked host): fetch the file by hand.

    Says where the file must go for the name to find it, how to check it, and that any path works with
    ``--checkpoint PATH`` (``SAM_CHECKPOINT``)."""
    try:
        entry = resolve(name_or_url)
    except ValueError:
        return ""
    dest = Path(dest_dir) / entry.filename
    check = f" (its sha256 starts with {entry.sha256})" if entry.sha256 else ""
    return (f"Download it by hand from {entry.url}{check} and put it at {dest}, where `--checkpoint "
            f"{name_or_url}` looks for it; or keep the file anywhere and start with --checkpoint /path/to/"
            f"{entry.filename} (SAM_CHECKPOINT=/path/to/{entry.filename}).")


def fetch(name_or_url: str, dest_dir: str | os.PathLike, progress: bool = True, timeout: float = 30.0) -> Path:
    """The local path of a checkpoint, downloading it into ``dest_dir`` unless a verified copy is there."""
    import requests
    from tqdm import tqdm

    entry = resolve(name_or_url)
    directory = Path(dest_dir)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / entry.filename
    if dest.is_file() and _verified(sha256_of(dest), entry.sha256):
        return dest

    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=directory)
    tmp = Path(tmp_name)
    try:
        digest, received, expected_size = hashlib.sha256(), 0, None
        with os.fdopen(fd, "wb") as out, requests.get(entry.url, stream=True, timeout=timeout) as response:
            if response.status_code != 200:
                raise DownloadError(f"{entry.url}: HTTP {response.status_code} {response.reason}")
            length = response.headers.get("Content-Length")
            expected_size = int(length) if length and length.isdigit() else None
            with tqdm(total=expected_size, unit="B", unit_scale=True, desc=entry.filename,
                      disable=not progress) as bar:
                for chunk in response.iter_content(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected_size is not None and received != expected_size:
            raise DownloadError(f"{entry.url}: transfer ended after {received} of {expected_size} bytes")
        if received == 0:
            raise DownloadError(f"{entry.url}: the server sent an empty file")
        if not _verified(digest.hexdigest(), entry.sha256):
            raise DownloadError(f"{entry.url}: sha256 {digest.hexdigest()[:16]}... does not match the expected "
                                f"{entry.sha256}; the file was not kept")
        os.replace(tmp, dest)
        return dest
    except requests.RequestException as exc:
        raise DownloadError(f"{entry.url}: download failed ({exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
