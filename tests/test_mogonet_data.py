"""The MOGONET data layer: hash checks, structure checks, local folders, atomic cached downloads."""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from deqfusion.adapters.mmdynamics import data as md

SHARED = Path(os.environ.get("DEQFUSION_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ROSMAP = SHARED / "ROSMAP"
BRCA = SHARED / "BRCA"
needs_rosmap = pytest.mark.skipif(not (ROSMAP / "1_tr.csv").is_file(),
                                  reason=f"ROSMAP not found at {ROSMAP} (set DEQFUSION_SHARED_DATA)")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    for var in (md.ENV_DATA, md.ENV_BASE_URL):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(md.ENV_CACHE, str(tmp_path / "cache"))


@pytest.fixture
def rosmap_copy(tmp_path) -> Path:
    if not (ROSMAP / "1_tr.csv").is_file():
        pytest.skip(f"ROSMAP not found at {ROSMAP}")
    dst = tmp_path / "data" / "ROSMAP"
    dst.mkdir(parents=True)
    for f in md.DATASETS["ROSMAP"].files:
        shutil.copyfile(ROSMAP / f, dst / f)
    return dst


def test_git_blob_sha1_matches_git(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"")
    assert md.git_blob_sha1(p) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git hash-object /dev/null
    p.write_bytes(b"hello\n")
    assert md.git_blob_sha1(p) == "ce013625030ba8dba906f756967f9e9ca394464a"


@needs_rosmap
def test_shared_rosmap_verifies_and_brca_partial_files_match():
    assert md.verify_folder(SHARED, "rosmap") == SHARED / "ROSMAP"
    for f in ("labels_tr.csv", "labels_te.csv", "3_te.csv"):  # the BRCA files that are present here
        if (BRCA / f).is_file():
            md.check_hash(BRCA / f, md.DATASETS["BRCA"], f)
            md.check_structure(BRCA / f, md.DATASETS["BRCA"], f)


def test_incomplete_brca_names_the_missing_file_and_its_source(tmp_path):
    if not (BRCA / "labels_tr.csv").is_file():
        pytest.skip(f"BRCA labels not found at {BRCA}")
    with pytest.raises(md.DataError) as err:
        md.verify_folder(BRCA, "brca")
    msg = str(err.value)
    assert "1_tr.csv" in msg and "missing" in msg
    assert "raw.githubusercontent.com/txWang/MOGONET/" in msg and "/BRCA/1_tr.csv" in msg


def test_missing_file_is_named(rosmap_copy):
    (rosmap_copy / "2_te.csv").unlink()
    with pytest.raises(md.DataError, match=r"ROSMAP file 2_te\.csv is missing") as err:
        md.verify_folder(rosmap_copy, "ROSMAP")
    assert "DEQFUSION_DATA" in str(err.value)


def test_hash_mismatch_is_named(rosmap_copy):
    path = rosmap_copy / "3_tr.csv"
    data = path.read_bytes()
    path.write_bytes(data[:-30] + b"0" * 30)  # same size, different content
    with pytest.raises(md.DataError) as err:
        md.verify_folder(rosmap_copy, "ROSMAP")
    msg = str(err.value)
    assert "3_tr.csv" in msg and "git-blob SHA-1" in msg and md.DATASETS["ROSMAP"].blobs["3_tr.csv"] in msg


def test_wrong_shape_is_named(rosmap_copy):
    path = rosmap_copy / "1_te.csv"
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows[:-1]) + "\n")  # one row short
    with pytest.raises(md.DataError, match=r"expected 106 rows for ROSMAP/1_te\.csv, found 105"):
        md.verify_folder(rosmap_copy, "ROSMAP", check_hashes=False)
    rows[4] = rows[4].rsplit(",", 1)[0]  # one column short in row 5
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(md.DataError, match=r"expected 200 comma-separated values .* row 5 has 199"):
        md.verify_folder(rosmap_copy, "ROSMAP", check_hashes=False)


@pytest.mark.parametrize("bad", ["2.000000000000000000e+00", "-1", "0.5", "abc"])
def test_label_out_of_range_is_named(rosmap_copy, bad):
    path = rosmap_copy / "labels_tr.csv"
    rows = path.read_text().splitlines()
    rows[7] = bad
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(md.DataError, match=r"labels_tr\.csv: row 8"):
        md.verify_folder(rosmap_copy, "ROSMAP", check_hashes=False)


def test_unknown_dataset():
    with pytest.raises(md.DataError, match="unknown dataset 'TCGA'"):
        md.spec("TCGA")


@needs_rosmap
def test_env_var_and_parent_folder(monkeypatch):
    monkeypatch.setenv(md.ENV_DATA, str(SHARED))
    assert md.locate("rosmap", download=False) == SHARED / "ROSMAP"
    # an explicit folder wins over the environment, and may be the dataset folder itself
    monkeypatch.setenv(md.ENV_DATA, "/nonexistent")
    assert md.locate("ROSMAP", ROSMAP, download=False) == ROSMAP


@needs_rosmap
def test_download_into_cache_via_file_url(tmp_path):
    base = "file://" + str(SHARED)
    calls = []
    folder = md.locate("rosmap", base_url=base, progress=calls.append)
    assert folder == md.cache_dir("ROSMAP") and str(folder).startswith(str(tmp_path / "cache"))
    assert sorted(calls) == sorted(md.DATASETS["ROSMAP"].files)
    assert not list(folder.glob("*.part"))
    # a second call downloads nothing
    calls.clear()
    md.locate("rosmap", base_url=base, progress=calls.append)
    assert calls == []


def test_corrupt_download_leaves_nothing_in_cache(tmp_path):
    spec = md.DATASETS["ROSMAP"]

    def opener(url):
        return io.BytesIO(b"not the file\n")

    with pytest.raises(md.DataError, match=r"1_tr\.csv has git-blob SHA-1 .* expected e35c7022"):
        md.fetch_into_cache("rosmap", opener=opener)
    folder = md.cache_dir("ROSMAP")
    assert not any(folder.iterdir())
    assert spec.files[0] == "1_tr.csv"


def test_network_error_is_named(tmp_path):
    def opener(url):
        raise OSError("network unreachable")

    with pytest.raises(md.DataError, match=r"could not download .*ROSMAP/1_tr\.csv.*network unreachable.*--data-dir"):
        md.fetch_into_cache("rosmap", opener=opener)
    assert not any(md.cache_dir("ROSMAP").iterdir())


def test_source_url_is_pinned():
    url = md.source_url("brca", "1_tr.csv")
    assert url == f"https://raw.githubusercontent.com/txWang/MOGONET/{md.MOGONET_COMMIT}/BRCA/1_tr.csv"
