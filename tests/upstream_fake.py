"""A small fake upstream for the tests of deqfusion.upstream: real git repositories in a temp folder.

Layout made by `make_fake(tmp)`:
    up/             the "upstream": c1 initial, c2 tune (the pinned commit), c3 later (HEAD of main)
    mirror/fake     a clone of up, as DEQFUSION_MIRROR=mirror would find it
    old/            a mirror that stops at c1: it lacks the pinned commit
    patches/good/   two patches (`git format-patch -U1`) against the pinned commit
    patches/bad/    the two good ones plus a third that conflicts with the pinned commit
    patches/three/  one patch made on c3 with -U2: plain `git am` fails, `git am --3way` succeeds
    manifest.toml   one git entry `fake` (url unreachable), one pip entry `piponly`
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

IDENTITY = {
    "GIT_AUTHOR_NAME": "Fake Author",
    "GIT_AUTHOR_EMAIL": "author@example.invalid",
    "GIT_COMMITTER_NAME": "Fake Author",
    "GIT_COMMITTER_EMAIL": "author@example.invalid",
    "GIT_AUTHOR_DATE": "2021-01-01T00:00:00+00:00",
    "GIT_COMMITTER_DATE": "2021-01-01T00:00:00+00:00",
}
UNREACHABLE_URL = "http://127.0.0.1:9/fake.git"  # port 9 (discard): refused at once, no network needed

MODEL = """\
import math


def fuse(a, b):
    # the fusion call site
    return a + b


def head(x):
    return math.tanh(x)
"""
TRAIN = """\
# training script
epochs = 10
batch = 4
lr = 0.1
seed = 0
print("train", epochs, batch, lr, seed)
"""


def isolated_env(home: Path) -> Dict[str, str]:
    """Environment for git in tests: no user/system config, a fixed identity."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "gitconfig"
    cfg.write_text("[init]\n\tdefaultBranch = main\n[advice]\n\tdetachedHead = false\n")
    env = dict(IDENTITY, GIT_CONFIG_GLOBAL=str(cfg), GIT_CONFIG_NOSYSTEM="1", HOME=str(home))
    return env


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=str(cwd), check=True, capture_output=True, text=True)
    return out.stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@dataclass
class Fake:
    root: Path
    up: Path
    mirror: Path
    old: Path
    pinned: str
    c1: str
    c3: str
    good: Path
    bad: Path
    three: Path
    manifest: Path

    def dest(self, name: str = "clone") -> Path:
        return self.root / name


def _series(repo: Path, base: str, out: Path, context: int = 1) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    git(repo, "format-patch", "-q", f"-U{context}", "--no-numbered", "--zero-commit", "--no-signature", "-o", str(out),
        f"{base}..HEAD")
    return sorted(out.glob("*.patch"))


def make_fake(tmp: Path) -> Fake:
    """Build the fake upstream (the caller has put isolated_env() into os.environ)."""
    up = tmp / "up"
    up.mkdir(parents=True)
    git(up, "init", "-q")
    (up / "model.py").write_text(MODEL)
    (up / "train.py").write_text(TRAIN)
    (up / "README.md").write_text("fake upstream\n")
    (up / "data").mkdir()
    (up / "data" / "big.bin").write_bytes(bytes(range(256)) * 64)
    c1 = commit_all(up, "initial")
    (up / "train.py").write_text(TRAIN.replace("lr = 0.1", "lr = 0.05"))
    pinned = commit_all(up, "tune lr")
    (up / "train.py").write_text(TRAIN.replace("lr = 0.1", "lr = 0.05").replace("epochs = 10", "epochs = 20"))
    c3 = commit_all(up, "later: more epochs")
    git(up, "branch", "old", c1)

    # the good series: two commits on the pinned commit
    work = tmp / "work"
    git(tmp, "clone", "-q", str(up), str(work))
    git(work, "checkout", "-q", "-b", "series", pinned)
    (work / "model.py").write_text(MODEL.replace("import math\n", "import math\n\nfrom deq_hook import deq_fuse\n")
                                   .replace("return a + b", "return deq_fuse(a, b)"))
    commit_all(work, "Fuse with DEQ")
    (work / "deq_hook.py").write_text("def deq_fuse(a, b):\n    return a + b\n")
    commit_all(work, "Add the DEQ hook")
    good = tmp / "patches" / "good"
    _series(work, pinned, good)

    # a patch that conflicts with the pinned commit (made on c3: epochs 20 -> 30; pinned has 10)
    git(work, "checkout", "-q", "-b", "conflict", c3)
    (work / "train.py").write_text((work / "train.py").read_text().replace("epochs = 20", "epochs = 30"))
    commit_all(work, "More epochs still")
    conflict = _series(work, c3, tmp / "patches" / "conflict-only")
    bad = tmp / "patches" / "bad"
    bad.mkdir()
    for p in sorted(good.glob("*.patch")):
        shutil.copy(p, bad / p.name)
    shutil.copy(conflict[0], bad / ("0003-" + conflict[0].name[5:]))

    # a patch whose -U2 context holds c3's epochs line: plain am fails, --3way merges it cleanly
    git(work, "checkout", "-q", "-b", "threeway", c3)
    (work / "train.py").write_text((work / "train.py").read_text().replace("lr = 0.05", "lr = 0.01"))
    commit_all(work, "Lower lr")
    three = tmp / "patches" / "three"
    _series(work, c3, three, context=2)

    mirror = tmp / "mirror"
    mirror.mkdir()
    git(tmp, "clone", "-q", "--no-checkout", str(up), str(mirror / "fake"))
    old = tmp / "old"
    git(tmp, "clone", "-q", "--no-local", "--single-branch", "--branch", "old", "--no-checkout", str(up), str(old))

    manifest = tmp / "manifest.toml"
    manifest.write_text(f"""\
schema = 1
branch = "deqfusion"

[upstreams.fake]
status = "ready"
title = "a fake upstream"
source = "git"
integration = "patch"
repo = "example/fake-upstream"
url = "{UNREACHABLE_URL}"
commit = "{pinned}"
license = "none"
patches = "{good.as_posix()}"
adapter = "deqfusion.adapters"
train = "python train.py"

[upstreams.piponly]
status = "planned"
source = "pip"
integration = "plugin"
package = "example==1.0"
license = "MIT"
train = "example-train"
""")
    return Fake(tmp, up, mirror, old, pinned, c1, c3, good, bad, three, manifest)


def tree_state(path: Path) -> Tuple[str, str, str, str]:
    """What "exactly as before" means: a hash of every file outside .git (path, mode, bytes),
    HEAD (branch or detached sha), all refs, and the stash list."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for name in sorted(filenames):
            f = Path(dirpath) / name
            h.update(str(f.relative_to(path)).encode() + b"\0")
            h.update(oct(f.stat().st_mode).encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
    try:
        head = git(path, "symbolic-ref", "-q", "HEAD")
    except subprocess.CalledProcessError:
        head = "detached"
    head += " " + git(path, "rev-parse", "HEAD")
    refs = git(path, "for-each-ref", "--format=%(refname) %(objectname)")
    stash = git(path, "stash", "list", "--format=%H %s")
    return h.hexdigest(), head, refs, stash


def mtimes(path: Path) -> Dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_mtime_ns
            for f in path.rglob("*") if f.is_file() and ".git" not in f.relative_to(path).parts}
