#!/usr/bin/env bash
# Apply deqfusion's patch series to a pinned upstream clone in third_party/<name>/.
#
#   ./apply_patches.sh imvotenet            clone, check out the pin on branch deqfusion, apply patches/imvotenet/
#   ./apply_patches.sh list|status|check|revert|refresh ...
#   ./apply_patches.sh --help
#
# A thin wrapper over `python -m deqfusion.upstream` (the same commands as `deqfusion apply ...`);
# see docs/upstreams.md. Set PYTHON to choose the interpreter.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if command -v python >/dev/null 2>&1; then python=python; else python=python3; fi
fi
if ! command -v "$python" >/dev/null 2>&1; then
  echo "apply_patches.sh: error: no Python found ($python): install Python >= 3.8, then run: pip install -e ." >&2
  exit 3
fi
# find_spec does not run the package (whose import loads torch): the check stays instant
if ! "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('deqfusion') is None)" >/dev/null 2>&1; then
  echo "apply_patches.sh: error: the deqfusion package is not importable by $python: from $here run: pip install -e ." >&2
  exit 3
fi
export DEQFUSION_REPO_ROOT="$here"
export DEQFUSION_PROG="apply_patches.sh"
exec "$python" -m deqfusion.upstream "$@"
