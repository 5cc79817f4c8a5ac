#!/usr/bin/env bash
# A built wheel works on its own: build it, install it in a fresh venv, and train two steps from a folder that
# has nothing of the repository (the configs must come from the installed package).
#   .ci/wheel_check.sh            (uses `python` from PATH: the CI venv, with the dependencies installed)
# The fresh venv sees the CI venv's site-packages through a .pth path entry (the dependencies, torch included,
# without reinstalling them); path entries come after the venv's own site-packages, and the CI venv's editable
# install of this repository is not activated through them, so `drift_policy` is the wheel's.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# Build from a copy of the files git knows (tracked, or new and not ignored): the build leaves build/ and
# *.egg-info behind, and must not see local data or runs.
mkdir "$TMP/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$TMP/src"     # (deleted files: skipped)
"$PY" -m pip wheel "$TMP/src" --no-deps --no-build-isolation -q -w "$TMP/dist"
"$PY" -m venv "$TMP/venv"
DEPS="$("$PY" -c 'import site; print(site.getsitepackages()[0])')"
VSITE="$("$TMP/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
echo "$DEPS" > "$VSITE/ci_dependencies.pth"
"$TMP/venv/bin/python" -m pip install -q --no-deps --no-index "$TMP"/dist/drift_policy-*.whl

mkdir "$TMP/elsewhere"
cd "$TMP/elsewhere"
where="$("$TMP/venv/bin/python" -c 'import drift_policy; print(drift_policy.__file__)')"
case "$where" in
  "$TMP/venv/"*) ;;
  *) echo "wheel check: drift_policy imported from $where, not from the wheel" >&2; exit 1 ;;
esac
env -u PYTHONPATH "$TMP/venv/bin/drift-policy" train task=pusht_keypoints train.max_steps=2 train.max_minutes=0 \
  train.eval_episodes=0 train.threads=1 train.log_every=1 train.run_dir=run
test -s run/pretrained/model.safetensors
grep -q '"lr": 0.0006' run/config.json      # the task's drift recipe (configs/recipe/) came with the wheel
test "$(wc -l < run/metrics.jsonl)" -eq 2
echo "wheel check: ok ($(basename "$TMP"/dist/*.whl), trained from $PWD with the packaged configs)"
