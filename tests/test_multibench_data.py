"""multimodal_imdb.hdf5: the generator writes the release's format with a learnable signal; a missing or
malformed file is a clear error; the real file is found by option or environment variable."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from deqfusion.adapters import multibench as A
from deqfusion.adapters.multibench import data as D


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return D.generate(tmp_path_factory.mktemp("mmimdb") / D.FILE_NAME, n_train=400, n_dev=50, n_test=200, seed=3)


def test_generated_file_has_the_release_format(generated):
    with h5py.File(generated, "r") as f:
        assert sorted(f.keys()) == sorted(D.SOURCES)
        n = 650
        want = {"features": ((n, 300), np.float32), "vgg_features": ((n, 4096), np.float32),
                "genres": ((n, 23), np.int32), "images": ((n, 3, 256, 160), np.int32),
                "imdb_ids": ((n,), np.dtype("S7")), "sequences": ((n,), np.dtype("O"))}
        for name, (shape, dtype) in want.items():
            assert f[name].shape == shape and f[name].dtype == dtype, name
        assert h5py.check_vlen_dtype(f["sequences"].dtype) == np.dtype("int32")
        assert f["three_grams"].dtype == np.float32 and f["word_grams"].dtype == np.float32
        assert json.loads(f["genres"].attrs["target_names"]) == [g for g, _ in D.GENRES]
        assert [d.label for d in f["images"].dims] == ["batch", "channel", "height", "width"]
        assert [d.label for d in f["genres"].dims] == ["batch", "classes"]
        assert f["imdb_ids"][0] == b"9000000" and len(f["imdb_ids"][5]) == 7
        assert set(np.unique(f["genres"][:])) == {0, 1} and f["genres"][:].sum(1).min() >= 1
        assert (f["vgg_features"][:] >= 0).all()  # post-ReLU, like VGG fc7
        split = f.attrs["split"]
        assert split.dtype.names == ("split", "source", "start", "stop", "indices", "available", "comment")
        assert len(split) == 3 * len(D.SOURCES) and all(split["available"])
        assert D.read_splits(f) == {"train": (0, 400), "dev": (400, 450), "test": (450, 650)}
        assert D.GENERATED_ATTR in f.attrs and "not a result" in f.attrs[D.GENERATED_ATTR]
        assert f["images"].id.get_storage_size() == 0  # posters are never written: the fill value, no storage
    info = D.check_file(generated)
    assert info.generated and info.num_samples == 650 and not info.upstream_layout


def test_generated_genres_are_learnable_from_both_modalities(generated):
    """Ridge regression on the training split beats the label prior on the test split, and both modalities together
    beat either one (the fusion has something to fuse)."""
    with h5py.File(generated, "r") as f:
        text, image, y = f["features"][:], f["vgg_features"][:], f["genres"][:].astype(float)

    def f1(x):  # ridge regression in its dual form (400 training rows), micro F1 at threshold 0.5
        x = (x - x[:400].mean(0)) / (x[:400].std(0) + 1e-6)
        x = x / np.sqrt(x.shape[1])
        alpha = np.linalg.solve(x[:400] @ x[:400].T + 0.1 * np.eye(400), y[:400] - y[:400].mean(0))
        pred, true = (x[450:] @ (x[:400].T @ alpha) + y[:400].mean(0)) > 0.5, y[450:] > 0
        return 2 * (pred & true).sum() / (pred.sum() + true.sum())

    both, t, i = f1(np.concatenate([text, image], 1)), f1(text), f1(image)
    prior = y[:400].mean(0) > 0.5
    base = 2 * (prior[None] & (y[450:] > 0)).sum() / (prior.sum() * 200 + y[450:].sum())
    assert both > t + 0.05 and both > i + 0.05 and min(t, i) > base, (both, t, i, base)


def test_generated_file_is_deterministic(tmp_path):
    a = D.generate(tmp_path / "a.hdf5", n_train=8, n_dev=4, n_test=4, seed=1)
    b = D.generate(tmp_path / "b.hdf5", n_train=8, n_dev=4, n_test=4, seed=1)
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for name in ("features", "vgg_features", "genres"):
            assert np.array_equal(fa[name][:], fb[name][:])
    with pytest.raises(ValueError, match="n_dev must be >= 2"):
        D.generate(tmp_path / "c.hdf5", n_dev=1)


def _release_shaped(path, n=D.NUM_SAMPLES, splits=D.UPSTREAM_SPLITS, **override):
    """A file with the release's datasets and shapes whose rows are never written (it stays tiny)."""
    shapes = {"features": ((n, 300), "float32"), "vgg_features": ((n, 4096), "float32"), "genres": ((n, 23), "int32")}
    shapes.update(override)
    with h5py.File(path, "w") as f:
        for name, spec in shapes.items():
            if spec is not None:
                f.create_dataset(name, spec[0], dtype=spec[1], chunks=True)
        if splits:
            f.attrs["split"] = D.split_array(dict(splits))
    return path


