"""MOGONET's BRCA and ROSMAP data folders: locate, download, verify.

MM-Dynamics reads MOGONET's data layout unchanged (``{1,2,3}_{tr,te}.csv`` feature matrices and
``labels_{tr,te}.csv``, comma-separated, no header).  MOGONET (github.com/txWang/MOGONET) is MIT
licensed; this module never ships the data, it finds or fetches it on the user's machine:

1. a folder given explicitly (``--data-dir``), or
2. the environment variable ``DEQFUSION_DATA``, or
3. the cache (``$DEQFUSION_CACHE`` or ``~/.cache/deqfusion``)/mogonet/<commit>/<DATASET>, filling
   in missing files by download from MOGONET's repository at a pinned commit.

A folder may be the dataset folder itself (``.../ROSMAP``) or its parent (``.../data`` holding
``ROSMAP/``).  Every file is checked against the git-blob SHA-1 the repository records for it
(``sha1(b"blob %d\\0" % len(data) + data)``), so a copy is accepted only if it is byte-identical
to MOGONET's.  Downloads go to a temporary file in the cache folder, are verified, and only then
renamed into place, so nothing half-downloaded or corrupt stays in the cache.

The cheap structural checks (row and column counts, labels in range) run on every load and catch
a re-serialised or hand-edited copy when hash checks are switched off.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

MOGONET_REPO = "txWang/MOGONET"
# The commit that added the data folders ("initial commit", 2021-03-31); the files are unchanged since.
MOGONET_COMMIT = "9ed714f5c6f3e5a30178202e5d09d763fce67398"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{MOGONET_REPO}/{MOGONET_COMMIT}"

ENV_DATA = "DEQFUSION_DATA"
ENV_CACHE = "DEQFUSION_CACHE"
ENV_BASE_URL = "DEQFUSION_MOGONET_URL"


class DataError(RuntimeError):
    """A MOGONET data file is missing, corrupt or malformed. The message names the file and the fix."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    view_dims: Tuple[int, ...]
    view_names: Tuple[str, ...]
    num_train: int
    num_test: int
    num_class: int
    blobs: Dict[str, str]  # file name -> git blob SHA-1

    @property
    def files(self) -> List[str]:
        """The files MM-Dynamics reads, in a fixed order."""
        views = [f"{v}_{split}.csv" for v in range(1, len(self.view_dims) + 1) for split in ("tr", "te")]
        return views + ["labels_tr.csv", "labels_te.csv"]

    def shape(self, file: str) -> Tuple[int, int]:
        """(rows, columns) a file must have; labels are one column."""
        stem = file[:-4]
        if stem.startswith("labels_"):
            return (self.num_train if stem.endswith("tr") else self.num_test, 1)
        view, split = stem.split("_")
        return (self.num_train if split == "tr" else self.num_test, self.view_dims[int(view) - 1])


DATASETS: Dict[str, DatasetSpec] = {
    "ROSMAP": DatasetSpec(
        name="ROSMAP",
        view_dims=(200, 200, 200),
        view_names=("mRNA", "DNA methylation", "miRNA"),
        num_train=245,
        num_test=106,
        num_class=2,
        blobs={
            "1_tr.csv": "e35c70223b8506acf45ee46509356db39ea70ea4",
            "1_te.csv": "c52d01e785471c42a17f0aaeeae5c65822214978",
            "2_tr.csv": "64378292cd1ce30af3e2b4462e25de05f498fbc6",
            "2_te.csv": "c2cc6718934085d74a4260c6268e4f023dad7ce3",
            "3_tr.csv": "7a5e82a9a2d08b58be531c6c6e9dd657d956a626",
            "3_te.csv": "266f6f6292f1bf8305c20b9362bdb033d6bc5ea5",
            "labels_tr.csv": "535f5fa69c9b2e61f1f31ca6e278c24c5f033f63",
            "labels_te.csv": "6773b84fcd8e2526d020f7f7f3c9440290bff9c7",
        },
    ),
    "BRCA": DatasetSpec(
        name="BRCA",
        view_dims=(1000, 1000, 503),
        view_names=("mRNA", "DNA methylation", "miRNA"),
        num_train=612,
        num_test=263,
        num_class=5,
        blobs={
            "1_tr.csv": "f9592a73980ecb37f332b7a6d9b57b5a99078090",
            "1_te.csv": "d34625f7875308260b4b83b584c5b8eeffd621da",
            "2_tr.csv": "c58c38acd33f14dd99295c6eb629cc56885af98e",
            "2_te.csv": "ac5dd437b58659090eb6934e7e3a4a9a52a4a553",
            "3_tr.csv": "08e7b9a8c490892df01a474973c3e53efc76beb7",
            "3_te.csv": "7f8a67831896b6302f446dca88f0aeac71103635",
            "labels_tr.csv": "500c4965cfb07b192ddee944a022d02e2481ef30",
            "labels_te.csv": "44fd92df634fa828e26c9a6766af640987a294ae",
        },
    ),
}


def spec(dataset: str) -> DatasetSpec:
    key = dataset.upper()
    if key not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


