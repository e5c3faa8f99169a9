"""MM-IMDB as MultiBench reads it: ``multimodal_imdb.hdf5`` (Arevalo et al., 2017) -- locate, check, generate.

The file is the Fuel ``H5PYDataset`` that ``make_dataset.py`` of johnarevalo/gmu-mmimdb writes:

=================  ====================  =========  =========================================
dataset            shape                 dtype      content
=================  ====================  =========  =========================================
``features``       (N, 300)              float32    mean GoogleNews word2vec of the plot words
``vgg_features``   (N, 4096)             float32    VGG-16 fc7 (post-ReLU) of the poster
``genres``         (N, 23)               int32      multi-hot; attribute ``target_names`` (JSON)
``images``         (N, 3, 256, 160)      int32      poster, VGG mean subtracted
``sequences``      (N,)                  vlen int32 word ids of the plot
``three_grams``    (N, V3)               float32    TF-IDF of character 3-grams
``word_grams``     (N, Vw)               float32    TF-IDF of words
``imdb_ids``       (N,)                  S7         IMDb ids
=================  ====================  =========  =========================================

plus the root attribute ``split`` (Fuel's split array: one row per split x source with ``start``,
``stop``, ``indices``, ``available``, ``comment``).  The real release has N = 25,959 in the order
train (15,552), dev (2,608), test (7,799), and MultiBench's ``datasets/imdb/get_data.py`` hard-codes
exactly those index ranges (its l.129-135).  Its late-fusion example reads only ``features``,
``vgg_features`` and ``genres`` (``vgg=True``); the robustness path also reads ``imdb_ids``.

:func:`generate` writes a small file in the same format (every dataset, dtype, trailing shape,
dimension label, the ``target_names`` attribute and a Fuel ``split`` array for its own smaller split)
with genres that depend on the features, so the real loader and loop run here.  ``images`` is stored
chunked and never written (every poster is the fill value 0): the path we run reads ``vgg_features``
instead, and 160 KiB per unwritten poster would make the file large for nothing.  The file carries
the root attribute ``deqfusion_generated`` so that no number from it is mistaken for a result.
A generated file is smaller than MultiBench's hard-coded ranges, so the runner maps those ranges
onto the file's own ``split`` attribute (an identity on the real file; see ``runner.py``).

Where the real file is found (:func:`locate`): an explicit path, else ``DEQFUSION_MULTIBENCH_DATA``
(the ``data`` setting), else ``$DEQFUSION_DATA/multimodal_imdb.hdf5`` (or in an ``mmimdb/`` or
``MM-IMDB/`` folder there).  h5py is imported inside the functions.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

FILE_NAME = "multimodal_imdb.hdf5"
SOURCE_URL = "https://archive.org/download/mmimdb/multimodal_imdb.hdf5"
ENV_FILE = "DEQFUSION_MULTIBENCH_DATA"
ENV_DATA = "DEQFUSION_DATA"
GENERATED_ATTR = "deqfusion_generated"

TEXT_DIM, VGG_DIM, NUM_GENRES = 300, 4096, 23
IMAGE_SHAPE = (3, 256, 160)
# MultiBench's get_data.get_dataloader (l.129-135): the index ranges it reads, = the real file's split.
UPSTREAM_SPLITS: Dict[str, Tuple[int, int]] = {"train": (0, 15552), "dev": (15552, 18160), "test": (18160, 25959)}
NUM_SAMPLES = 25959
# The 23 genres of MM-IMDB (Arevalo et al. 2017, Table 1) with their number of movies, most frequent first.
GENRES: Tuple[Tuple[str, int], ...] = (
    ("Drama", 13967), ("Comedy", 8592), ("Romance", 5364), ("Thriller", 5192), ("Crime", 3838),
    ("Action", 3550), ("Adventure", 2710), ("Horror", 2703), ("Documentary", 2082), ("Mystery", 2057),
    ("Sci-Fi", 1991), ("Fantasy", 1933), ("Family", 1668), ("Biography", 1343), ("War", 1335),
    ("History", 1143), ("Music", 1045), ("Animation", 997), ("Musical", 841), ("Western", 705),
    ("Sport", 634), ("Short", 471), ("Film-Noir", 338),
)
# The datasets the late-fusion path needs: name -> (trailing shape, dtype kind, exact dtype of the release)
REQUIRED = {
    "features": ((TEXT_DIM,), "f", "float32"),
    "vgg_features": ((VGG_DIM,), "f", "float32"),
    "genres": ((NUM_GENRES,), "iub", "int32"),
}
SOURCES = ("features", "genres", "images", "imdb_ids", "sequences", "three_grams", "vgg_features", "word_grams")


class DataError(RuntimeError):
    """multimodal_imdb.hdf5 is missing or malformed; the message names what was expected and where to get it."""


def _where_to_get() -> str:
    return (f"download {FILE_NAME} (MM-IMDB, Arevalo et al.; about 15 GB) from {SOURCE_URL} and pass its path "
            f"with --data or ${ENV_FILE} (or put it in ${ENV_DATA}/); for a pipeline check without it use "
            f"`deqfusion reproduce multibench --generated`")


def _expected() -> str:
    return ", ".join(f"'{k}' (N, {', '.join(map(str, s))}) {d}" for k, (s, _, d) in REQUIRED.items())


@dataclass(frozen=True)
class FileInfo:
    """What :func:`check_file` found: sample count, split layout (from the ``split`` attribute) and provenance."""

    path: Path
    num_samples: int
    splits: Dict[str, Tuple[int, int]]
    generated: bool

    @property
    def upstream_layout(self) -> bool:
        """True when the file's splits are the ranges MultiBench's loader hard-codes (the real release)."""
        return self.splits == UPSTREAM_SPLITS


def read_splits(h5: Any) -> Dict[str, Tuple[int, int]]:
    """The file's {split: (start, stop)} for source 'features', from Fuel's ``split`` attribute ({} if absent)."""
    if "split" not in h5.attrs:
        return {}
    out: Dict[str, Tuple[int, int]] = {}
    for row in h5.attrs["split"]:
        src = row["source"].decode() if isinstance(row["source"], bytes) else str(row["source"])
        name = row["split"].decode() if isinstance(row["split"], bytes) else str(row["split"])
        if src == "features" and bool(row["available"]):
            out[name] = (int(row["start"]), int(row["stop"]))
    return out


def check_file(path: Path, *, require_upstream_layout: bool = False) -> FileInfo:
    """Open ``path`` and check what MultiBench's late-fusion path reads; raise DataError naming the fix.

    The three datasets must have their trailing shapes and dtype kinds and the same row count; a ``split``
    attribute must give train/dev/test within the file.  A file without one, or any file when
    ``require_upstream_layout``, must fit the loader's fixed ranges (>= 25,959 rows, the release's split).
    """
    import h5py

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"MM-IMDB file {path} does not exist; {_where_to_get()}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path} is not an HDF5 file ({err}); expected MM-IMDB's {FILE_NAME} with {_expected()}; "
                        f"{_where_to_get()}") from None
    with h5:
        n = None
        for name, (trail, kinds, dtype) in REQUIRED.items():
            if name not in h5:
                raise DataError(f"{path} has no dataset {name!r} (it has {sorted(h5.keys())}); MultiBench's MM-IMDB "
                                f"loader reads {_expected()}; {_where_to_get()}")
            ds = h5[name]
            if len(ds.shape) != 1 + len(trail) or tuple(ds.shape[1:]) != trail or ds.dtype.kind not in kinds:
                raise DataError(f"{path}: dataset {name!r} is {ds.shape} {ds.dtype}, expected (N, "
                                f"{', '.join(map(str, trail))}) {dtype}; {_where_to_get()}")
            if n is None:
                n = ds.shape[0]
            elif ds.shape[0] != n:
                raise DataError(f"{path}: {name!r} has {ds.shape[0]} rows but 'features' has {n}; every dataset "
                                f"holds one row per movie")
        splits = read_splits(h5)
        generated = GENERATED_ATTR in h5.attrs
    assert n is not None
    if splits:
        names = sorted(splits)
        stop = max(s for _, s in splits.values())
        if names != ["dev", "test", "train"] or stop > n:
            raise DataError(f"{path}: the 'split' attribute gives {splits}, expected train/dev/test ranges within "
                            f"the {n} rows")
    if require_upstream_layout or not splits:
        if n < NUM_SAMPLES or (splits and splits != UPSTREAM_SPLITS):
            raise DataError(
                f"{path} has {n} rows and splits {splits or '(no split attribute)'}; MultiBench's get_data.py reads "
                f"rows by the real release's fixed ranges {UPSTREAM_SPLITS} (N = {NUM_SAMPLES}); "
                + ("this is a small generated file: run it through `deqfusion reproduce multibench --generated`, "
                   "which maps those ranges onto the file's own split" if generated else _where_to_get()))
    return FileInfo(path=path, num_samples=int(n), splits=splits or dict(UPSTREAM_SPLITS), generated=generated)


def locate(path: Optional[Path] = None, *, configured: Optional[str] = None) -> Path:
    """The MM-IMDB file: ``path``, else ``configured`` (the ``data`` setting / $DEQFUSION_MULTIBENCH_DATA),
    else ``$DEQFUSION_DATA`` (the file, or a folder holding it directly or in mmimdb/ or MM-IMDB/)."""
    given = path or configured or os.environ.get(ENV_FILE) or None
    if given:
        p = Path(given).expanduser()
        return p / FILE_NAME if p.is_dir() else p
    root = os.environ.get(ENV_DATA)
    if root:
        base = Path(root).expanduser()
        for cand in (base, base / FILE_NAME, base / "mmimdb" / FILE_NAME, base / "MM-IMDB" / FILE_NAME):
            if cand.is_file():
                return cand
        raise DataError(f"no {FILE_NAME} in ${ENV_DATA}={root} (looked in it and in mmimdb/, MM-IMDB/); "
                        f"{_where_to_get()}")
    raise DataError(f"no MM-IMDB file given: {_where_to_get()}")


_own_splits = [0]


@contextlib.contextmanager
def own_splits() -> Iterator[None]:
    """Within the block the runner maps MultiBench's fixed ranges onto each file's own split, so
    :func:`deqfusion.adapters.multibench.data_path` accepts a (small, generated) file of another layout."""
    _own_splits[0] += 1
    try:
        yield
    finally:
        _own_splits[0] -= 1


def own_splits_active() -> bool:
    return _own_splits[0] > 0


# ------------------------------------------------------------------------------------------------
# the generator


def split_array(splits: Dict[str, Tuple[int, int]]):
    """Fuel's ``split`` attribute (H5PYDataset.create_split_array) for every source over ``splits``."""
    import h5py
    import numpy as np

    split_len = max(len(s) for s in splits)
    source_len = max(len(s) for s in SOURCES)
    dtype = np.dtype([("split", f"S{split_len}"), ("source", f"S{source_len}"), ("start", "<i8"), ("stop", "<i8"),
                      ("indices", h5py.ref_dtype), ("available", "?"), ("comment", "S1")])
    arr = np.empty(len(splits) * len(SOURCES), dtype=dtype)
    i = 0
    for split, (start, stop) in splits.items():
        for source in SOURCES:
            arr[i] = (split.encode(), source.encode(), start, stop, h5py.Reference(), True, b".")
            i += 1
    return arr


