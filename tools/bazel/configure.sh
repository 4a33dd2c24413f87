#!/usr/bin/env bash
# Writes .bazelrc.local so `bazel test //...` runs offline with a given Python.
#   tools/bazel/configure.sh [PYTHON]      (default: .venv/bin/python)
# Bazel 4 would download rules_cc, rules_java and remote_coverage_tools; the
# stand-ins beside this script replace them (see tools/bazel/README.md).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
python=${1:-$top/.venv/bin/python}
# Absolute, but not resolved: a virtual environment's python is a symlink.
python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
"$python" -c "import tensorflow, tfloop" || {
  echo "configure.sh: \`$python\` cannot import tensorflow and tfloop; install first." >&2
  exit 1
}
{
  for repo in rules_cc rules_java remote_coverage_tools; do
    echo "common --override_repository=$repo=$top/tools/bazel/$repo"
  done
  echo "build --python_path=$python"
  echo "build --action_env=PATH=$(dirname "$python"):/usr/bin:/bin"
} > "$top/.bazelrc.local"
echo "wrote $top/.bazelrc.local"
