# A non-editable install of this project (as `pip install ".[mmdynamics]"` without -e gives), for
# tests/test_install_nonedit.py: the patch tool and the runner must find the same clone.
# Seconds: the package goes in with --no-deps, and its dependencies (torch, numpy, scikit-learn, ...)
# are read from the main CI venv's site-packages through a .pth line. That line adds the folder to
# sys.path without running the .pth files in it, so the main venv's *editable* deqfusion is not seen.
nonedit_dir="$DEQFUSION_ENVS/nonedit"
if [[ ! -f "$nonedit_dir/.complete" ]]; then
  rm -rf "$nonedit_dir"
  python3 -m venv "$nonedit_dir"
  nonedit_deps="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  nonedit_site="$("$nonedit_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$nonedit_deps" > "$nonedit_site/deqfusion-ci-deps.pth"
  # a copy of the source tree, so that pip's build never writes into the checkout
  nonedit_src="$(mktemp -d)"
  (cd "$DEQFUSION_SRC" && git ls-files -z --cached --others --exclude-standard) |
    python3 -c 'import os, shutil, sys; src, dst = sys.argv[1:3]
for rel in filter(None, sys.stdin.buffer.read().decode().split("\0")):
    if os.path.isfile(os.path.join(src, rel)):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
        shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))' "$DEQFUSION_SRC" "$nonedit_src"
  "$nonedit_dir/bin/python" -m pip install -q --no-deps "$nonedit_src"
  rm -rf "$nonedit_src"
  touch "$nonedit_dir/.complete"
fi
export DEQFUSION_ENV_NONEDIT="$nonedit_dir/bin/python"
