"""One upstream clone, driven through GitPython: the only module that runs git.

Everything here works on a repository's own folder (never a parent repository) and turns git's
failures into one-line `UpstreamError`s. Commits made by `apply` use a fixed committer and the
author's date, so the same pinned commit and series give the same branch tip on every machine.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import EXIT_ENVIRONMENT, EXIT_USAGE, UpstreamError
from .series import Patch
from .sources import Source

GIT_EXECUTABLE_ENV = "GIT_PYTHON_GIT_EXECUTABLE"
COMMITTER: Dict[str, str] = {
    "GIT_COMMITTER_NAME": "deqfusion apply_patches",
    "GIT_COMMITTER_EMAIL": "apply_patches@deqfusion.invalid",
}
SPARSE_HEADER = "# deqfusion: files whose content is missing from the source (an incomplete mirror)"
_IN_PROGRESS = {
    "rebase-apply": "a `git am` or rebase",
    "rebase-merge": "a rebase",
    "MERGE_HEAD": "a merge",
    "CHERRY_PICK_HEAD": "a cherry-pick",
    "REVERT_HEAD": "a revert",
}


class PatchFailed(UpstreamError):
    """A patch of the series does not apply."""

    def __init__(self, patch: str, detail: str):
        super().__init__(f"{patch} does not apply: {detail}")
        self.patch = patch
        self.detail = detail


def git_executable() -> str:
    """The git binary GitPython will use, or a one-line error saying how to get one."""
    exe = os.environ.get(GIT_EXECUTABLE_ENV) or "git"
    found = shutil.which(exe)
    if not found:
        raise UpstreamError(
            f"git not found ({exe!r} is not on PATH): install git (e.g. `apt-get install git`) "
            f"or set {GIT_EXECUTABLE_ENV} to its path",
            code=EXIT_ENVIRONMENT,
        )
    return found


def gitpython():
    """Import GitPython only once git is known to exist (its import fails without one)."""
    exe = git_executable()
    os.environ.setdefault(GIT_EXECUTABLE_ENV, exe)
    try:
        import git
    except ImportError as err:
        raise UpstreamError(f"GitPython is not usable ({err}): pip install 'GitPython>=3.1.30'",
                            code=EXIT_ENVIRONMENT) from None
    return git


def git_message(err: Exception) -> str:
    """The useful line of a GitCommandError: the last error/fatal line of git's stderr."""
    text = "\n".join(str(getattr(err, name, "") or "") for name in ("stdout", "stderr"))
    text = re.sub(r"^\s*(stdout|stderr): '", "", text, flags=re.M).rstrip("'\n ")
    lines = [ln.strip().rstrip("'") for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("hint:")]
    for prefix in ("fatal:", "error:"):
        picked = [ln for ln in lines if ln.startswith(prefix)]
        if picked:
            return picked[-1]
    return lines[-1] if lines else str(err).splitlines()[0]


def remove_tree(path: Path) -> None:
    """rmtree that also removes git's read-only object files (Windows)."""
    def retry(func, p, _exc):
        os.chmod(p, stat.S_IWRITE)
        func(p)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:  # pragma: no cover - Python < 3.12
        shutil.rmtree(path, onerror=retry)


def _sparse_pattern(path: str) -> str:
    escaped = re.sub(r"([\\*?\[\]!#])", r"\\\1", path)
    stripped = escaped.rstrip(" ")
    return "!/" + stripped + "\\ " * (len(escaped) - len(stripped))


