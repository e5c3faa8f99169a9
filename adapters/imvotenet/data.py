"""SUN RGB-D in the layout ImVoteNet's dataset reads: where it is, the check that names what is
missing, and a generator of small scenes in exactly that layout (for CPU tests and ``--generated``).

ImVoteNet's ``SunrgbdDetectionVotesDataset`` (``sunrgbd/sunrgbd_detection_dataset.py`` at the pin)
reads, below the clone's ``sunrgbd/`` folder (the *data root* here)::

    sunrgbd_pc_bbox_votes_50k_v1_{train,val}/<id>_pc.npz      'pc': (N, 6) float64, upright-depth XYZ + RGB in 0..1
                                              <id>_bbox.npy     (K, 8) float64: centre, half sizes l/w/h, heading, class
                                              <id>_votes.npz    'point_votes': (N, 10) float64: in-box mask, 3 votes
    sunrgbd_2d_bbox_50k_v1_{train,val}/<id>.txt               one 2D detection a line: class name first, xmin ymin
                                                              xmax ymax in fields 4-7, score last
    sunrgbd_trainval/calib/<id>.txt                           line 1: Rtilt (9 numbers, column-major), line 2: K
    sunrgbd_trainval/image/<id>.jpg                           the RGB image (read with cv2.imread)
    sunrgbd_trainval/{train,val}_data_idx.txt                 the split (read by the preparation scripts)

``<id>`` is six digits (val 000001-005050, train 005051-010335 in SUN RGB-D v1). The generator
renders each scene from a camera: every pixel's ray hits the floor, a back wall or one of a few
oriented boxes of the ten SUN RGB-D classes (per-class sizes and colours), so the point cloud is the
back-projection of the image through the calibration (as SUN RGB-D's is), every seed projects
into the image, the votes point from in-box points to their box centres, and the 2D detections
are the boxes' projections with a little class noise and a low-score false positive. It is
learnable: class follows from size, shape and colour.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "CLASSES", "SPLITS", "ENV_DATA", "DataError", "pc_dir", "box2d_dir", "raw_dir", "check_data",
    "resolve_data_root", "generate", "GenSpec", "PREPARE_HELP",
]

# sunrgbd_utils.type2class at the pin: the ten classes, in their index order.
CLASSES = ("bed", "table", "sofa", "chair", "toilet", "desk", "dresser", "night_stand", "bookshelf", "bathtub")
SPLITS = ("train", "val")
ENV_DATA = "DEQFUSION_SUNRGBD"
MAX_NUM_PIXEL = 530 * 730  # the dataset's flat image buffers hold at most this many pixels

PREPARE_HELP = (
    "prepare SUN RGB-D as ImVoteNet's README says: votenet's sunrgbd/README.md (the MATLAB scripts "
    "extract_split.m, extract_rgbd_data_v2.m, extract_rgbd_data_v1.m on the official SUNRGBD.zip + toolbox, then "
    "`python sunrgbd_data.py --gen_v1_data`), plus the Faster R-CNN 2D boxes sunrgbd_2d_bbox_50k_v1.tgz unpacked "
    "next to them; pass that folder (the one holding sunrgbd_pc_bbox_votes_50k_v1_train/) with --data-dir or "
    f"${ENV_DATA} -- or run with --generated for generated scenes in the same layout"
)

# Half sizes (l, w, h) in metres and colours (RGB 0..255) per class: this project's round numbers.
_HALF_SIZE = {
    "bed": (1.0, 0.8, 0.45), "table": (0.6, 0.4, 0.38), "sofa": (0.9, 0.45, 0.42), "chair": (0.3, 0.3, 0.45),
    "toilet": (0.35, 0.25, 0.38), "desk": (0.6, 0.35, 0.38), "dresser": (0.45, 0.25, 0.45),
    "night_stand": (0.25, 0.22, 0.28), "bookshelf": (0.45, 0.18, 0.85), "bathtub": (0.8, 0.4, 0.3),
}
_COLOUR = {
    "bed": (200, 40, 40), "table": (40, 160, 40), "sofa": (40, 60, 200), "chair": (220, 200, 30),
    "toilet": (230, 230, 230), "desk": (150, 90, 30), "dresser": (160, 40, 160), "night_stand": (30, 180, 180),
    "bookshelf": (90, 50, 20), "bathtub": (120, 120, 250),
}
_FLOOR, _WALL = (110, 100, 90), (190, 180, 160)


class DataError(FileNotFoundError):
    """SUN RGB-D is missing or incomplete; the message names the file and how to prepare it."""


def pc_dir(root: Path, split: str) -> Path:
    return Path(root) / f"sunrgbd_pc_bbox_votes_50k_v1_{split}"


def box2d_dir(root: Path, split: str) -> Path:
    return Path(root) / f"sunrgbd_2d_bbox_50k_v1_{split}"


def raw_dir(root: Path) -> Path:
    return Path(root) / "sunrgbd_trainval"


def scan_names(root: Path, split: str) -> List[str]:
    """The dataset's own rule: the first six characters of every file name in the point folder."""
    return sorted({name[:6] for name in os.listdir(pc_dir(root, split))})