def git_blob_sha1(path: Path) -> str:
    """The SHA-1 git records for a file's content: sha1(b"blob <size>\\0" + content)."""
    path = Path(path)
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_url(dataset: str, file: str, base_url: Optional[str] = None) -> str:
    base = (base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")
    return f"{base}/{spec(dataset).name}/{file}"


def _where_to_get(ds: DatasetSpec, file: str) -> str:
    return (
        f"get it from {source_url(ds.name, file, DEFAULT_BASE_URL)} (MOGONET, MIT license), or let "
        f"`deqfusion reproduce mmdynamics --dataset {ds.name.lower()}` download it, or point --data-dir / "
        f"${ENV_DATA} at a folder holding {ds.name}/"
    )


def cache_root() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deqfusion"


def cache_dir(dataset: str) -> Path:
    return cache_root() / "mogonet" / MOGONET_COMMIT / spec(dataset).name


def _dataset_folder(folder: Path, ds: DatasetSpec) -> Path:
    """Accept the dataset folder itself or a parent holding it."""
    folder = Path(folder).expanduser()
    for candidate in (folder / ds.name, folder / ds.name.lower()):
        if candidate.is_dir():
            return candidate
    return folder


def check_hash(path: Path, ds: DatasetSpec, file: str) -> None:
    if not path.is_file():
        raise DataError(f"{ds.name} file {file} is missing from {path.parent}; {_where_to_get(ds, file)}")
    got = git_blob_sha1(path)
    want = ds.blobs[file]
    if got != want:
        raise DataError(
            f"{path} is not MOGONET's {ds.name}/{file}: its git-blob SHA-1 is {got}, expected {want} "
            f"(corrupt, truncated or re-serialised copy); {_where_to_get(ds, file)}"
        )


def check_structure(path: Path, ds: DatasetSpec, file: str) -> None:
    """Row/column counts of a matrix file (without parsing floats), or full label checks."""
    rows, cols = ds.shape(file)
    if not path.is_file():
        raise DataError(f"{ds.name} file {file} is missing from {path.parent}; {_where_to_get(ds, file)}")
    with open(path, encoding="ascii", errors="replace") as fh:
        lines = [line for line in fh.read().splitlines() if line.strip()]
    if len(lines) != rows:
        raise DataError(f"{path}: expected {rows} rows for {ds.name}/{file}, found {len(lines)}")
    for i, line in enumerate(lines):
        n = line.count(",") + 1
        if n != cols:
            raise DataError(
                f"{path}: expected {cols} comma-separated values per row for {ds.name}/{file}, "
                f"row {i + 1} has {n}"
            )
    if file.startswith("labels_"):
        for i, line in enumerate(lines):
            try:
                value = float(line)
            except ValueError:
                raise DataError(f"{path}: row {i + 1} is not a number: {line[:40]!r}") from None
            if value != int(value) or not 0 <= value < ds.num_class:
                raise DataError(
                    f"{path}: row {i + 1} has label {line.strip()!r}; {ds.name} labels must be integers "
                    f"0..{ds.num_class - 1}"
                )


def verify_folder(folder: Path, dataset: str, *, check_hashes: bool = True) -> Path:
    """Check every file MM-Dynamics reads; return the dataset folder. Raises DataError."""
    ds = spec(dataset)
    folder = _dataset_folder(Path(folder), ds)
    if not folder.is_dir():
        raise DataError(f"{ds.name} data folder {folder} does not exist; {_where_to_get(ds, ds.files[0])}")
    for file in ds.files:
        if check_hashes:
            check_hash(folder / file, ds, file)
        check_structure(folder / file, ds, file)
    return folder


Opener = Callable[[str], "object"]


def download_file(url: str, dest: Path, blob: str, *, opener: Optional[Opener] = None) -> None:
    """Download url to dest atomically: temp file in dest's folder, verify the git-blob hash, rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    opener = opener or urllib.request.urlopen
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            response = opener(url)
            try:
                shutil.copyfileobj(response, out, 1 << 20)
            finally:
                close = getattr(response, "close", None)
                if close:
                    close()
        got = git_blob_sha1(tmp)
        if got != blob:
            raise DataError(f"download of {url} has git-blob SHA-1 {got}, expected {blob}; nothing was cached")
        os.replace(tmp, dest)
    except DataError:
        raise
    except Exception as err:  # network or I/O error: name the file and the fix
        raise DataError(
            f"could not download {url} into {dest.parent}: {err}; download it by hand and pass --data-dir "
            f"or ${ENV_DATA}"
        ) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch_into_cache(
    dataset: str, *, base_url: Optional[str] = None, opener: Optional[Opener] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """Fill the cache folder for a dataset (downloading only what is missing or corrupt)."""
    ds = spec(dataset)
    folder = cache_dir(ds.name)
    for file in ds.files:
        path = folder / file
        if path.is_file() and git_blob_sha1(path) == ds.blobs[file]:
            continue
        if progress:
            progress(file)
        download_file(source_url(ds.name, file, base_url), path, ds.blobs[file], opener=opener)
    return folder


def locate(
    dataset: str, data_dir: Optional[Path] = None, *, download: bool = True, check_hashes: bool = True,
    base_url: Optional[str] = None, opener: Optional[Opener] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """The verified dataset folder: --data-dir, then $DEQFUSION_DATA, then the (download) cache."""
    ds = spec(dataset)
    given = data_dir if data_dir is not None else os.environ.get(ENV_DATA) or None
    if given is not None:
        return verify_folder(Path(given), ds.name, check_hashes=check_hashes)
    folder = cache_dir(ds.name)
    if download:
        fetch_into_cache(ds.name, base_url=base_url, opener=opener, progress=progress)
    return verify_folder(folder, ds.name, check_hashes=check_hashes)


def read_rows(path: Path) -> List[str]:
    """The non-empty lines of a data file, byte-exact (used to carve splits without re-serialising)."""
    with open(path, encoding="ascii") as fh:
        return [line for line in fh.read().splitlines() if line.strip()]


def read_labels(path: Path) -> List[int]:
    return [int(float(line)) for line in read_rows(path)]
