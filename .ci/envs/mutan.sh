# shellcheck shell=bash
# Sourced by .ci/run: the venv in which block.bootstrap.pytorch (Mutan, VQA-v2) trains; exports
# DEQFUSION_ENV_MUTAN (its Python), which tests/test_mutan_upstream.py drives.
#
# Lightest faithful route: torch==2.13.0 (CPU, from this machine's disk), bootstrap.pytorch 0.0.13 and
# skipthoughts 0.0.1 without their declared dependencies, and only the packages block's VQA training
# and evaluation import: PyYAML, click, numpy, scipy (block's metric), tqdm, opencv-python-headless
# (block.datasets imports cv2 for VRD), tensorboardX (bootstrap's tensorboard view, which the tests
# select instead of the plotly view: plotly<4 + seaborn + pandas are the image's, docker/mutan/).
# Python 3.11 + PyYAML 6 need deqfusion.adapters.mutan.compat (python -m deqfusion.adapters.mutan.run).
# ipdb, plotly, seaborn, tabulate, argparse (bootstrap's other declared dependencies) are not imported
# on this path. The full route is `pip install ".[mutan]"` (docker/mutan/Dockerfile).
# CPU time about 30 s (torch's wheel is most of it); reused when complete.
mutan_venv="$DEQFUSION_ENVS/mutan"
if [[ ! -f "$mutan_venv/.complete" ]]; then
  rm -rf "$mutan_venv"
  python3 -m venv "$mutan_venv"
  # --no-compile: no .pyc for the thousands of modules never imported here (a third of torch's install time)
  "$mutan_venv/bin/python" -m pip install -q --no-compile torch==2.13.0
  "$mutan_venv/bin/python" -m pip install -q --no-compile "pyyaml>=5.1" "click>=7" "numpy>=1.21" "scipy>=1.5" \
    "tqdm>=4.60" "opencv-python-headless>=4.5" "tensorboardX>=2.1" "GitPython>=3.1.30" "pytest>=7" "pytest-timeout>=2.1"
  # last, so that pip's dependency check does not report the declared dependencies left out on purpose
  "$mutan_venv/bin/python" -m pip install -q --no-compile --no-deps bootstrap.pytorch==0.0.13 skipthoughts==0.0.1
  "$mutan_venv/bin/python" -m pip install -q --no-compile --no-deps -e "$DEQFUSION_SRC"
  touch "$mutan_venv/.complete"
fi
export DEQFUSION_ENV_MUTAN="$mutan_venv/bin/python"
