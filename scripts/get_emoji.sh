#!/usr/bin/env bash
# Fetch the openly licensed emoji sets behind data=emoji and unpack them into DIR/packages/.
#   bash scripts/get_emoji.sh data/emoji && python train.py experiment=emoji
# Needs npm (it only talks to the npm registry); nothing is fetched at training time. The images
# are rasterised and the manifest written by retrieval.datasets.emoji on first use.
set -euo pipefail
dir=${1:?usage: bash scripts/get_emoji.sh DIR (e.g. data/emoji)}
# name@version: the versions whose layout retrieval/datasets/emoji.py reads (see data/README.md)
packages=(
    emoji-datasource-google@16.0.0   # Noto Color Emoji images, Apache-2.0
    emoji-datasource-twitter@16.0.0  # Twemoji images, CC-BY-4.0
    openmoji@17.0.0                  # OpenMoji, CC-BY-SA-4.0
    fluentui-emoji@1.3.0             # Microsoft Fluent UI Emoji, MIT
)
command -v npm >/dev/null || { echo "get_emoji.sh: npm not found; install Node.js/npm (e.g. apt-get install npm)" >&2; exit 1; }
mkdir -p "$dir/packages"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for spec in "${packages[@]}"; do
    name=${spec%@*}
    if [ -f "$dir/packages/$name/package/package.json" ]; then
        echo "$name: already in $dir/packages/$name"
        continue
    fi
    if ! tarball=$(cd "$tmp" && npm pack "$spec" --silent 2>"$tmp/npm.err" | tail -n 1) || [ ! -f "$tmp/$tarball" ]; then
        echo "get_emoji.sh: npm pack $spec failed: $(tail -n 1 "$tmp/npm.err"); check the npm registry is reachable (npm view $name version)" >&2
        exit 1
    fi
    mkdir -p "$tmp/$name"
    tar -xzf "$tmp/$tarball" -C "$tmp/$name"
    rm -rf "$dir/packages/$name"
    mv "$tmp/$name" "$dir/packages/$name"  # whole or not at all
    echo "$name: unpacked into $dir/packages/$name"
done
echo "emoji packages ready in $dir/packages; python train.py data=emoji data.root=$dir rasterises them on first use"
