#!/usr/bin/env bash
# Builds Python 3.13 (Google Colab's Python) from Debian 13's source package `python3.13` into a cache folder
# outside the checkout, once; later calls reuse it. Prints the interpreter's path on its last line.
#
# Usage: bash tools/build_python313.sh [PREFIX]
#   PREFIX defaults to $IDC_PY313_PREFIX, else ~/.cache/idc-ci/python3.13.
#
# Debian 12 has no python3.13 package, but Debian 13 ("trixie") carries the upstream tarball in its source
# package; `apt-get source --download-only` fetches and checks it against trixie's signed index, through a
# temporary apt configuration that leaves the machine's own sources untouched. A plain `./configure && make`
# builds it (about 3-4 minutes on 2 cores). The build is installed under a lock and marked complete only at the
# end, so a killed build is redone, never half-used, and two CI runs never build into one folder at once.
set -euo pipefail

prefix="${1:-${IDC_PY313_PREFIX:-$HOME/.cache/idc-ci/python3.13}}"
python_bin="$prefix/bin/python3.13"
marker="$prefix/.complete"
# What pip, TensorFlow, IPython and the package need from the standard library.
check_modules="import ssl, zlib, bz2, lzma, ctypes, sqlite3, hashlib, uuid, readline, decimal, json"

usable() {
  [ -f "$marker" ] && "$python_bin" -c "$check_modules" 2>/dev/null
}

if usable; then
  echo "Python 3.13 found in $prefix (built earlier): $("$python_bin" -V)" >&2
  echo "$python_bin"
  exit 0
fi

mkdir -p "$(dirname "$prefix")"
exec 9>"$prefix.lock"
echo "Waiting for the build lock $prefix.lock ..." >&2
flock 9
if usable; then  # another process built it while this one waited
  echo "$python_bin"
  exit 0
fi

if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
echo "Installing the build dependencies (Debian packages) ..." >&2
"${sudo[@]}" apt-get update -qq >&2
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  build-essential pkg-config xz-utils dpkg-dev libssl-dev zlib1g-dev libbz2-dev liblzma-dev libffi-dev \
  libsqlite3-dev libreadline-dev libncurses-dev uuid-dev libgdbm-dev >&2

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/apt/lists/partial" "$work/apt/sources.list.d" "$work/src"
cat > "$work/apt/sources.list" <<'EOF'
deb-src http://deb.debian.org/debian trixie main
EOF
apt_options=(
  -o "Dir::Etc::SourceList=$work/apt/sources.list"
  -o "Dir::Etc::SourceParts=$work/apt/sources.list.d"
  -o "Dir::State::Lists=$work/apt/lists"
)
echo "Fetching Debian 13's source package python3.13 ..." >&2
apt-get "${apt_options[@]}" update -qq >&2
(cd "$work/src" && apt-get "${apt_options[@]}" source --download-only python3.13 >&2)
tarball="$(ls "$work"/src/python3.13_*.orig.tar.xz | head -n 1)"
if [ ! -f "$tarball" ]; then
  echo "error: Debian's python3.13 source package holds no upstream tarball (looked for python3.13_*.orig.tar.xz)" >&2
  exit 1
fi
tar -xJf "$tarball" -C "$work/src"
source_dir="$(find "$work/src" -maxdepth 1 -type d -name 'Python-3.13*' | head -n 1)"

rm -rf "$prefix"
echo "Building $(basename "$source_dir") into $prefix ..." >&2
(
  cd "$source_dir"
  ./configure --prefix="$prefix" --disable-test-modules >"$work/configure.log" 2>&1 \
    || { tail -n 40 "$work/configure.log" >&2; exit 1; }
  make -j"$(nproc)" >"$work/make.log" 2>&1 || { tail -n 40 "$work/make.log" >&2; exit 1; }
  make install >"$work/install.log" 2>&1 || { tail -n 40 "$work/install.log" >&2; exit 1; }
)
if ! "$python_bin" -c "$check_modules" >&2; then
  echo "error: the Python 3.13 built in $prefix lacks a standard module (see above)" >&2
  exit 1
fi
touch "$marker"
echo "Built $("$python_bin" -V) in $prefix" >&2
echo "$python_bin"