def generate(path: Path, *, n_train: int = 192, n_dev: int = 64, n_test: int = 64, seed: int = 0,
             three_gram_dim: int = 64, word_gram_dim: int = 32, noise: float = 0.5) -> Path:
    """Write a small MM-IMDB file in the release's format with a learnable signal; return its path.

    Each movie has a text latent, an image latent and a shared one.  ``features`` is a linear map of
    [text, shared] at word2vec's scale plus noise; ``vgg_features`` a ReLU of a linear map of [image,
    shared] (non-negative, like fc7); genre j is on where a linear score of all three latents plus
    the log-odds of the genre's real frequency, plus noise of scale ``noise``, is positive (at least one
    genre per movie).  Some genres read mostly the text latent and some mostly the image latent, so
    a model gains from both modalities.
    """
    import h5py
    import numpy as np

    for name, v in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test)):
        if v < 2:
            raise ValueError(f"{name} must be >= 2 (MultiBench's encoders use BatchNorm), got {v}")
    n = n_train + n_dev + n_test
    rng = np.random.RandomState(seed)
    k_t, k_i, k_s = 8, 8, 4
    z_t, z_i, z_s = rng.randn(n, k_t), rng.randn(n, k_i), rng.randn(n, k_s)
    text = np.concatenate([z_t, z_s], 1) @ rng.randn(k_t + k_s, TEXT_DIM) * 0.03 + 0.02 * rng.randn(n, TEXT_DIM)
    image = np.maximum(np.concatenate([z_i, z_s], 1) @ rng.randn(k_i + k_s, VGG_DIM) * 0.5
                       + 0.3 * rng.randn(n, VGG_DIM), 0.0)
    # genre scores: even genres lean on the text latent, odd ones on the image latent, all on the shared one
    w_t, w_i, w_s = rng.randn(k_t, NUM_GENRES), rng.randn(k_i, NUM_GENRES), 0.5 * rng.randn(k_s, NUM_GENRES)
    lean = (np.arange(NUM_GENRES) % 2 == 0).astype(float)
    freq = np.array([c for _, c in GENRES], dtype=float) / NUM_SAMPLES
    prior = np.log(freq / (1 - freq))
    score = (z_t @ w_t) * (0.4 + 0.8 * lean) + (z_i @ w_i) * (1.2 - 0.8 * lean) + z_s @ w_s
    logits = score / score.std(0) * 1.5 + prior + noise * rng.randn(n, NUM_GENRES)
    genres = (logits > 0).astype(np.int32)
    none = genres.sum(1) == 0
    genres[none, logits[none].argmax(1)] = 1

    splits = {"train": (0, n_train), "dev": (n_train, n_train + n_dev), "test": (n_train + n_dev, n)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=text.astype(np.float32))
        f.create_dataset("vgg_features", data=image.astype(np.float32))
        g = f.create_dataset("genres", data=genres)
        g.attrs["target_names"] = json.dumps([name for name, _ in GENRES])
        f.create_dataset("images", (n, *IMAGE_SHAPE), dtype="int32", chunks=(1, *IMAGE_SHAPE), compression="gzip")
        seqs = f.create_dataset("sequences", (n,), dtype=h5py.vlen_dtype(np.dtype("int32")))
        for i in range(n):
            seqs[i] = rng.randint(1, 5000, size=rng.randint(5, 40)).astype(np.int32)
        f.create_dataset("three_grams", data=np.maximum(rng.randn(n, three_gram_dim), 0).astype(np.float32) * 0.1)
        f.create_dataset("word_grams", data=np.maximum(rng.randn(n, word_gram_dim), 0).astype(np.float32) * 0.1)
        f.create_dataset("imdb_ids", data=np.array([f"{9000000 + i:07d}".encode() for i in range(n)], dtype="S7"))
        labels = {"features": ("batch", "features"), "vgg_features": ("batch", "features"),
                  "three_grams": ("batch", "features"), "word_grams": ("batch", "features"),
                  "genres": ("batch", "classes"), "imdb_ids": ("batch",),
                  "images": ("batch", "channel", "height", "width")}
        for name, dims in labels.items():
            for d, label in enumerate(dims):
                f[name].dims[d].label = label
        f.attrs["split"] = split_array(splits)
        f.attrs[GENERATED_ATTR] = "generated data, not a result (deqfusion.adapters.multibench.data.generate, " \
                                  f"seed {seed})"
    os.replace(tmp, path)
    return path
