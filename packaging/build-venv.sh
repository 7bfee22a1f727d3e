#!/bin/sh
# Build a relocated Python virtual environment for a Debian package, at package build time.
#
#   build-venv.sh DESTDIR PREFIX REQUIREMENTS [PACKAGE-TO-UNINSTALL...]
#
# Creates the venv in DESTDIR/PREFIX (e.g. debian/qwenbox-runtime-cpu + /usr/lib/qwenbox/runtime)
# with Debian's /usr/bin/python3.11 (never a python3 found on PATH), installs REQUIREMENTS
# from PyPI (pip's cache and configuration apply), uninstalls the packages named after it,
# then makes the tree work at PREFIX: every build path in bin/ and pyvenv.cfg is rewritten
# to PREFIX, and everything is byte-compiled with paths under PREFIX and hash-based,
# never-checked .pyc files (dpkg clamps mtimes; the sandboxed services cannot write
# __pycache__ there). The build fails if a build path is left anywhere in the tree.
# pip itself is removed: the environment is managed by dpkg, not by pip.
set -eu
dest=$(realpath -m "$1"); prefix=$2; req=$3; shift 3
root="$dest$prefix"
PY=/usr/bin/python3.11
rm -rf "$root"
mkdir -p "$(dirname "$root")"
$PY -m venv "$root"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1 PYTHONDONTWRITEBYTECODE=1
"$root/bin/python" -m pip install -q --no-compile -r "$req"
for p in "$@"; do
    "$root/bin/python" -m pip uninstall -q -y "$p" || true
done
"$root/bin/python" -m pip freeze --all > "$root/packages.txt"
"$root/bin/python" -m pip uninstall -q -y pip
# Build paths -> PREFIX in the scripts pip wrote (shebangs), activate* and pyvenv.cfg.
for f in "$root"/bin/* "$root/pyvenv.cfg"; do
    [ -f "$f" ] && [ ! -L "$f" ] && grep -qI -- "$root" "$f" && sed -i "s|$root|$prefix|g" "$f"
done
find "$root" -name __pycache__ -type d -prune -exec rm -rf {} +
"$root/bin/python" -m compileall -q -f -j0 --invalidation-mode unchecked-hash \
    -s "$dest" -p / "$root/lib" >/dev/null || true     # a few test files in wheels are not Python 3.11
left=$(grep -rlI --exclude='*.pyc' -F -- "$dest" "$root" | head -5 || true)
if [ -n "$left" ]; then
    echo "build-venv.sh: build path $dest left in:" >&2; echo "$left" >&2; exit 1
fi
