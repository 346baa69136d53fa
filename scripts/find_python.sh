#!/usr/bin/env sh
# Prints the path of a Python >= 3.12 for the set-up, or explains on stderr and fails.
# Order: $PYTHON if set; python3, python3.12, python3.13 on PATH; then pyenv's
# installed versions (whose shims refuse a version that is not selected).
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
if [ -n "$PYTHON" ]; then
  if ok "$PYTHON"; then command -v "$PYTHON"; exit 0; fi
  echo "PYTHON=$PYTHON is not a Python >= 3.12 (jax 0.11 and later need it)." >&2; exit 1
fi
for name in python3 python3.12 python3.13; do
  if ok "$name"; then "$name" -c 'import sys; print(sys.executable)'; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for candidate in $(ls -d "$root"/versions/3.12* "$root"/versions/3.13* 2>/dev/null); do
    if ok "$candidate/bin/python3"; then echo "$candidate/bin/python3"; exit 0; fi
  done
fi
echo "No Python >= 3.12 found (jax 0.11 and later need it): looked on PATH (python3, python3.12," \
     "python3.13) and among pyenv's versions. Install one, or run make PYTHON=/path/to/python3.12." >&2
exit 1
