# Sourced by scripts/demo and scripts/test: creates ./.venv on first use and installs the project
# into it from pyproject.toml, so a fresh clone needs nothing but python3 (>= 3.11).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ANNSTREAM_VENV:-$ROOT/.venv}"
EXTRA="${1:-}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "annstream needs Python >= 3.11; $PY is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
STAMP="$VENV/.annstream-installed$EXTRA"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV ..." >&2
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "installing annstream${EXTRA:+[$EXTRA]} into $VENV ..." >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT${EXTRA:+[$EXTRA]}"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