def check_data(root: Path, splits: Sequence[str] = SPLITS) -> Dict[str, int]:
    """Scenes per split; a missing folder or file is a DataError naming it and how to prepare it."""
    root = Path(root)
    counts: Dict[str, int] = {}
    for split in splits:
        folder = pc_dir(root, split)
        if not folder.is_dir():
            raise DataError(f"missing {folder}/ (SUN RGB-D {split} point clouds); {PREPARE_HELP}")
        names = scan_names(root, split)
        if not names:
            raise DataError(f"{folder}/ holds no scene; {PREPARE_HELP}")
        for name in names:
            for path in (folder / f"{name}_pc.npz", folder / f"{name}_bbox.npy", folder / f"{name}_votes.npz",
                         box2d_dir(root, split) / f"{name}.txt", raw_dir(root) / "calib" / f"{name}.txt",
                         raw_dir(root) / "image" / f"{name}.jpg"):
                if not path.is_file():
                    raise DataError(f"missing {path} (scene {name}, {split}); {PREPARE_HELP}")
        counts[split] = len(names)
    return counts


def resolve_data_root(explicit: Optional[Path] = None, clone: Optional[Path] = None) -> Path:
    """--data-dir, else $DEQFUSION_SUNRGBD, else $DEQFUSION_DATA/sunrgbd, else the clone's sunrgbd/ (where
    ImVoteNet's README puts it); the first that exists is checked with :func:`check_data`."""
    candidates: List[Tuple[str, Path]] = []
    if explicit is not None:
        candidates.append(("--data-dir", Path(explicit)))
    elif os.environ.get(ENV_DATA):
        candidates.append((f"${ENV_DATA}", Path(os.environ[ENV_DATA])))
    else:
        if os.environ.get("DEQFUSION_DATA"):
            candidates.append(("$DEQFUSION_DATA/sunrgbd", Path(os.environ["DEQFUSION_DATA"]) / "sunrgbd"))
        if clone is not None:
            candidates.append(("the clone's sunrgbd/", Path(clone) / "sunrgbd"))
    for _what, path in candidates:
        if explicit is not None or os.environ.get(ENV_DATA) or pc_dir(path, "train").is_dir():
            path = path.expanduser()
            check_data(path)
            return path
    tried = ", ".join(f"{w} ({p})" for w, p in candidates) or "nothing"
    raise DataError(f"no SUN RGB-D found (looked at {tried}); {PREPARE_HELP}")


# ----------------------------------------------------------------------------------------------
# generator


@dataclass(frozen=True)
class GenSpec:
    """How many scenes and how big. Images must stay within the dataset's 530x730 pixel buffers."""

    train: int = 4
    val: int = 2
    width: int = 96
    height: int = 72
    max_objects: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width * self.height > MAX_NUM_PIXEL:
            raise ValueError(f"{self.width}x{self.height} images exceed the dataset's {MAX_NUM_PIXEL}-pixel buffers")
        if min(self.train, self.val) < 1 or self.max_objects < 1:
            raise ValueError("need at least one train scene, one val scene and one object per scene")


def _rotz(t: float) -> np.ndarray:
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rotx(t: float) -> np.ndarray:
    c, s = np.cos(t), np.sin(t)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _place_objects(rng: np.random.RandomState, classes: Sequence[int], floor_z: float) -> np.ndarray:
    """(K, 8) boxes of ``classes`` standing on the floor in front of the camera, not overlapping in
    plan view (a class that finds no free spot in 50 tries is left out)."""
    boxes: List[np.ndarray] = []
    pending = list(classes)
    for _ in range(50 * len(classes)):
        if not pending:
            break
        cls = pending[0]
        half = np.array(_HALF_SIZE[CLASSES[cls]]) * rng.uniform(0.85, 1.15, 3)
        centre_y = rng.uniform(2.0, 3.8)
        centre = np.array([rng.uniform(-0.45, 0.45) * centre_y, centre_y, floor_z + half[2]])
        radius = float(np.hypot(half[0], half[1]))
        if any(np.hypot(*(centre[:2] - b[:2])) < radius + np.hypot(b[3], b[4]) for b in boxes):
            continue
        pending.pop(0)
        boxes.append(np.concatenate([centre, half, [rng.uniform(-np.pi, np.pi), cls]]))
    return np.stack(boxes) if boxes else np.zeros((0, 8))


