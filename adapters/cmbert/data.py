"""CMU-MOSI as CM-BERT reads it: the text split and the word-aligned audio pickle.

Both live in the upstream repository itself (thuiar/Cross-Modal-BERT at the pin):

* ``data/text/{train,dev,test}.tsv``: a ``text<TAB>label`` header, then 1284 / 229 / 686 rows,
  labels in [-3, 3] (real data, checked by git-blob hash);
* ``data/audio/MOSI_cmu_audio_CLS.pickle``: a tuple ``(train, valid, test)`` of numpy float64 arrays
  of shape (N, 50, 5): 50 word-aligned timesteps x 5 COVAREP features after CMU's feature selection
  (shapes as the maintainer states in the repository's issue #6; float64 because the file is over
  4 MiB: 549,750 values x 8 bytes).  ``run_classifier.py`` unpacks it as
  ``train_audio, valid_audio, test_audio = pickle.load(...)`` and calls ``torch.tensor`` on each.

Snapshots that leave out files of 4 MiB or more lack the pickle.  Then :func:`generate_audio`
writes one of exactly that structure whose features carry a learnable signal (the label, at the
positions of the sentence's words, plus noise), and every number from it is labelled
"generated data, not a result".  A real pickle is recognised by its git-blob hash.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

SPLITS = ("train", "dev", "test")
ROWS: Dict[str, int] = {"train": 1284, "dev": 229, "test": 686}
TIMESTEPS, AUDIO_DIM = 50, 5
TEXT_DIR = Path("data") / "text"
AUDIO_FILE = Path("data") / "audio" / "MOSI_cmu_audio_CLS.pickle"
# git-blob SHA-1s at 3e44dce6b00431f88f8d5de12bef9706116fa97b (git ls-tree)
TEXT_BLOBS = {
    "train": "22ae7d18d02ab748e9212d3b9461973d2f825263",
    "dev": "4243d3160363b4e49912a1ff46ac9275f3429150",
    "test": "a2455504b352a71ea2ff81d0d1fc3d215794b002",
}
AUDIO_BLOB = "64d8073882422ced57610dda631b40c4391ccccc"
ENV_AUDIO = "DEQFUSION_CMBERT_AUDIO"
GENERATED_SEED = 0


class DataError(RuntimeError):
    """A CMU-MOSI file is missing or malformed; the message names the file and the fix."""


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read_tsv_lines(path: Path) -> List[bytes]:
    """The file's lines as bytes, line endings kept (a subset written from them is byte-faithful)."""
    return Path(path).read_bytes().splitlines(keepends=True)


def labels(path: Path) -> List[float]:
    """The label column of a split, as run_classifier's PgProcessor reads it (header skipped)."""
    import csv

    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quotechar=None))
    return [float(r[1]) for r in rows[1:]]


def word_counts(path: Path) -> List[int]:
    """Whitespace-separated words per row (header skipped): where a sentence's word-aligned audio is."""
    import csv

    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quotechar=None))
    return [len(r[0].split()) for r in rows[1:]]


def check_text(text_dir: Path, verify: bool = True) -> Path:
    """``text_dir`` holding CM-BERT's three tsv files with the pinned content (row counts always checked)."""
    text_dir = Path(text_dir)
    for split in SPLITS:
        path = text_dir / f"{split}.tsv"
        if not path.is_file():
            raise DataError(f"CMU-MOSI text {path} is missing: it is part of thuiar/Cross-Modal-BERT "
                            f"({TEXT_DIR}/{split}.tsv); run ./apply_patches.sh cmbert, or pass the clone with --upstream")
        data = path.read_bytes()
        if verify and git_blob_sha1(data) != TEXT_BLOBS[split]:
            raise DataError(f"{path} is not CM-BERT's {split}.tsv at the pin (git blob {git_blob_sha1(data)[:10]}, "
                            f"expected {TEXT_BLOBS[split][:10]}); restore it with git checkout, or pass --no-verify")
        n = len(data.splitlines()) - 1
        if verify and n != ROWS[split]:
            raise DataError(f"{path} has {n} rows, expected {ROWS[split]}")
    return text_dir


@dataclass(frozen=True)
class Audio:
    path: Path
    generated: bool  # True: written by generate_audio (not CMU's features)


