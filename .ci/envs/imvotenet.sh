# shellcheck shell=bash
# Sourced by .ci/run (see .ci/envs/README.md): the venv that ImVoteNet's own train.py / eval.py run in
# for tests/test_imvotenet_upstream.py. It has a venv of its own because the scripts import
# opencv-python-headless (a ~60 MB wheel; sunrgbd_utils.py reads the images with cv2.imread), trimesh,
# plyfile and tensorboardX at module level, which the main test environment does not need.
# Cost: about 40-60 s on 2 cores (torch and opencv from the local wheel cache, no build). This is the
# full route already (the README's trimesh==2.35.39 / networkx==2.2 do not import on Python >= 3.10;
# the runner aliases trimesh.io to trimesh.exchange instead, see docs/imvotenet.md). What stays out
# is CUDA: the PointNet++ extension is replaced by the project's pure-PyTorch ops at run time.
imvotenet_venv="${DEQFUSION_ENVS:?}/imvotenet"
if [[ ! -f "$imvotenet_venv/.complete" ]]; then
  rm -rf "$imvotenet_venv"
  python3 -m venv "$imvotenet_venv"
  "$imvotenet_venv/bin/python" -m pip install -q torch==2.13.0
  "$imvotenet_venv/bin/python" -m pip install -q -e "${DEQFUSION_SRC:?}[imvotenet]"
  touch "$imvotenet_venv/.complete"
fi
export DEQFUSION_ENV_IMVOTENET="$imvotenet_venv/bin/python"
