"""The operations behind `./apply_patches.sh`: list, status, apply, check, revert, refresh.

Each returns an exit code (0) or raises `UpstreamError` with a one-line message that names the fix.
Messages for the user go through `say` (print by default).

Guarantees:
- A clone with local edits to tracked files is never overwritten: apply/revert refuse, and with
  --force stash the edits (`git stash list` keeps them). Untracked files are never touched.
- Commits on the project branch that are not in the series are never dropped: apply refuses, and
  with --force keeps the old tip as a backup branch.
- A series that does not apply leaves an existing clone exactly as it was: same HEAD, same branch
  tips, same files (a stash made for --force is popped back).
- Applying twice changes nothing and says so.
"""
from __future__ import annotations

import contextlib
import importlib.util
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from . import backup as backups
from .backup import EditBackup, discard_tracked_edits, drop, restore_edits, secure_edits
from .errors import EXIT_ENVIRONMENT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, UpstreamError
from .gitrepo import Clone, PatchFailed, git_executable, remove_tree
from .manifest import Manifest, Upstream
from .paths import default_dest, find_repo_root, series_dir
from .record import Record, read_record, write_record
from .series import Patch, fingerprint, read_series, replace_series
from .sources import Source, resolve_source

Say = Callable[[str], None]


@dataclass
class Target:
    """One upstream with its paths resolved."""

    entry: Upstream
    branch: str
    dest: Path
    patches_dir: Optional[Path]
    series: List[Patch]

    @property
    def name(self) -> str:
        return self.entry.name


def resolve(manifest: Manifest, name: str, dest: Optional[str] = None, patches: Optional[str] = None) -> Target:
    entry = manifest.get(name)
    root = find_repo_root()
    target_dest = Path(dest).expanduser().resolve() if dest else default_dest(entry, root).resolve()
    pdir = series_dir(entry, root, patches)
    if patches and not pdir.is_dir():
        raise UpstreamError(f"--patches {patches} is not a folder: give the folder holding {name}'s *.patch files",
                            code=EXIT_USAGE)
    series = read_series(pdir)
    if entry.status == "ready" and entry.integration == "patch" and not series:
        where = str(pdir) if pdir is not None else entry.patches
        raise UpstreamError(f"{name} is marked ready but {where} holds no *.patch files: run from the deqfusion "
                            "checkout or pass --patches DIR", code=EXIT_USAGE)
    return Target(entry, manifest.branch, target_dest, pdir, series)


def _require_clonable(entry: Upstream) -> None:
    if not entry.clonable:
        raise UpstreamError(f"{entry.name} is the pip package {entry.package}, not a clone: "
                            f"install it with pip install '.[{entry.name}]' (nothing to patch)", code=EXIT_USAGE)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('ch') else 's'}"


def _local_edits(t: Target, files: Sequence[str]) -> UpstreamError:
    shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    return UpstreamError(
        f"{t.dest} has local edits to {_plural(len(files), 'tracked file')} ({shown}): commit them on branch "
        f"{t.branch} and run `./apply_patches.sh refresh {t.name}`, or rerun with --force to stash them "
        f"(kept in `git -C {t.dest} stash list`)"
    )


def _missing_pinned(t: Target, source: Source, head: Optional[str]) -> UpstreamError:
    e = t.entry
    if source.is_local:
        return UpstreamError(
            f"{source.describe()} does not have {t.name}'s pinned commit {e.commit} (its HEAD is "
            f"{(head or 'unknown')[:10]}): update it (git -C {source.location} fetch {e.url}) or use a clone that has it"
        )
    return UpstreamError(f"{e.url} has no commit {e.commit}: the manifest's pin for {t.name} is wrong, "
                         "or the upstream rewrote its history")


def _warn_excluded(t: Target, paths: Sequence[str], say: Say) -> None:
    if paths:
        shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        say(f"warning: the source lacks the content of {_plural(len(paths), 'file')} of {t.name} at "
            f"{t.entry.short} ({shown}); they are left out of the checkout (use a complete clone for real runs)")