def test_release_layout_is_accepted(tmp_path):
    info = D.check_file(_release_shaped(tmp_path / "real.hdf5"), require_upstream_layout=True)
    assert info.upstream_layout and not info.generated and info.num_samples == D.NUM_SAMPLES
    info = D.check_file(_release_shaped(tmp_path / "nosplit.hdf5", splits=None), require_upstream_layout=True)
    assert info.upstream_layout  # without a split attribute: the loader's fixed ranges


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist; download multimodal_imdb.hdf5 .*archive.org/download/mmimdb"),
    ("not_hdf5", "is not an HDF5 file .*expected MM-IMDB's multimodal_imdb.hdf5 with 'features' \\(N, 300\\) float32, "
                 "'vgg_features' \\(N, 4096\\) float32, 'genres' \\(N, 23\\) int32"),
    ("no_vgg", "has no dataset 'vgg_features' \\(it has \\['features', 'genres'\\]\\); MultiBench's MM-IMDB loader reads"),
    ("bad_shape", "dataset 'vgg_features' is \\(25959, 2048\\) float32, expected \\(N, 4096\\) float32"),
    ("bad_dtype", "dataset 'genres' is \\(25959, 23\\) float32, expected \\(N, 23\\) int32"),
    ("rows", "'vgg_features' has 100 rows but 'features' has 25959"),
    ("short", "has 1000 rows and splits \\(no split attribute\\); MultiBench's get_data.py reads rows by"),
])
def test_malformed_files_are_clear_errors(tmp_path, case, match):
    path = tmp_path / "f.hdf5"
    if case == "not_hdf5":
        path.write_text("not hdf5")
    elif case == "no_vgg":
        _release_shaped(path, vgg_features=None)
    elif case == "bad_shape":
        _release_shaped(path, vgg_features=((D.NUM_SAMPLES, 2048), "float32"))
    elif case == "bad_dtype":
        _release_shaped(path, genres=((D.NUM_SAMPLES, 23), "float32"))
    elif case == "rows":
        _release_shaped(path, vgg_features=((100, 4096), "float32"))
    elif case == "short":
        _release_shaped(path, n=1000, splits=None)
    with pytest.raises(D.DataError, match=match):
        D.check_file(path)


def test_generated_file_is_refused_where_the_release_layout_is_needed(generated):
    with pytest.raises(D.DataError, match="small generated file: run it through `deqfusion reproduce multibench "
                                          "--generated`"):
        D.check_file(generated, require_upstream_layout=True)
    # the patched example's data_path() accepts it only while a runner maps the ranges onto the file's split
    with A.configure(data=str(generated)):
        with pytest.raises(D.DataError, match="small generated file"):
            A.data_path("../video/multimodal_imdb.hdf5")
        with D.own_splits():
            assert A.data_path("../video/multimodal_imdb.hdf5") == str(generated)


def test_locate_order(tmp_path, monkeypatch):
    monkeypatch.delenv(D.ENV_FILE, raising=False)
    monkeypatch.delenv(D.ENV_DATA, raising=False)
    with pytest.raises(D.DataError, match="no MM-IMDB file given: download"):
        D.locate()
    folder = tmp_path / "data"
    (folder / "mmimdb").mkdir(parents=True)
    (folder / "mmimdb" / D.FILE_NAME).write_text("x")
    monkeypatch.setenv(D.ENV_DATA, str(folder))
    assert D.locate() == folder / "mmimdb" / D.FILE_NAME
    monkeypatch.setenv(D.ENV_FILE, str(tmp_path / "env.hdf5"))
    assert D.locate() == tmp_path / "env.hdf5"
    assert D.locate(configured=str(tmp_path)) == tmp_path / D.FILE_NAME  # a folder holding the file
    assert D.locate(tmp_path / "given.hdf5", configured="/other") == tmp_path / "given.hdf5"
    monkeypatch.delenv(D.ENV_FILE)
    monkeypatch.setenv(D.ENV_DATA, str(tmp_path / "empty"))
    with pytest.raises(D.DataError, match="no multimodal_imdb.hdf5 in \\$DEQFUSION_DATA"):
        D.locate()


def test_data_path_checks_the_examples_default(tmp_path, monkeypatch):
    monkeypatch.delenv("DEQFUSION_MULTIBENCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(D.DataError, match="MM-IMDB file ../video/multimodal_imdb.hdf5 does not exist"):
        A.data_path("../video/multimodal_imdb.hdf5")
    (tmp_path.parent / "video").mkdir(exist_ok=True)
    _release_shaped(tmp_path.parent / "video" / D.FILE_NAME)
    assert A.data_path("../video/multimodal_imdb.hdf5") == "../video/multimodal_imdb.hdf5"
