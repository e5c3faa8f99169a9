"""apply / check / revert / refresh / status on a fake upstream made of real git repositories."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from upstream_fake import Fake, git, mtimes, tree_state

from deqfusion.upstream.record import read_record

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _apply(run, fake: Fake, dest: Path, *extra: str):
    return run("apply", "fake", "--source", str(fake.up), "--dest", str(dest), *extra)


# -- apply ----------------------------------------------------------------------------------------

def test_apply_checks_out_pin_on_branch_and_applies_series(run, fake):
    dest = fake.dest()
    code, out, err = _apply(run, fake, dest)
    assert code == 0, err
    assert git(dest, "symbolic-ref", "--short", "HEAD") == "deqfusion"
    assert git(dest, "rev-parse", "HEAD~2") == fake.pinned          # the pin, not upstream's HEAD (c3)
    assert git(dest, "log", "--format=%s", f"{fake.pinned}..HEAD").splitlines() == ["Add the DEQ hook", "Fuse with DEQ"]
    assert "deq_fuse(a, b)" in (dest / "model.py").read_text()
    assert (dest / "deq_hook.py").is_file()
    assert "epochs = 10" in (dest / "train.py").read_text()
    assert git(dest, "status", "--porcelain") == ""
    rec = read_record(dest / ".git")
    assert rec.commit == fake.pinned and rec.head == git(dest, "rev-parse", "HEAD") and len(rec.series) == 2
    assert "applied 2 patches" in out and "python train.py" in out     # prints the training command


def test_apply_twice_changes_nothing_and_says_so(run, fake):
    dest = fake.dest()
    assert _apply(run, fake, dest)[0] == 0
    before, times = tree_state(dest), mtimes(dest)
    code, out, _ = _apply(run, fake, dest)
    assert code == 0
    assert "already applied" in out and "nothing changed" in out
    assert tree_state(dest) == before and mtimes(dest) == times


def test_commit_ids_are_reproducible(run, fake):
    a, b = fake.dest("a"), fake.dest("b")
    assert _apply(run, fake, a)[0] == 0
    assert _apply(run, fake, b)[0] == 0
    assert git(a, "rev-parse", "HEAD") == git(b, "rev-parse", "HEAD")


@pytest.mark.parametrize("layout", ["name", "owner+repo", "snapshot", "single"])
def test_apply_from_mirror_env(run, fake, monkeypatch, layout):
    if layout == "name":
        mirror = fake.mirror                                         # mirror/fake
    elif layout == "owner+repo":
        mirror = fake.root / "m2"
        (mirror / "example+fake-upstream").mkdir(parents=True)
        shutil.move(str(fake.mirror / "fake"), str(mirror / "example+fake-upstream" / "repo"))
    elif layout == "snapshot":                                      # /work/.mirror style: <owner>+<repo>/repo, bare
        mirror = fake.root / "m3"
        git(fake.root, "clone", "-q", "--bare", str(fake.up), str(mirror / "example+fake-upstream" / "repo"))
    else:
        mirror = fake.mirror / "fake"                                # the variable names one repository
    monkeypatch.setenv("DEQFUSION_MIRROR", str(mirror))
    dest = fake.dest()
    code, out, err = run("apply", "fake", "--dest", str(dest))
    assert code == 0, err
    assert "DEQFUSION_MIRROR" in out
    assert git(dest, "rev-parse", "HEAD~2") == fake.pinned


def test_three_way_fallback(run, fake):
    dest = fake.dest()
    code, out, err = _apply(run, fake, dest, "--patches", str(fake.three))
    assert code == 0, err
    assert "--3way" in out
    text = (dest / "train.py").read_text()
    assert "lr = 0.01" in text and "epochs = 10" in text
    assert read_record(dest / ".git").three_way


# -- refusing and restoring -------------------------------------------------------------------------

def test_failed_patch_leaves_existing_clone_byte_identical(run, fake):
    dest = fake.dest()
    assert _apply(run, fake, dest)[0] == 0
    (dest / "notes.txt").write_text("untracked, mine\n")             # untracked files are never touched
    before = tree_state(dest)
    code, _, err = _apply(run, fake, dest, "--patches", str(fake.bad))
    assert code == 1
    assert "0003-" in err and "does not apply" in err and "unchanged" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert tree_state(dest) == before
    assert not (dest / ".git" / "rebase-apply").exists()


def test_failed_patch_after_revert_restores_detached_head(run, fake):
    dest = fake.dest()
    assert _apply(run, fake, dest)[0] == 0
    assert run("revert", "fake", "--dest", str(dest))[0] == 0
    before = tree_state(dest)
    assert _apply(run, fake, dest, "--patches", str(fake.bad))[0] == 1
    assert tree_state(dest) == before


def test_failed_patch_with_force_gives_the_edits_back(run, fake):
    dest = fake.dest()
    assert _apply(run, fake, dest)[0] == 0
    (dest / "model.py").write_text((dest / "model.py").read_text() + "# my edit\n")
    before = tree_state(dest)
    code, _, err = _apply(run, fake, dest, "--patches", str(fake.bad), "--force")
    assert code == 1, err
    assert tree_state(dest) == before                                 # edit back in place, stash list as before
    assert "# my edit" in (dest / "model.py").read_text()


def test_failed_patch_on_fresh_clone_leaves_it_at_the_pin(run, fake):
    dest = fake.dest()
    code, _, err = _apply(run, fake, dest, "--patches", str(fake.bad))
    assert code == 1 and "new clone" in err
    assert git(dest, "rev-parse", "HEAD") == fake.pinned
    assert git(dest, "branch", "--list", "deqfusion") == ""
    assert git(dest, "status", "--porcelain") == ""


def test_local_edits_are_never_overwritten(run, fake):
    dest = fake.dest()
    assert _apply(run, fake, dest)[0] == 0
    (dest / "train.py").write_text("my own training script\n")
    before = tree_state(dest)
    for args in (("revert", "fake", "--dest", str(dest)),
                 ("apply", "fake", "--dest", str(dest), "--patches", str(fake.three))):
        code, _, err = run(*args)
        assert code == 1
        assert "local edits" in err and "--force" in err and "train.py" in err
        assert tree_state(dest) == before


def test_reapply_with_local_edits_and_nothing_to_do_keeps_them(run, fake):
    dest = fake.dest()
    assert _apply(run, fake, dest)[0] == 0
    (dest / "train.py").write_text("my own training script\n")
    before = tree_state(dest)
    code, out, _ = _apply(run, fake, dest)
    assert code == 0 and "already applied" in out and "left as they are" in out
    assert tree_state(dest) == before


def test_force_stashes_the_edits_never_discards(run, fake):
    dest = fake.dest()
    assert _apply(run, fake, dest)[0] == 0
    (dest / "train.py").write_text("my own training script\n")
    code, out, err = run("revert", "fake", "--dest", str(dest), "--force")
    assert code == 0, err
    assert "stash" in out
    assert git(dest, "rev-parse", "HEAD") == fake.pinned
    assert "my own training script" not in (dest / "train.py").read_text()
    assert len(git(dest, "stash", "list").splitlines()) == 1
    assert "my own training script" in git(dest, "stash", "show", "-p", "stash@{0}")
    git(dest, "stash", "pop")
    assert (dest / "train.py").read_text() == "my own training script\n"


def test_apply_force_with_local_edits_stashes_then_applies(run, fake):
    dest = fake.dest()
    assert _apply(run, fake, dest)[0] == 0
    (dest / "README.md").write_text("edited\n")
    code, out, err = _apply(run, fake, dest, "--patches", str(fake.three), "--force")
    assert code == 0, err
    assert "lr = 0.01" in (dest / "train.py").read_text()
    assert "edited" in git(dest, "stash", "show", "-p", "stash@{0}")


def test_branch_commits_not_in_series_are_kept(run, fake):
    dest = fake.dest()
    assert _apply(run, fake, dest)[0] == 0
    (dest / "model.py").write_text("# rewritten\n")
    git(dest, "commit", "-qam", "unsaved work")
    tip = git(dest, "rev-parse", "HEAD")
    before = tree_state(dest)
    code, _, err = _apply(run, fake, dest)
    assert code == 1 and "refresh" in err and "--force" in err
    assert tree_state(dest) == before
    code, out, err = _apply(run, fake, dest, "--force")
    assert code == 0, err
    assert git(dest, "rev-parse", "deqfusion-backup-1") == tip and "deqfusion-backup-1" in out


# -- check / revert / status --------------------------------------------------------------------------

def test_check_without_a_clone_touches_nothing(run, fake):
    dest = fake.dest()
    code, out, err = run("check", "fake", "--source", str(fake.up), "--dest", str(dest))
    assert code == 0, err
    assert "apply cleanly" in out
    assert not dest.exists()
    code, _, err = run("check", "fake", "--source", str(fake.up), "--dest", str(dest), "--patches", str(fake.bad))
    assert code == 1 and "0003-" in err and not dest.exists()


def test_check_leaves_existing_clone_untouched(run, fake):
    dest = fake.dest()
    assert _apply(run, fake, dest)[0] == 0
    (dest / "README.md").write_text("local edit\n")
    before, times = tree_state(dest), mtimes(dest)
    assert run("check", "fake", "--dest", str(dest))[0] == 0
    assert run("check", "fake", "--dest", str(dest), "--patches", str(fake.bad))[0] == 1
    assert run("check", "fake", "--dest", str(dest), "--patches", str(fake.three))[0] == 0
    assert tree_state(dest) == before and mtimes(dest) == times


def test_revert_and_apply_again(run, fake):
    dest = fake.dest()
    assert _apply(run, fake, dest)[0] == 0
    applied = git(dest, "rev-parse", "HEAD")
    code, out, _ = run("revert", "fake", "--dest", str(dest))
    assert code == 0 and "pinned commit" in out
    assert git(dest, "rev-parse", "HEAD") == fake.pinned
    assert not (dest / "deq_hook.py").exists()
    assert git(dest, "rev-parse", "deqfusion") == applied              # the branch is kept
    code, out, _ = run("revert", "fake", "--dest", str(dest))
    assert code == 0 and "already" in out
    _, out, _ = run("status", "fake", "--dest", str(dest))
    assert "reverted" in out
    code, out, _ = _apply(run, fake, dest)
    assert code == 0 and "switched back" in out
    assert git(dest, "rev-parse", "HEAD") == applied


def test_status_reports_states(run, fake):
    dest = fake.dest()
    _, out, _ = run("status", "fake", "--dest", str(dest))
    assert "not cloned" in out
    assert _apply(run, fake, dest)[0] == 0
    _, out, _ = run("status", "fake", "--dest", str(dest))
    assert "applied on branch deqfusion (2 patches)" in out
    (dest / "train.py").write_text("x\n")
    _, out, _ = run("status", "fake", "--dest", str(dest))
    assert "local edits" in out
    _, out, _ = run("status")
    assert "piponly: pip package example==1.0" in out


# -- refresh -------------------------------------------------------------------------------------------

def test_refresh_round_trip(run, fake):
    dest, series = fake.dest(), fake.root / "patches" / "mine"
    shutil.copytree(fake.good, series)
    assert _apply(run, fake, dest, "--patches", str(series))[0] == 0
    (dest / "train.py").write_text((dest / "train.py").read_text().replace("seed = 0", "seed = 1"))
    code, out, err = run("refresh", "fake", "--dest", str(dest), "--patches", str(series), "-m", "Seed 1")
    assert code == 0, err
    files = sorted(p.name for p in series.glob("*.patch"))
    assert len(files) == 3 and files[2].startswith("0003-Seed-1")
    assert "1 new or changed" in out                                  # the two old patches are byte-identical
    text = (series / files[2]).read_text()
    assert "-seed = 0\n+seed = 1" in text and "@@ -4,3 +4,3 @@" in text    # -U1: one line of context
    assert "From 0000000000000000000000000000000000000000" in text
    # the clone counts as applied with the new series...
    code, out, _ = _apply(run, fake, dest, "--patches", str(series))
    assert code == 0 and "already applied" in out
    # ...and the series rebuilds the same tree on a fresh clone
    fresh = fake.dest("fresh")
    assert _apply(run, fake, fresh, "--patches", str(series))[0] == 0
    assert git(fresh, "rev-parse", "HEAD^{tree}") == git(dest, "rev-parse", "HEAD^{tree}")


def test_refresh_refuses_uncommitted_edits_and_empty_branch(run, fake):
    dest, series = fake.dest(), fake.root / "patches" / "mine"
    shutil.copytree(fake.good, series)
    assert _apply(run, fake, dest, "--patches", str(series))[0] == 0
    (dest / "train.py").write_text("edited\n")
    code, _, err = run("refresh", "fake", "--dest", str(dest), "--patches", str(series))
    assert code == 1 and "-m MESSAGE" in err
    git(dest, "checkout", "-q", "--", "train.py")
    git(dest, "reset", "-q", "--hard", fake.pinned)
    code, _, err = run("refresh", "fake", "--dest", str(dest), "--patches", str(series))
    assert code == 1 and "nothing to refresh" in err
    assert len(list(series.glob("*.patch"))) == 2


# -- errors: one line, names the fix, non-zero -------------------------------------------------------------

def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unknown_name(run):
    code, _, err = run("apply", "nosuch")
    assert code == 2
    line = _one_line(err)
    assert "unknown upstream 'nosuch'" in line and "fake" in line and "list" in line


def test_bad_mirror_path(run, fake, monkeypatch):
    monkeypatch.setenv("DEQFUSION_MIRROR", str(fake.root / "no-such-folder"))
    code, _, err = run("apply", "fake", "--dest", str(fake.dest()))
    assert code == 2 and "DEQFUSION_MIRROR" in _one_line(err) and "unset it" in err
    monkeypatch.setenv("DEQFUSION_MIRROR", str(fake.root / "patches"))  # exists, holds no clone
    code, _, err = run("apply", "fake", "--dest", str(fake.dest()))
    assert code == 2 and "holds no clone of fake" in _one_line(err)
    monkeypatch.delenv("DEQFUSION_MIRROR")
    code, _, err = run("apply", "fake", "--source", str(fake.root / "patches"), "--dest", str(fake.dest()))
    assert code == 2 and "not a git repository" in _one_line(err)
    assert not fake.dest().exists()


def test_mirror_without_the_pinned_commit(run, fake, monkeypatch):
    monkeypatch.setenv("DEQFUSION_MIRROR", str(fake.old))
    dest = fake.dest()
    code, _, err = run("apply", "fake", "--dest", str(dest))
    line = _one_line(err)
    assert code == 1 and fake.pinned in line and "fetch" in line and fake.c1[:10] in line
    assert not dest.exists()                                          # the useless clone is removed
    code, _, err = run("check", "fake", "--dest", str(dest))
    assert code == 1 and fake.pinned in _one_line(err)


def test_no_network(run, fake):
    code, _, err = run("apply", "fake", "--dest", str(fake.dest()))  # no mirror, no --source: the URL
    line = _one_line(err)
    assert code == 3 and "could not clone" in line and "--source" in line and "DEQFUSION_MIRROR" in line
    assert not fake.dest().exists()


def test_missing_git(run, fake, monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("GIT_PYTHON_GIT_EXECUTABLE", raising=False)
    code, _, err = run("apply", "fake", "--source", str(fake.up), "--dest", str(fake.dest()))
    line = _one_line(err)
    assert code == 3 and "git not found" in line and "install git" in line


def test_pip_entry_is_not_cloned(run):
    code, _, err = run("apply", "piponly")
    assert code == 2 and "pip install" in _one_line(err)


def test_git_command_inside_parent_repo_never_escapes(run, fake):
    """A --dest that is a plain folder inside another repository is refused, not treated as that repository."""
    outer = fake.up
    (outer / "sub").mkdir()
    (outer / "sub" / "file").write_text("x")
    code, _, err = _apply(run, fake, outer / "sub")
    assert code == 2 and "not a git clone" in _one_line(err)


# -- sources that lack some file contents (snapshots that leave large files out) --------------------------

def test_incomplete_source_applies_and_refreshes(run, fake):
    snap = fake.root / "snap"
    shutil.copytree(fake.up / ".git", snap)                           # a bare copy with loose objects
    subprocess.run(["git", "--git-dir", str(snap), "config", "core.bare", "true"], check=True)
    blob = git(fake.up, "rev-parse", f"{fake.pinned}:data/big.bin")
    (snap / "objects" / blob[:2] / blob[2:]).unlink()
    dest, series = fake.dest(), fake.root / "patches" / "mine"
    shutil.copytree(fake.good, series)
    code, out, err = run("apply", "fake", "--source", str(snap), "--dest", str(dest), "--patches", str(series))
    assert code == 0, err
    assert "data/big.bin" in out and "left out" in out
    assert "deq_fuse(a, b)" in (dest / "model.py").read_text() and not (dest / "data" / "big.bin").exists()
    assert git(dest, "rev-parse", "HEAD~2") == fake.pinned
    complete = fake.dest("complete")
    assert _apply(run, fake, complete, "--patches", str(series))[0] == 0
    assert git(dest, "rev-parse", "HEAD") == git(complete, "rev-parse", "HEAD")  # same commits as git am makes
    (dest / "README.md").write_text("edited in an incomplete clone\n")
    code, _, err = run("refresh", "fake", "--dest", str(dest), "--patches", str(series), "-m", "Edit README")
    assert code == 0, err
    assert len(list(series.glob("*.patch"))) == 3
    assert _apply(run, fake, fake.dest("again"), "--patches", str(series))[0] == 0