def _box_frame(box: np.ndarray) -> np.ndarray:
    """Rotation whose columns are the box axes in upright depth coords (sunrgbd_utils.my_compute_box_3d)."""
    return _rotz(-box[6])


def _hit_box(dirs: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Ray parameter of the first hit of rays from the origin with an oriented box (inf: no hit)."""
    rot = _box_frame(box)
    origin = rot.T @ (-box[:3])
    d = dirs @ rot  # rows: rot^T d
    half = box[3:6]
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - origin) / d
        t2 = (half - origin) / d
    tmin = np.nanmax(np.minimum(t1, t2), axis=1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=1)
    return np.where((tmax >= tmin) & (tmin > 0), tmin, np.inf)


def _in_box(points: np.ndarray, box: np.ndarray, margin: float = 0.01) -> np.ndarray:
    local = (points - box[:3]) @ _box_frame(box)
    return np.all(np.abs(local) <= box[3:6] * 1.01 + margin, axis=1)


def _project(points: np.ndarray, rtilt: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Upright depth -> 0-based pixel (u, v), the model's projection (image_feature_module.py)."""
    depth = points @ rtilt  # rows: Rtilt^T p
    cam = np.stack([depth[:, 0], -depth[:, 2], depth[:, 1]], axis=1)
    uv = cam @ k.T
    return uv[:, :2] / uv[:, 2:3] - 1.0


def render_scene(rng: np.random.RandomState, spec: GenSpec, classes: Sequence[int]) -> Dict[str, object]:
    """One scene with objects of ``classes``: point cloud, boxes, votes, calibration, image, 2D detections."""
    w, h = spec.width, spec.height
    f = 0.725 * w  # SUN RGB-D's kv1 focal length over width (529.5 / 730)
    k = np.array([[f, 0.0, w / 2.0], [0.0, f, h / 2.0], [0.0, 0.0, 1.0]])
    rtilt = _rotx(rng.uniform(-0.12, 0.04))
    floor_z = -rng.uniform(1.0, 1.4)
    wall_y = rng.uniform(4.5, 5.5)
    boxes = _place_objects(rng, classes, floor_z)

    # one ray per pixel (0-based u, v; SUN RGB-D's calibration is 1-based), camera -> depth -> upright
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    cam = np.stack([(u.ravel() + 1 - k[0, 2]) / f, (v.ravel() + 1 - k[1, 2]) / f, np.ones(u.size)], axis=1)
    dirs = np.stack([cam[:, 0], cam[:, 2], -cam[:, 1]], axis=1) @ rtilt.T
    with np.errstate(divide="ignore"):
        t_floor = np.where(dirs[:, 2] < 0, floor_z / dirs[:, 2], np.inf)
    hits = [wall_y / dirs[:, 1], t_floor] + [_hit_box(dirs, b) for b in boxes]
    t_all = np.stack(hits, axis=1)
    surface = t_all.argmin(axis=1)  # 0 wall, 1 floor, 2+i box i
    t = t_all[np.arange(len(dirs)), surface]
    t = t * (1.0 + rng.normal(0.0, 0.003, t.shape))  # depth noise along the ray: the pixel stays the same
    points = dirs * t[:, None]

    colours = np.empty((len(dirs), 3))
    colours[surface == 0] = _WALL
    colours[surface == 1] = _FLOOR
    for i, b in enumerate(boxes):
        colours[surface == 2 + i] = _COLOUR[CLASSES[int(b[7])]]
    colours = np.clip(colours * rng.uniform(0.85, 1.15, (len(dirs), 1)) + rng.normal(0, 6, colours.shape), 0, 255)
    image = colours.reshape(h, w, 3).astype(np.uint8)

    votes = np.zeros((len(points), 10))
    count = np.zeros(len(points), dtype=int)
    for b in boxes:
        inside = _in_box(points, b)
        offset = b[:3] - points[inside]
        idx = np.flatnonzero(inside)
        first = count[idx] == 0
        for j, (i, vote) in enumerate(zip(idx, offset)):
            slot = count[i]
            votes[i, 1 + 3 * slot:4 + 3 * slot] = vote
            if first[j]:
                votes[i, 4:7] = vote
                votes[i, 7:10] = vote
        votes[idx, 0] = 1
        count[idx] = np.minimum(2, count[idx] + 1)

    detections: List[str] = []
    for b in boxes:
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * b[3:6]
        uv = _project(corners @ _box_frame(b).T + b[:3], rtilt, k)
        x0, y0 = np.clip(uv.min(0) + rng.uniform(-2, 2, 2), 0, [w - 1, h - 1])
        x1, y1 = np.clip(uv.max(0) + rng.uniform(-2, 2, 2), 0, [w - 1, h - 1])
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        cls = int(b[7]) if rng.uniform() > 0.1 else rng.randint(len(CLASSES))
        detections.append(_det_line(CLASSES[cls], (x0, y0, x1, y1), rng.uniform(0.5, 0.99)))
    if rng.uniform() < 0.5:  # a low-confidence false positive (the loader drops scores < 0.1)
        x0, y0 = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
        box = (x0, y0, min(w - 1, x0 + rng.uniform(4, w * 0.3)), min(h - 1, y0 + rng.uniform(4, h * 0.3)))
        detections.append(_det_line(CLASSES[rng.randint(len(CLASSES))], box, rng.uniform(0.05, 0.3)))

    order = rng.permutation(len(points))  # SUN RGB-D's files are random subsamples: no pixel order
    pc = np.concatenate([points, colours / 255.0], axis=1)[order]
    return {"pc": pc, "bbox": boxes, "votes": votes[order], "rtilt": rtilt, "k": k, "image": image,
            "detections": detections}


def _det_line(name: str, box: Tuple[float, float, float, float], score: float) -> str:
    """KITTI's detection-result layout (class, truncation, occlusion, alpha, box, 3D fields, score)."""
    x0, y0, x1, y1 = box
    return f"{name} 0 0 -10 {x0:.2f} {y0:.2f} {x1:.2f} {y1:.2f} -1 -1 -1 -1000 -1000 -1000 -10 {score:.4f}"


def _calib_text(rtilt: np.ndarray, k: np.ndarray) -> str:
    row = lambda m: " ".join(f"{x:.6f}" for x in m.flatten(order="F"))  # noqa: E731
    return f"{row(rtilt)}\n{row(k)}\n"


def scene_ids(spec: GenSpec) -> Dict[str, List[int]]:
    """SUN RGB-D v1's numbering: val from 1, train from 5051."""
    return {"val": list(range(1, spec.val + 1)), "train": list(range(5051, 5051 + spec.train))}


def generate(root: Path, spec: GenSpec = GenSpec()) -> Path:
    """Write ``spec.train`` + ``spec.val`` scenes below ``root`` in ImVoteNet's layout; returns ``root``."""
    from PIL import Image

    root = Path(root)
    raw = raw_dir(root)
    (raw / "calib").mkdir(parents=True, exist_ok=True)
    (raw / "image").mkdir(parents=True, exist_ok=True)
    ids = scene_ids(spec)
    for split in SPLITS:
        pc_dir(root, split).mkdir(parents=True, exist_ok=True)
        box2d_dir(root, split).mkdir(parents=True, exist_ok=True)
        (raw / f"{split}_data_idx.txt").write_text("".join(f"{i}\n" for i in ids[split]))
        # classes cycle through a shuffled list, so a split with >= 10 objects has every class
        # (ImVoteNet's mAP is the mean over all ten; a class without ground truth makes it NaN)
        cycle = np.random.RandomState([spec.seed, 0 if split == "train" else 1]).permutation(len(CLASSES))
        pos = 0
        for i in ids[split]:
            name = f"{i:06d}"
            rng = np.random.RandomState([spec.seed, i])
            count = rng.randint(max(1, spec.max_objects - 1), spec.max_objects + 1)
            classes = [int(cycle[(pos + j) % len(CLASSES)]) for j in range(count)]
            pos += count
            scene = render_scene(rng, spec, classes)
            np.savez_compressed(pc_dir(root, split) / f"{name}_pc.npz", pc=scene["pc"])
            np.save(pc_dir(root, split) / f"{name}_bbox.npy", scene["bbox"])
            np.savez_compressed(pc_dir(root, split) / f"{name}_votes.npz", point_votes=scene["votes"])
            (box2d_dir(root, split) / f"{name}.txt").write_text("".join(d + "\n" for d in scene["detections"]))
            (raw / "calib" / f"{name}.txt").write_text(_calib_text(scene["rtilt"], scene["k"]))
            Image.fromarray(scene["image"]).save(raw / "image" / f"{name}.jpg", quality=95)
    return root
