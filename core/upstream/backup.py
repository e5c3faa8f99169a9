"""Secure a clone's local edits before the tool changes its work tree, and put them back.

`git stash` is not enough: it fails in a clone whose source lacks some file contents (a snapshot
that left large files out), on a lock file, a full disk or a hook, and a caller that then runs a
forced checkout loses the edits.  Here the edits are written with plumbing that works in such a
clone (`git write-tree --missing-ok`) into commits shaped like a stash entry (worktree commit W with
parents HEAD and the index commit I), pointed at by a ref of our own
(`refs/deqfusion/backups/<n>`, which no gc and no reflog expiry removes) and also stored as
`stash@{0}` where git accepts it, so `git stash pop` works as users expect.  Before anything is
changed, the backup is *verified*: every edited file's bytes are hashed and compared with the blob
the backup holds, and the index tree is rebuilt and compared.  Only then may a caller reset the
tracked files; untracked files are never touched by this tool, so they need no backup.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .errors import UpstreamError

BACKUP_REFS = "refs/deqfusion/backups"
_EMPTY = object()


@dataclass
class EditBackup:
    """Where a clone's local edits are kept: `ref` -> `commit` (stash-shaped), `stash` if stored there too."""

    ref: str
    commit: str
    base: str                      # the HEAD the edits were made on
    index_tree: str
    paths: List[str] = field(default_factory=list)   # tracked paths that differed from HEAD
    stash: bool = False

    @property
    def number(self) -> int:
        return int(self.ref.rsplit("/", 1)[1])

    def where(self, dest: Path, name: str) -> str:
        """One sentence for messages: where the edits are and how to get them back."""
        n = len(self.paths)
        also = " (in a complete clone `git stash pop --index` does the same)" if self.stash else ""
        return (f"your local edits to {n} tracked file{'' if n == 1 else 's'} are saved in {self.ref} (commit "
                f"{self.commit[:12]}): `./apply_patches.sh restore {name} --dest {dest}` re-applies them{also}")


def changed_paths(clone) -> List[Tuple[str, str]]:
    """(status XY, path) of every tracked path whose index or worktree differs from HEAD."""
    out = clone.git("status", "--porcelain=v1", "-z", "--untracked-files=no", "--ignore-submodules=all",
                    "--no-renames")
    entries = []
    for item in out.split("\0"):
        if len(item) > 3:
            entries.append((item[:2], item[3:]))
    return entries


def _next_ref(clone) -> str:
    existing = clone.git("for-each-ref", "--format=%(refname)", BACKUP_REFS).split()
    numbers = [int(r.rsplit("/", 1)[1]) for r in existing if r.rsplit("/", 1)[1].isdigit()]
    return f"{BACKUP_REFS}/{max(numbers, default=0) + 1}"


def _blob_of_worktree_file(clone, path: str) -> object:
    """The blob id git would store for the work-tree file `path` (a symlink as its target), or _EMPTY."""
    full = Path(clone.path) / path
    if not os.path.lexists(full):
        return _EMPTY
    if os.path.islink(full):
        with tempfile.TemporaryFile() as fh:
            fh.write(os.fsencode(os.readlink(full)))
            fh.seek(0)
            return clone.git("hash-object", "--stdin", istream=fh)
    return clone.git("hash-object", "--", path)


def _blob_in(clone, commit: str, path: str) -> object:
    out = clone._query("rev-parse", "--verify", "-q", f"{commit}:{path}")
    return out if out else _EMPTY


