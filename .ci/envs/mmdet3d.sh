# shellcheck shell=bash
# mmdetection3d 1.4.0 (ImVoteNet through the registry plugin) for tests/envs/mmdet3d/: the LIGHT route.
#
# torch 2.13.0 (CPU, local disk), then mmcv-lite 2.1.0 (mmcv's Python code without the compiled
# mmcv._ext) with the pins that resolve, then mmdet3d 1.4.0 with --no-deps plus only what
# `import mmdet3d.models` / `mmdet3d.testing` / the ImVoteNet path import (numba, terminaltables,
# shapely, pyquaternion are imported at module level, trimesh by the visualizer tools/train.py builds;
# mmdet and mmengine bring the rest; setuptools<81 keeps pkg_resources, which mmengine's config loader
# imports for the mmdet3d:: base). Left out of mmdet3d's
# runtime requirements: open3d (a 400 MB wheel; mmdet3d's visualizer imports it in a try/except),
# nuscenes-devkit and lyft-dataset-sdk (imported by mmdet3d.evaluation's metrics, which the tests do not
# import but tools/train.py's evaluator does; nuscenes-devkit is also what makes an unpinned resolve fall
# back to a matplotlib sdist), plyfile, scikit-image, tensorboard, networkx (data converters and loggers
# the tests never touch). So this venv runs the model, and tools/train.py without its evaluator
# (python -m deqfusion.adapters.mmdet3d.runner train ..., by hand: docs/mmdet3d.md).
# What mmcv._ext would provide comes from the project's stand-ins
# (deqfusion.adapters.mmdet3d.cpu_ops, installed at run time).
#
# Time (2 cores, load ~4, warm pip cache): ~140 s: torch 54 s, the pins 72 s, this project 8 s, mmdet3d 4 s.
# The full route, run by hand (docs/mmdet3d.md): mmcv==2.1.0 built from source
# (setuptools<81, --no-build-isolation, ~14 min on 2 cores) instead of mmcv-lite, i.e. pip install ".[mmdet3d]".
mmdet3d_venv="$DEQFUSION_ENVS/mmdet3d"
mmdet3d_reqs=("numpy<2" "mmengine>=0.8.0,<1.0" "mmcv-lite==2.1.0" "mmdet>=3.0.0,<3.3" "setuptools>=77.0.3,<81"
  numba terminaltables shapely pyquaternion trimesh pytest pytest-timeout)
# the stamp records what was installed: a venv made from another list is made again
mmdet3d_stamp="torch==2.13.0 ${mmdet3d_reqs[*]} -e $DEQFUSION_SRC mmdet3d==1.4.0(--no-deps) v2"
if [[ "$(cat "$mmdet3d_venv/.complete" 2>/dev/null)" != "$mmdet3d_stamp" ]]; then
  rm -rf "$mmdet3d_venv"
  python3 -m venv "$mmdet3d_venv"
  mmdet3d_pip=("$mmdet3d_venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${mmdet3d_pip[@]}" torch==2.13.0
  "${mmdet3d_pip[@]}" "${mmdet3d_reqs[@]}"
  # no build isolation: setuptools<81 is already here (an isolated build would fetch its own, ~1 min)
  "${mmdet3d_pip[@]}" --no-build-isolation -e "$DEQFUSION_SRC"
  # last, so that no later install reports the requirements left out above
  "${mmdet3d_pip[@]}" --no-deps "mmdet3d==1.4.0"
  echo "$mmdet3d_stamp" > "$mmdet3d_venv/.complete"
fi
export DEQFUSION_ENV_MMDET3D="$mmdet3d_venv/bin/python"