class Clone:
    """A clone of one upstream on disk."""

    def __init__(self, repo) -> None:
        self.repo = repo
        self.exe = git_executable()
        self.path = Path(repo.working_tree_dir)
        self.git_dir = Path(repo.git_dir)

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> Clone:
        git = gitpython()
        try:
            repo = git.Repo(str(path))
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise UpstreamError(f"{path} exists but is not a git clone: move it away or pass --dest DIR",
                                code=EXIT_USAGE) from None
        if repo.bare or Path(repo.working_tree_dir).resolve() != Path(path).resolve():
            raise UpstreamError(f"{path} is not the top of a git work tree: pass --dest DIR", code=EXIT_USAGE)
        return cls(repo)

    @classmethod
    def clone(cls, source: Source, dest: Path, shared: bool = False) -> Clone:
        """`git clone --no-checkout` (the caller checks out the pinned commit)."""
        git = gitpython()
        options = ["--no-checkout"] + (["--shared"] if shared else [])
        try:
            repo = git.Repo.clone_from(source.location, str(dest), multi_options=options)
        except git.GitCommandError as err:
            if dest.exists():
                remove_tree(dest)
            hint = ("check the path, or pass another --source" if source.is_local else
                    "no network? clone it on a machine with network and pass --source PATH, "
                    "or set DEQFUSION_MIRROR to a folder of clones")
            raise UpstreamError(f"could not clone {source.describe()} ({git_message(err)}): {hint}",
                                code=EXIT_ENVIRONMENT) from None
        return cls(repo)

    # -- running git ---------------------------------------------------------------------------
    def _execute(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, **kwargs) -> str:
        """Every git command on this clone runs here: one seam (the fault-injection tests use it).
        Raises GitPython's GitCommandError when git fails."""
        return self.repo.git.execute([self.exe, *args], env=env, **kwargs)

    def git(self, *args: str, env: Optional[Dict[str, str]] = None, **kwargs) -> str:
        git = gitpython()
        try:
            return self._execute(args, env=env, **kwargs)
        except git.GitCommandError as err:
            raise UpstreamError(f"git {args[0]} failed in {self.path}: {git_message(err)}") from None

    def _query(self, *args: str) -> Optional[str]:
        """A yes/no query: its output, None where git answers "no" (exit status 1); any other failure
        (a lock, a corrupt object store, a crash) is an error, never read as "no"."""
        git = gitpython()
        try:
            return self._execute(args)
        except git.GitCommandError as err:
            if err.status == 1:
                return None
            raise UpstreamError(f"git {args[0]} failed in {self.path}: {git_message(err)}") from None

    def _try(self, *args: str, env: Optional[Dict[str, str]] = None) -> Optional[str]:
        """Run git; None where it fails (a best-effort step whose failure changes nothing)."""
        git = gitpython()
        try:
            return self._execute(args, env=env)
        except git.GitCommandError:
            return None

    # -- state ---------------------------------------------------------------------------------
    def head_branch(self) -> Optional[str]:
        """The checked-out branch, None when HEAD is detached."""
        ref = self._query("symbolic-ref", "-q", "HEAD")
        return ref[len("refs/heads/"):] if ref and ref.startswith("refs/heads/") else None

    def head_sha(self) -> Optional[str]:
        return self._query("rev-parse", "--verify", "-q", "HEAD^{commit}")

    def branch_sha(self, branch: str) -> Optional[str]:
        return self._query("rev-parse", "--verify", "-q", f"refs/heads/{branch}^{{commit}}")

    def has_commit(self, sha: str) -> bool:
        return self._query("rev-parse", "--verify", "-q", f"{sha}^{{commit}}") is not None

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        return self._query("merge-base", "--is-ancestor", ancestor, descendant) is not None

    def commits_between(self, base: str, tip: str, merges: bool = False) -> List[str]:
        out = self.git("rev-list", "--reverse", *(["--merges"] if merges else []), f"{base}..{tip}")
        return out.split()

    def tracked_changes(self) -> List[str]:
        """Staged or unstaged changes to tracked files (untracked files are never touched, so never count)."""
        out = self.git("status", "--porcelain", "--untracked-files=no", "--ignore-submodules=all")
        return [line[3:] for line in out.splitlines() if line.strip()]

    def in_progress(self) -> Optional[str]:
        for name, what in _IN_PROGRESS.items():
            if (self.git_dir / name).exists():
                return what
        return None

    # -- incomplete sources ----------------------------------------------------------------------
    def missing_blobs(self, commit: str) -> List[str]:
        """Paths at `commit` whose content is not in the object store (a snapshot that left large
        files out). Empty for any complete clone."""
        listing = self.git("ls-tree", "-r", "-z", "--full-tree", commit)
        entries = []
        for item in listing.split("\0"):
            if not item:
                continue
            meta, _, path = item.partition("\t")
            parts = meta.split()
            if len(parts) == 3 and parts[1] == "blob":
                entries.append((parts[2], path))
        if not entries:
            return []
        with tempfile.TemporaryFile() as shas:
            shas.write(("\n".join(sha for sha, _ in entries) + "\n").encode())
            shas.seek(0)
            out = self.git("cat-file", "--batch-check", istream=shas)
        missing = {line.split()[0] for line in out.splitlines() if line.endswith(" missing")}
        return [path for sha, path in entries if sha in missing]

    def exclude_from_checkout(self, paths: Sequence[str]) -> bool:
        """Leave `paths` out of the work tree (sparse checkout), so that a checkout never reads them.
        Returns whether anything changed."""
        if sorted(paths) == sorted(self.excluded_paths()):
            return False
        info = self.git_dir / "info"
        info.mkdir(parents=True, exist_ok=True)
        lines = [SPARSE_HEADER, "/*", *(_sparse_pattern(p) for p in paths)]
        (info / "sparse-checkout").write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.git("config", "core.sparseCheckout", "true")
        self.git("config", "core.sparseCheckoutCone", "false")
        return True

    def config_value(self, key: str) -> Optional[str]:
        """The clone's own (local) git config value of `key`, None where unset."""
        return self._query("config", "--local", "--get", key)

    SPARSE_KEYS = ("core.sparseCheckout", "core.sparseCheckoutCone")

    def sparse_state(self) -> Tuple[Optional[bytes], Tuple[Optional[str], ...]]:
        """The sparse-checkout file and the config keys `exclude_from_checkout` sets."""
        sparse = self.git_dir / "info" / "sparse-checkout"
        return (sparse.read_bytes() if sparse.is_file() else None,
                tuple(self.config_value(k) for k in self.SPARSE_KEYS))

    def restore_sparse(self, state: Tuple[Optional[bytes], Tuple[Optional[str], ...]]) -> None:
        """Put what `sparse_state` saw back (after a failure)."""
        content, values = state
        sparse = self.git_dir / "info" / "sparse-checkout"
        if (sparse.read_bytes() if sparse.is_file() else None) != content:
            if content is None:
                sparse.unlink()
            else:
                sparse.write_bytes(content)
        for key, value in zip(self.SPARSE_KEYS, values):
            if self.config_value(key) != value:
                if value is None:
                    self.git("config", "--local", "--unset", key)
                else:
                    self.git("config", "--local", key, value)

    def excluded_paths(self) -> List[str]:
        """Paths this tool left out of the checkout (see `exclude_from_checkout`)."""
        sparse = self.git_dir / "info" / "sparse-checkout"
        try:
            lines = sparse.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        if not lines or lines[0] != SPARSE_HEADER:
            return []
        return [re.sub(r"\\(.)", r"\1", ln[2:]) for ln in lines if ln.startswith("!/")]

    # -- moving HEAD -------------------------------------------------------------------------------
    def checkout_branch_at(self, branch: str, sha: str) -> None:
        """Create or reset `branch` at `sha` and check it out. Refuses (git does) to overwrite an
        untracked file that is in the way."""
        self.git("checkout", "-q", "-B", branch, sha)

    def checkout_detached(self, sha: str, force: bool = False) -> None:
        self.git("checkout", "-q", *(["-f"] if force else []), "--detach", sha)

    def checkout(self, ref: str, force: bool = False) -> None:
        self.git("checkout", "-q", *(["-f"] if force else []), ref)

    def set_branch(self, branch: str, sha: Optional[str]) -> None:
        """Point `branch` at `sha` (None deletes it). `branch` must not be checked out."""
        if sha is None:
            if self.branch_sha(branch):
                self.git("branch", "-q", "-D", branch)
        else:
            self.git("branch", "-q", "-f", branch, sha)

    def fetch_commit(self, source: Source, sha: str) -> bool:
        """Fetch `sha` (or, if the source refuses single commits, all its branches and tags)."""
        if self._try("fetch", "-q", source.location, sha) is None:
            self._try("fetch", "-q", "--tags", source.location, "+refs/heads/*:refs/remotes/deqfusion-source/*")
        return self.has_commit(sha)

    # -- applying a series -------------------------------------------------------------------------
    def am_abort(self) -> None:
        if (self.git_dir / "rebase-apply").exists():
            self._try("am", "--abort")

    def am(self, series: Sequence[Patch], three_way: bool) -> None:
        """`git am` the series onto HEAD; PatchFailed names the first patch that does not apply."""
        git = gitpython()
        args = ["am", "-q", "--keep-cr", "--committer-date-is-author-date", "--whitespace=nowarn",
                "--3way" if three_way else "--no-3way", *(str(p.path) for p in series)]
        try:
            self._execute(args, env=COMMITTER)
        except git.GitCommandError as err:
            text = f"{err.stdout}\n{err.stderr}"
            match = re.search(r"Patch failed at (\d+)", text)
            done = int(match.group(1)) - 1 if match else 0
            name = series[done].name if 0 <= done < len(series) else "the series"
            raise PatchFailed(name, git_message(err)) from None

    def apply_missing_ok(self, series: Sequence[Patch], three_way: bool) -> None:
        """The same as `am`, for a clone whose source lacks some file contents: `git am` cannot
        write a tree that names a missing blob, `git write-tree --missing-ok` can."""
        git = gitpython()
        for patch in series:
            with tempfile.TemporaryDirectory(prefix="deqfusion-am-") as tmp:
                msg, diff = Path(tmp) / "msg", Path(tmp) / "patch"
                with open(patch.path, "rb") as mail:
                    info = self.git("mailinfo", str(msg), str(diff), istream=mail)
                fields = dict(line.split(": ", 1) for line in info.splitlines() if ": " in line)
                try:
                    self._execute(["apply", "--index", "--whitespace=nowarn",
                                   *(["--3way"] if three_way else []), str(diff)])
                except git.GitCommandError as err:
                    raise PatchFailed(patch.name, git_message(err)) from None
                body = msg.read_text(encoding="utf-8").strip()
                message = fields.get("Subject", patch.name) + ("\n\n" + body if body else "") + "\n"
                msg.write_text(message, encoding="utf-8")
                env = dict(COMMITTER, GIT_AUTHOR_NAME=fields.get("Author", "unknown"),
                           GIT_AUTHOR_EMAIL=fields.get("Email", ""))
                if fields.get("Date"):
                    env.update(GIT_AUTHOR_DATE=fields["Date"], GIT_COMMITTER_DATE=fields["Date"])
                self.commit_index(message_file=msg, env=env, reflog=f"deqfusion apply: {patch.name}")

    def commit_index(self, message_file: Path, env: Optional[Dict[str, str]] = None, reflog: str = "commit") -> str:
        """Commit the index on HEAD even where some blobs are missing from the object store."""
        tree = self.git("write-tree", "--missing-ok")
        parent = self.git("rev-parse", "HEAD")
        sha = self.git("commit-tree", tree, "-p", parent, "-F", str(message_file), env=env)
        self.git("update-ref", "-m", reflog, "HEAD", sha, parent)
        return sha

    def commit_tracked(self, message: str) -> str:
        """Commit every change to tracked files on HEAD (`git add -u` + commit) with the user's identity;
        works where the source lacks some file contents too."""
        self.git("add", "-u")
        with tempfile.TemporaryDirectory(prefix="deqfusion-commit-") as tmp:
            msg = Path(tmp) / "msg"
            msg.write_text(message.rstrip() + "\n", encoding="utf-8")
            if self.excluded_paths():
                return self.commit_index(message_file=msg, reflog="deqfusion refresh: commit")
            self.git("commit", "-q", "-F", str(msg))
        return self.git("rev-parse", "HEAD")

    def format_patch(self, base: str, tip: str, outdir: Path) -> List[Path]:
        """`git format-patch -U1` of base..tip, stable across machines and edits: no commit ids, no git
        version, no "n/m" in subjects (adding a patch leaves the others byte-identical)."""
        self.git("format-patch", "-q", "-U1", "--no-numbered", "--zero-commit", "--no-signature", "--no-cover-letter",
                 "--no-attach", "--no-thread", "-o", str(outdir), f"{base}..{tip}")
        return sorted(outdir.glob("*.patch"))