def secure_edits(clone, reason: str) -> Optional[EditBackup]:
    """Back up the tracked edits of `clone` (None when there are none) and verify the backup.

    Raises UpstreamError, with nothing changed in the work tree, when the backup cannot be made or
    does not verify."""
    entries = changed_paths(clone)
    if not entries:
        return None
    base = clone.head_sha()
    if not base:
        raise UpstreamError(f"{clone.path} has no commit checked out: commit or move your files first")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    paths = sorted({p for _, p in entries})
    try:
        index_tree = clone.git("write-tree", "--missing-ok")
        index_commit = _commit_tree(clone, index_tree, [base], f"index on {base[:12]}: deqfusion {reason} ({stamp})")
        with tempfile.TemporaryDirectory(prefix="deqfusion-backup-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            clone.git("read-tree", index_tree, env=env)
            # the worktree state of every changed path, as `git stash` records it (deletions included)
            clone.git("add", "--all", "--force", "--", *[f":(literal){p}" for p in paths], env=env)
            work_tree = clone.git("write-tree", "--missing-ok", env=env)
        commit = _commit_tree(clone, work_tree, [base, index_commit],
                              f"On {clone.head_branch() or 'detached HEAD'}: deqfusion: local edits before {reason} ({stamp})")
    except UpstreamError as err:
        raise UpstreamError(f"could not back up the local edits in {clone.path} ({err}); nothing was changed") from None
    backup = EditBackup(_next_ref(clone), commit, base, index_tree, paths)
    problem = verify(clone, backup)
    if problem:
        raise UpstreamError(f"the backup of the local edits in {clone.path} does not match the files ({problem}); "
                            "nothing was changed")
    clone.git("update-ref", "-m", f"deqfusion backup before {reason}", backup.ref, commit, "", env=IDENTITY)
    backup.stash = clone._try("stash", "store", "-q", "-m", f"deqfusion: local edits before {reason} ({stamp})",
                              commit, env=IDENTITY) is not None
    return backup


# Backups must not depend on the user's git identity (a fresh container has none): their commits
# carry the tool's own name, as stash entries carry git's.
IDENTITY = {
    "GIT_AUTHOR_NAME": "deqfusion backup", "GIT_AUTHOR_EMAIL": "backup@deqfusion.invalid",
    "GIT_COMMITTER_NAME": "deqfusion backup", "GIT_COMMITTER_EMAIL": "backup@deqfusion.invalid",
}


def _commit_tree(clone, tree: str, parents: List[str], message: str) -> str:
    args = ["commit-tree", tree]
    for p in parents:
        args += ["-p", p]
    return clone.git(*args, "-m", message, env=IDENTITY)


def verify(clone, backup: EditBackup) -> Optional[str]:
    """None when the work tree's edited files and the index equal the backup; else what differs."""
    for path in backup.paths:
        if _blob_of_worktree_file(clone, path) != _blob_in(clone, backup.commit, path):
            return f"{path} differs"
    if clone.git("write-tree", "--missing-ok") != backup.index_tree:
        return "the index differs"
    return None


def restore_edits(clone, backup: EditBackup) -> Optional[str]:
    """Put the backed-up edits back on a work tree whose HEAD is `backup.base` again and whose
    tracked files are clean. Only the edited paths are written (file by file, then their index
    entries), so a sparse clone's left-out files stay as they are. Returns None when the files
    verify against the backup, else what differs."""
    root = Path(clone.path)
    for path in backup.paths:
        work = _tree_entry(clone, backup.commit, path)
        full = root / path
        if os.path.lexists(full) and (work is None or os.path.islink(full)):
            full.unlink()
        if work is not None:
            mode, sha = work
            full.parent.mkdir(parents=True, exist_ok=True)
            data = clone.git("cat-file", "blob", sha, stdout_as_string=False, strip_newline_in_stdout=False)
            if mode == "120000":
                os.symlink(os.fsdecode(data), full)
            else:
                full.write_bytes(data)
                os.chmod(full, 0o755 if mode == "100755" else 0o644)
    set_index_entries(clone, backup.index_tree, backup.paths)
    return verify(clone, backup)


def set_index_entries(clone, tree: str, paths: Sequence[str]) -> None:
    """Make the index entries of `paths` those of `tree` (absent there: removed), leaving every other
    entry (and a sparse clone's skip-worktree bits) as it is."""
    lines = []
    for path in paths:
        staged = _tree_entry(clone, tree, path)
        lines.append(f"{staged[0]} {staged[1]}\t{path}" if staged else f"0 {'0' * 40}\t{path}")
    with tempfile.TemporaryFile() as info:
        info.write(("\n".join(lines) + "\n").encode())
        info.seek(0)
        clone.git("update-index", "--index-info", istream=info)
    clone._try("update-index", "-q", "--refresh")


def _tree_entry(clone, tree: str, path: str) -> Optional[Tuple[str, str]]:
    """(mode, blob sha) of `path` in `tree`, None where the tree has no such file."""
    out = clone.git("ls-tree", "-z", "--full-tree", tree, "--", path)
    for item in out.split("\0"):
        meta, _, name = item.partition("\t")
        if name == path and meta:
            mode, _kind, sha = meta.split()
            return mode, sha
    return None


def drop(clone, backup: EditBackup) -> None:
    """Forget a backup whose edits are verified back in place (the clone is then exactly as before)."""
    if backup.stash:
        top = clone._try("rev-parse", "-q", "--verify", "refs/stash")
        if top == backup.commit:
            clone._try("stash", "drop", "-q")
    clone._try("update-ref", "-d", backup.ref, backup.commit)


def load(clone, number: Optional[int] = None) -> EditBackup:
    """Backup `number` of a clone (default: the newest)."""
    refs = clone.git("for-each-ref", "--format=%(refname) %(objectname)", BACKUP_REFS).splitlines()
    found = {int(r.split()[0].rsplit("/", 1)[1]): r.split() for r in refs if r.split()[0].rsplit("/", 1)[1].isdigit()}
    if not found:
        raise UpstreamError(f"{clone.path} has no saved local edits ({BACKUP_REFS}/* is empty)")
    n = max(found) if number is None else number
    if n not in found:
        raise UpstreamError(f"{clone.path} has no backup {n}; it has {', '.join(map(str, sorted(found)))}")
    ref, commit = found[n]
    base = clone.git("rev-parse", f"{commit}^1")
    index_tree = clone.git("rev-parse", f"{commit}^2^{{tree}}")
    names = set(clone.git("diff-tree", "-r", "--no-renames", "--name-only", "-z", base, commit).split("\0"))
    names |= set(clone.git("diff-tree", "-r", "--no-renames", "--name-only", "-z", base, f"{commit}^2").split("\0"))
    stash = clone._query("rev-parse", "-q", "--verify", "refs/stash") == commit
    return EditBackup(ref, commit, base, index_tree, sorted(n for n in names if n), stash)


def reapply(clone, backup: EditBackup) -> str:
    """Put a backup's edits onto the current work tree (whose tracked files must be clean): exactly,
    when HEAD is still the commit they were made on, else as a 3-way patch. Returns how."""
    if clone.head_sha() == backup.base:
        problem = restore_edits(clone, backup)
        if problem:
            raise UpstreamError(f"restored the edits of {backup.ref} but {problem}; the backup is kept")
        return "exactly (HEAD is the commit they were made on)"
    with tempfile.TemporaryDirectory(prefix="deqfusion-restore-") as tmp:
        patch = Path(tmp) / "edits.patch"
        patch.write_bytes(clone.git("diff", "--binary", "--no-renames", backup.base, backup.commit,
                                    stdout_as_string=False) + b"\n")
        try:
            clone.git("apply", "--3way", "--index", "--whitespace=nowarn", str(patch))
        except UpstreamError as err:
            conflicts = clone.git("diff", "--name-only", "--diff-filter=U").split()
            if not conflicts:
                raise
            raise UpstreamError(f"the edits of {backup.ref} conflict with HEAD {clone.head_sha()[:12]} in "
                                f"{', '.join(conflicts)}: resolve the conflict markers there as after a merge "
                                f"(`git -C {clone.path} status`); the backup stays in {backup.ref}") from err
    return f"as a 3-way patch onto HEAD {clone.head_sha()[:12]} (they were made on {backup.base[:12]})"


def discard_tracked_edits(clone) -> None:
    """Reset the tracked files to HEAD (only ever after `secure_edits` verified a backup)."""
    clone.git("reset", "-q", "--hard")