def _prepare_checkout(t: Target, clone: Clone) -> List[str]:
    """Exclude from the checkout whatever the source has no content for; returns those paths."""
    missing = clone.missing_blobs(t.entry.commit)
    if missing:
        clone.exclude_from_checkout(missing)
    return missing


def _next_steps(t: Target, say: Say) -> None:
    e = t.entry
    say(f"next: cd {t.dest} && {e.train}")
    if e.runner:
        say(f"  or the project's runner: {e.runner}")
    if e.adapter:
        try:
            found = importlib.util.find_spec(e.adapter) is not None
        except (ImportError, ValueError):
            found = False
        say(f"  adapter {e.adapter}: " + ("importable" if found else "not written yet"))
    if e.notes:
        say(f"  notes: {e.notes}")
    if e.status != "ready":
        say(f"  ({t.name} is planned: its patch series or adapter are not complete yet)")


# -- list / status ---------------------------------------------------------------------------------

def list_upstreams(manifest: Manifest, say: Say = print) -> int:
    root = find_repo_root()
    rows = [("name", "status", "route", "license", "pinned", "patches")]
    for e in manifest:
        pdir = series_dir(e, root)
        n = len(read_series(pdir))
        pinned = f"{e.repo}@{e.short}" if e.source == "git" else e.package
        patches = str(n) if n else ("none (plugin)" if e.integration == "plugin" else "none yet")
        rows.append((e.name, e.status, f"{e.source}+{e.integration}", e.license, pinned, patches))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        say("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    say(f"manifest: {manifest.path}")
    return 0


def describe_clone(t: Target) -> str:
    e = t.entry
    if not e.clonable:
        return f"pip package {e.package}: nothing to clone"
    if not t.dest.exists():
        return f"not cloned ({t.dest})"
    try:
        clone = Clone.open(t.dest)
    except UpstreamError as err:
        return str(err)
    what = clone.in_progress()
    if what:
        return f"{what} is in progress in {t.dest}"
    pinned, branch = e.commit, t.branch
    head, head_branch, tip = clone.head_sha(), clone.head_branch(), clone.branch_sha(branch)
    rec = read_record(clone.git_dir)
    own = rec is not None and tip is not None and rec.head == tip
    n = len(t.series)
    if head_branch == branch and own and rec.matches(pinned, fingerprint(t.series)):
        state = f"applied on branch {branch} ({_plural(n, 'patch')})" if n else f"on branch {branch} at the pinned commit (no patches yet)"
    elif head_branch == branch and own:
        state = f"applied, but the series changed since: rerun `./apply_patches.sh {t.name}`"
    elif head_branch == branch and tip != pinned and clone.has_commit(pinned) and clone.is_ancestor(pinned, tip):
        k = len(clone.commits_between(pinned, tip))
        state = f"branch {branch} has {_plural(k, 'commit')} not in the series: `./apply_patches.sh refresh {t.name}` saves them"
    elif head_branch == branch and tip == pinned:
        state = f"on branch {branch} at the pinned commit, series not applied"
    elif head_branch is None and head == pinned:
        state = "at the pinned commit (detached; reverted)"
    else:
        state = f"HEAD at {(head or 'nothing')[:10]} ({head_branch or 'detached'}), not the pinned commit"
    changes = clone.tracked_changes()
    if changes:
        state += f"; local edits to {_plural(len(changes), 'tracked file')}"
    excluded = clone.excluded_paths()
    if excluded:
        state += f"; {_plural(len(excluded), 'file')} left out (incomplete source)"
    return state


def status(manifest: Manifest, names: Iterable[str] = (), dest: Optional[str] = None,
           patches: Optional[str] = None, say: Say = print) -> int:
    names = list(names) or manifest.names
    if (dest or patches) and len(names) != 1:
        raise UpstreamError("--dest/--patches need exactly one upstream name", code=EXIT_USAGE)
    targets = [(name, manifest.get(name)) for name in names]  # an unknown name fails before any output
    for name, _ in targets:
        try:
            state = describe_clone(resolve(manifest, name, dest, patches))
        except UpstreamError as err:
            state = str(err)
        say(f"{name}: {state}")
    return 0


# -- apply -------------------------------------------------------------------------------------------

@dataclass
class _Snapshot:
    """What a failed command puts back: HEAD, the branch checked out, the project branch's tip, and
    the sparse-checkout settings this tool may change."""

    head: Optional[str]
    head_branch: Optional[str]
    branch_tip: Optional[str]
    sparse: Tuple[Optional[bytes], Tuple[Optional[str], ...]]

    @classmethod
    def capture(cls, clone: Clone, branch: str) -> _Snapshot:
        return cls(clone.head_sha(), clone.head_branch(), clone.branch_sha(branch), clone.sparse_state())


@contextlib.contextmanager
def _no_interrupt() -> Iterator[None]:
    """Hold Ctrl-C while a rollback runs (a second interrupt must not leave the clone half restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class _Change:
    """One command's changes to a clone, undone by `rollback` when the command fails."""

    clone: Clone
    t: Target
    snap: _Snapshot
    fresh: bool = False
    edits: Optional[EditBackup] = None   # the verified backup of the tracked edits, once made
    unsecured: bool = False              # tracked edits exist and are NOT backed up: never force over them
    backup_branch: Optional[str] = None

    def rollback(self) -> str:
        """Put the clone back as `snap` saw it; returns what to tell the user about their edits."""
        clone, t, snap = self.clone, self.t, self.snap
        clone.am_abort()
        if self.unsecured:  # nothing was changed yet (securing failed): the work tree is theirs as it is
            return f"{t.dest} is unchanged"
        if self.fresh:  # there was no clone before: leave the new one at the pinned commit, without the branch
            clone.checkout_detached(t.entry.commit, force=True)
            clone.set_branch(t.branch, None)
            return "left the new clone at the pinned commit"
        clone.restore_sparse(snap.sparse)
        if snap.head:
            clone.checkout_detached(snap.head, force=True)  # tracked edits are in self.edits (or there were none)
        clone.set_branch(t.branch, snap.branch_tip)
        if self.backup_branch:
            clone.set_branch(self.backup_branch, None)
        if snap.head_branch:
            clone.checkout(snap.head_branch, force=True)
        if self.edits is None:
            return f"{t.dest} is unchanged"
        problem = restore_edits(clone, self.edits)
        if problem:
            return f"{t.dest} is back at its HEAD but {problem}: {self.edits.where(t.dest, t.name)}"
        drop(clone, self.edits)
        return f"{t.dest} is unchanged, your local edits back in place"


def _guarded(change: _Change, name: str, work: Callable[[], None]) -> None:
    """Run `work`; on any failure (an error, Ctrl-C, a full disk) roll the clone back and raise one
    UpstreamError that says what happened and where the user's edits are."""
    try:
        work()
    except (UpstreamError, OSError, KeyboardInterrupt) as err:
        interrupted = isinstance(err, KeyboardInterrupt)
        what = "interrupted" if interrupted else str(err)
        with _no_interrupt():
            try:
                state = change.rollback()
            except (UpstreamError, OSError) as again:
                where = change.edits.where(change.t.dest, change.t.name) if change.edits else \
                    f"see `git -C {change.t.dest} status`"
                raise UpstreamError(f"{name}: {what}; restoring {change.t.dest} failed too ({again}); {where}",
                                    code=EXIT_INTERRUPTED if interrupted else EXIT_FAILED) from None
        hint = "" if interrupted else (f"; fix the cause, then rerun; `./apply_patches.sh check {name}` tests a "
                                       "series without touching the clone")
        raise UpstreamError(f"{name}: {what} ({state}{hint})",
                            code=EXIT_INTERRUPTED if interrupted else EXIT_FAILED) from None


def _secure(change: _Change, changes: Sequence[str], reason: str, say: Say) -> None:
    """Back up and verify the tracked edits, say where they are, then reset the tracked files."""
    if not changes:
        return
    change.unsecured = True
    change.edits = secure_edits(change.clone, reason)   # raises with nothing changed when it cannot
    change.unsecured = False
    say(f"{change.t.name}: {change.edits.where(change.t.dest, change.t.name)}")
    discard_tracked_edits(change.clone)


def _apply_series(clone: Clone, t: Target, missing_ok: bool) -> bool:
    """Check out `branch` at the pinned commit and apply the series (`git am`, then `git am --3way`).
    Returns whether --3way was needed; raises PatchFailed."""
    clone.checkout_branch_at(t.branch, t.entry.commit)
    if not t.series:
        return False
    run = clone.apply_missing_ok if missing_ok else clone.am
    try:
        run(t.series, three_way=False)
        return False
    except PatchFailed:
        clone.am_abort()
        clone.checkout_branch_at(t.branch, t.entry.commit)
    run(t.series, three_way=True)
    return True


def _backup_name(clone: Clone, branch: str) -> str:
    n = 1
    while clone.branch_sha(f"{branch}-backup-{n}"):
        n += 1
    return f"{branch}-backup-{n}"


def _open_or_clone(t: Target, source_opt: Optional[str], say: Say):
    """The existing clone at dest, or a fresh clone from --source / the mirror / the URL."""
    dest = t.dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        clone = Clone.open(dest)
        if not clone.has_commit(t.entry.commit):
            source = resolve_source(t.entry, source_opt)
            say(f"{t.name}: fetching the pinned commit {t.entry.short} from {source.describe()}")
            if not clone.fetch_commit(source, t.entry.commit):
                raise _missing_pinned(t, source, None)
        return clone, False
    source = resolve_source(t.entry, source_opt)
    say(f"{t.name}: cloning {source.describe()} into {dest}")
    existed = dest.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        clone = Clone.clone(source, dest)
        if not clone.has_commit(t.entry.commit):
            head = clone.head_sha()
            raise _missing_pinned(t, source, head)
        # a new clone is a clean one at the pin before anything else runs, so that any later failure
        # leaves a clone a rerun can use
        _prepare_checkout(t, clone)
        clone.checkout_detached(t.entry.commit, force=True)
    except BaseException:
        with _no_interrupt():  # what this command made goes; an empty folder the user made stays
            if dest.exists():
                remove_tree(dest)
            if existed:
                dest.mkdir()
        raise
    return clone, True


def _refuse_planned(t: Target, allow: bool, say: Say) -> None:
    if t.entry.status == "ready":
        return
    first = (f"{t.name} is planned, not ready: its patch series, adapter or image are not complete, so its "
             "training command does not train with DEQ fusion yet")
    if not allow:
        raise UpstreamError(f"{first}; rerun with --allow-planned to check out the pinned commit anyway "
                            "(`./apply_patches.sh list` shows which upstreams are ready)", code=EXIT_USAGE)
    say(f"warning: {first} (--allow-planned)")


def apply(manifest: Manifest, name: str, *, dest: Optional[str] = None, patches: Optional[str] = None,
          source: Optional[str] = None, force: bool = False, allow_planned: bool = False,
          say: Say = print) -> int:
    t = resolve(manifest, name, dest, patches)
    _require_clonable(t.entry)
    _refuse_planned(t, allow_planned, say)
    git_executable()
    clone, fresh = _guarded_open(t, source, say)
    what = clone.in_progress()
    if what:
        raise UpstreamError(f"{what} is in progress in {t.dest}: finish or abort it "
                            f"(e.g. git -C {t.dest} am --abort), then rerun")
    pinned, branch = t.entry.commit, t.branch
    changes = [] if fresh else clone.tracked_changes()
    series_fp = fingerprint(t.series)
    rec = read_record(clone.git_dir)
    tip = clone.branch_sha(branch)
    head_branch = clone.head_branch()
    own_tip = rec is not None and tip is not None and rec.head == tip
    applied_here = own_tip and rec.matches(pinned, series_fp)

    if applied_here and head_branch == branch:
        # nothing to change: the edits stay where they are (documented; tested)
        note = f" (local edits to {_plural(len(changes), 'tracked file')} left as they are)" if changes else ""
        say(f"{name}: already applied ({_plural(len(t.series), 'patch')} on branch {branch} at "
            f"{t.entry.short}); nothing changed{note}")
        _next_steps(t, say)
        return 0
    if changes and not force:
        raise _local_edits(t, changes)

    change = _Change(clone, t, _Snapshot.capture(clone, branch), fresh=fresh)
    if tip is not None and tip != pinned and not own_tip:
        if not force:
            k = (len(clone.commits_between(pinned, tip)) if clone.is_ancestor(pinned, tip) else None)
            what = _plural(k, "commit") if k is not None else "commits (not based on the pinned commit)"
            raise UpstreamError(
                f"branch {branch} in {t.dest} has {what} not in the patch series: save them with "
                f"`./apply_patches.sh refresh {name}`, or rerun with --force (the old branch is kept as "
                f"{_backup_name(clone, branch)})"
            )
        change.backup_branch = _backup_name(clone, branch)

    result: Dict[str, object] = {}

    def work() -> None:
        _secure(change, changes, f"`apply --force` of {name}", say)
        if change.backup_branch:
            clone.set_branch(change.backup_branch, tip)
        missing = _prepare_checkout(t, clone)
        if applied_here:
            clone.checkout(branch)  # the applied branch exists: switch back to it
            three_way = rec.three_way
            done = f"{name}: switched back to branch {branch} (series already applied there)"
        else:
            three_way = _apply_series(clone, t, missing_ok=bool(missing))
            how = " (with git am --3way)" if three_way else ""
            done = (f"{name}: applied {_plural(len(t.series), 'patch')}{how} on branch {branch} at {t.entry.short}"
                    if t.series else f"{name}: checked out the pinned commit {t.entry.short} on branch {branch} "
                    f"(no patches yet: {t.patches_dir or t.entry.patches} is empty)")
        write_record(clone.git_dir, Record(name, pinned, branch, clone.branch_sha(branch) or pinned,
                                           series_fp, three_way, missing))
        result.update(done=done, missing=missing)

    _guarded(change, name, work)
    _warn_excluded(t, result["missing"], say)
    say(str(result["done"]))
    if change.edits:
        say(f"  {change.edits.where(t.dest, name)}")
    if change.backup_branch:
        say(f"  the old branch {branch} is kept as {change.backup_branch}")
    _next_steps(t, say)
    return 0


def _guarded_open(t: Target, source: Optional[str], say: Say):
    try:
        return _open_or_clone(t, source, say)
    except KeyboardInterrupt:
        raise UpstreamError(f"{t.name}: interrupted while cloning (the new clone at {t.dest} is removed; rerun "
                            "to clone again)", code=EXIT_INTERRUPTED) from None
    except OSError as err:
        raise UpstreamError(f"{t.name}: could not make the clone at {t.dest} ({err}); the new clone is removed, "
                            "fix the cause and rerun", code=EXIT_ENVIRONMENT) from None


# -- check -------------------------------------------------------------------------------------------

def check(manifest: Manifest, name: str, *, dest: Optional[str] = None, patches: Optional[str] = None,
          source: Optional[str] = None, say: Say = print) -> int:
    """Would the series apply at the pinned commit? Tried in a temporary clone; the real one is untouched."""
    t = resolve(manifest, name, dest, patches)
    _require_clonable(t.entry)
    git_executable()
    existing = t.dest.exists() and (t.dest / ".git").exists()
    src = Source(str(t.dest), "path") if existing else resolve_source(t.entry, source)
    with tempfile.TemporaryDirectory(prefix=f"deqfusion-check-{name}-") as tmp:
        work = Path(tmp) / name
        clone = Clone.clone(src, work, shared=src.is_local)
        if not clone.has_commit(t.entry.commit):
            fallback = resolve_source(t.entry, source) if existing else src
            if not (existing and clone.fetch_commit(fallback, t.entry.commit)):
                raise _missing_pinned(t, fallback, clone.head_sha())
        missing = _prepare_checkout(t, clone)
        try:
            three_way = _apply_series(clone, t, missing_ok=bool(missing))
        except UpstreamError as err:
            raise UpstreamError(f"{name}: {err} (tried in a temporary clone; {t.dest} is untouched)") from None
    _warn_excluded(t, missing, say)
    if not t.series:
        say(f"{name}: no patches yet; the pinned commit {t.entry.short} checks out from {src.describe()}")
    else:
        how = " with git am --3way" if three_way else " cleanly"
        verb = "applies" if len(t.series) == 1 else "apply"
        say(f"{name}: {_plural(len(t.series), 'patch')} {verb}{how} to {t.entry.short} (tried in a temporary clone)")
    return 0


# -- revert ------------------------------------------------------------------------------------------

def _existing_clone(t: Target, verb: str) -> Clone:
    if not t.dest.exists():
        raise UpstreamError(f"no clone of {t.name} at {t.dest}: nothing to {verb} "
                            f"(`./apply_patches.sh {t.name}` makes one, or pass --dest DIR)")
    clone = Clone.open(t.dest)
    what = clone.in_progress()
    if what:
        raise UpstreamError(f"{what} is in progress in {t.dest}: finish or abort it, then rerun")
    if not clone.has_commit(t.entry.commit):
        raise UpstreamError(f"{t.dest} does not have the pinned commit {t.entry.short}: "
                            f"run `./apply_patches.sh {t.name}` first")
    return clone


def revert(manifest: Manifest, name: str, *, dest: Optional[str] = None, force: bool = False,
           say: Say = print) -> int:
    """Back to the pinned commit (detached HEAD). The project branch is kept; apply switches back."""
    t = resolve(manifest, name, dest)
    _require_clonable(t.entry)
    clone = _existing_clone(t, "revert")
    changes = clone.tracked_changes()
    if clone.head_branch() is None and clone.head_sha() == t.entry.commit and not changes:
        say(f"{name}: already at the pinned commit {t.entry.short}; nothing changed")
        return 0
    if changes and not force:
        raise _local_edits(t, changes)
    change = _Change(clone, t, _Snapshot.capture(clone, t.branch))

    def work() -> None:
        _secure(change, changes, f"`revert --force` of {name}", say)
        clone.checkout_detached(t.entry.commit)

    _guarded(change, name, work)
    say(f"{name}: {t.dest} is back at the pinned commit {t.entry.short} (detached HEAD); branch {t.branch} "
        f"is kept: `./apply_patches.sh {name}` switches back")
    if change.edits:
        say(f"  {change.edits.where(t.dest, name)}")
    return 0


# -- restore ---------------------------------------------------------------------------------------

def restore(manifest: Manifest, name: str, *, dest: Optional[str] = None, number: Optional[int] = None,
            say: Say = print) -> int:
    """Re-apply local edits that `apply --force` / `revert --force` saved (refs/deqfusion/backups/N)."""
    t = resolve(manifest, name, dest)
    _require_clonable(t.entry)
    clone = _existing_clone(t, "restore")
    saved = backups.load(clone, number)
    changes = clone.tracked_changes()
    if changes:
        raise UpstreamError(f"{t.dest} has local edits to {_plural(len(changes), 'tracked file')} now: commit them, "
                            f"or save them with `./apply_patches.sh revert {name} --force`, then rerun")
    how = backups.reapply(clone, saved)
    drop(clone, saved)
    say(f"{name}: re-applied the local edits of {saved.ref} to {_plural(len(saved.paths), 'tracked file')} "
        f"{how}; the backup is dropped")
    return 0


# -- refresh -----------------------------------------------------------------------------------------

def refresh(manifest: Manifest, name: str, *, dest: Optional[str] = None, patches: Optional[str] = None,
            message: Optional[str] = None, force: bool = False, say: Say = print) -> int:
    """Regenerate patches/<name>/ from the commits on the project branch (`git format-patch -U1`)."""
    t = resolve(manifest, name, dest, patches)
    _require_clonable(t.entry)
    if t.patches_dir is None:
        raise UpstreamError(f"cannot locate {t.entry.patches} outside the deqfusion checkout: pass --patches DIR",
                            code=EXIT_USAGE)
    clone = _existing_clone(t, "refresh")
    pinned, branch = t.entry.commit, t.branch
    if clone.branch_sha(branch) is None:
        raise UpstreamError(f"no branch {branch} in {t.dest}: run `./apply_patches.sh {name}` first")
    changes = clone.tracked_changes()
    on_branch = clone.head_branch() == branch
    if changes and message:
        if not on_branch:
            raise UpstreamError(f"HEAD of {t.dest} is not on branch {branch}: `git -C {t.dest} checkout {branch}`, "
                                "then rerun")
        index, before = clone.git("write-tree", "--missing-ok"), clone.head_sha()
        try:
            clone.commit_tracked(message)
        except (UpstreamError, KeyboardInterrupt):
            if clone.head_sha() == before:  # not committed: the index as it was (the files were never touched)
                backups.set_index_entries(clone, index, changes)
            raise
        say(f"{name}: committed local edits to {_plural(len(changes), 'tracked file')} on {branch}")
    elif changes and not force:
        raise UpstreamError(f"{t.dest} has uncommitted edits to {_plural(len(changes), 'tracked file')}, which "
                            f"would not be in the series: commit them on {branch}, pass -m MESSAGE to commit "
                            "them, or --force to leave them out")
    tip = clone.branch_sha(branch)
    if tip is None:
        raise UpstreamError(f"no branch {branch} in {t.dest}: run `./apply_patches.sh {name}` first")
    if not clone.is_ancestor(pinned, tip):
        raise UpstreamError(f"branch {branch} in {t.dest} is not based on the pinned commit {t.entry.short}: "
                            f"rebase it (git -C {t.dest} rebase --onto {t.entry.short} ...)")
    if clone.commits_between(pinned, tip, merges=True):
        raise UpstreamError(f"branch {branch} in {t.dest} has merge commits, which format-patch cannot carry: "
                            f"rebase it onto {t.entry.short} linearly")
    commits = clone.commits_between(pinned, tip)
    if not commits:
        raise UpstreamError(f"nothing to refresh: branch {branch} has no commits after the pinned commit "
                            f"{t.entry.short} (commit your edits there first)")
    before = dict(fingerprint(t.series))
    with tempfile.TemporaryDirectory(prefix=f"deqfusion-refresh-{name}-") as tmp:
        files = clone.format_patch(pinned, tip, Path(tmp))
        try:
            written, removed, kept = replace_series(t.patches_dir, files, clone.git_dir / "deqfusion-backups")
        except OSError as err:
            raise UpstreamError(f"{name}: could not write the series into {t.patches_dir} ({err}); the series "
                                "that was there is back in place; fix the cause and rerun") from None
    new_series = read_series(t.patches_dir)
    after = dict(fingerprint(new_series))
    changed = [p for p in written if before.get(p.name) != after.get(p.name)]
    write_record(clone.git_dir, Record(name, pinned, branch, tip, fingerprint(new_series), False,
                                       clone.excluded_paths()))
    say(f"{name}: {t.patches_dir} now holds {_plural(len(written), 'patch')} from {branch} "
        f"({t.entry.short}..{tip[:10]}): {len(changed)} new or changed, {len(removed)} removed")
    for p in changed:
        say(f"  wrote {p.name}")
    for p in removed:
        say(f"  removed {p.name}")
    if kept is not None:
        say(f"  the series it replaced is kept in {kept}")
    say(f"review with `git diff -- {t.patches_dir}` and commit the series")
    return 0