def load_audio(path: Path) -> Tuple[Any, Any, Any]:
    """The pickle's (train, valid, test) arrays, structure checked (a tuple of three (N, 50, 5) float arrays)."""
    import numpy as np

    with open(path, "rb") as fh:
        obj = pickle.load(fh)
    if not isinstance(obj, (tuple, list)) or len(obj) != 3:
        raise DataError(f"{path}: expected a tuple (train, valid, test) of arrays, got {type(obj).__name__}")
    out = []
    for split, arr in zip(SPLITS, obj):
        arr = np.asarray(arr)
        if arr.ndim != 3 or arr.shape[1:] != (TIMESTEPS, AUDIO_DIM) or not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"{path}: the {split} array has shape {arr.shape} and dtype {arr.dtype}; "
                            f"CM-BERT reads (N, {TIMESTEPS}, {AUDIO_DIM}) floats")
        out.append(arr)
    return tuple(out)  # type: ignore[return-value]


def generate_audio(path: Path, text_dir: Path, seed: int = GENERATED_SEED) -> Path:
    """Write a stand-in for MOSI_cmu_audio_CLS.pickle: the real file's structure, a learnable signal.

    Per sentence with label y and w words, timesteps 0..min(w, 50)-1 hold
    ``[y/3, -y/3, 0, 0, 0] + N(0, 0.5^2)`` and the rest are zero (padding), float64, pickled as a
    tuple (train, valid, test) like the upstream's file.
    """
    import numpy as np

    rng = np.random.RandomState(seed)
    arrays = []
    for split in SPLITS:
        ys = labels(Path(text_dir) / f"{split}.tsv")
        ws = word_counts(Path(text_dir) / f"{split}.tsv")
        arr = np.zeros((len(ys), TIMESTEPS, AUDIO_DIM), dtype=np.float64)
        for i, (y, w) in enumerate(zip(ys, ws)):
            n = max(1, min(w, TIMESTEPS))
            arr[i, :n] = rng.normal(0.0, 0.5, size=(n, AUDIO_DIM))
            arr[i, :n, 0] += y / 3.0
            arr[i, :n, 1] -= y / 3.0
        arrays.append(arr)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(tuple(arrays), fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return path


def locate_audio(clone: Optional[Path] = None, explicit: Optional[Path] = None, *, verify: bool = True) -> Optional[Audio]:
    """The real audio pickle: ``explicit`` (--audio), else ``$DEQFUSION_CMBERT_AUDIO``, else the clone's
    ``data/audio/MOSI_cmu_audio_CLS.pickle``; None when there is none (the caller may generate one)."""
    named = explicit or os.environ.get(ENV_AUDIO)
    if named:
        path = Path(named)
        if not path.is_file():
            raise DataError(f"audio pickle {path} does not exist (given by {'--audio' if explicit else ENV_AUDIO})")
    elif clone is not None and (Path(clone) / AUDIO_FILE).is_file():
        path = Path(clone) / AUDIO_FILE
    else:
        return None
    if verify and git_blob_sha1(path.read_bytes()) != AUDIO_BLOB:
        raise DataError(f"{path} is not CM-BERT's MOSI_cmu_audio_CLS.pickle (its git blob differs from "
                        f"{AUDIO_BLOB[:10]}); pass the upstream's file, or --no-verify to use it anyway")
    load_audio(path)
    return Audio(path.resolve(), generated=False)


def write_subset(text_dir: Path, audio: Path, out_text: Path, out_audio: Path,
                 rows: Optional[Sequence[int]]) -> Dict[str, int]:
    """The first ``rows[k]`` rows of each split (all rows for None) as CM-BERT's files, the audio sliced to match.

    Returns the number of rows per split written.  With ``rows=None`` the files are linked, not copied.
    """
    import numpy as np

    out_text, out_audio = Path(out_text), Path(out_audio)
    out_text.mkdir(parents=True, exist_ok=True)
    out_audio.parent.mkdir(parents=True, exist_ok=True)
    arrays = load_audio(audio)
    counts: Dict[str, int] = {}
    for k, split in enumerate(SPLITS):
        lines = read_tsv_lines(Path(text_dir) / f"{split}.tsv")
        n_all = len(lines) - 1
        if arrays[k].shape[0] != n_all:
            raise DataError(f"{audio}: the {split} array has {arrays[k].shape[0]} rows but {split}.tsv has {n_all}")
        n = n_all if rows is None else int(rows[k])
        if not 1 <= n <= n_all:
            raise DataError(f"rows for {split} must be in 1..{n_all}, got {n}")
        counts[split] = n
        dst = out_text / f"{split}.tsv"
        if rows is None:
            _link(Path(text_dir) / f"{split}.tsv", dst)
        else:
            dst.write_bytes(b"".join(lines[: n + 1]))
    if rows is None:
        _link(Path(audio), out_audio)
    else:
        sliced = tuple(np.ascontiguousarray(a[:counts[s]]) for a, s in zip(arrays, SPLITS))
        with open(out_audio, "wb") as fh:
            pickle.dump(sliced, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return counts


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # no symlinks here: copy
        import shutil

        shutil.copyfile(src, dst)
