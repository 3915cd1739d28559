#!/usr/bin/env bash
# Public goss files through `phoenix verify --host`: how many Phoenix understands (exit 0 or 1:
# loaded and run; 2: refused; anything else: a crash). Files whose licence lets them be copied
# are kept in crates/check/tests/goss-corpus (the tests load them); the others are read from
# their repository at the commit listed in SOURCES.tsv, cloned from GitHub, or from
# PHOENIX_CORPUS_MIRROR/OWNER+NAME/repo (bare git directories) when set.
# Usage: bench/goss-corpus/run.sh   (prints one line per file, then the share understood)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p phoenix
phoenix="$PWD/target/release/phoenix"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
understood=0 total=0
while IFS=$'\t' read -r repo commit licence file vars inline; do
    [[ -z "$repo" || "$repo" == \#* ]] && continue
    dir="$work/${repo//\//+}@$commit"
    kept="crates/check/tests/goss-corpus/${repo//\//+}"
    [ -d "$kept" ] && dir="$PWD/$kept"
    if [ ! -d "$dir" ]; then
        mkdir -p "$dir"
        git_dir="${PHOENIX_CORPUS_MIRROR:-}/${repo//\//+}/repo"
        if [ -z "${PHOENIX_CORPUS_MIRROR:-}" ]; then
            git clone -q "https://github.com/$repo" "$work/clone" && git_dir="$work/clone/.git"
        fi
        git --git-dir "$git_dir" archive "$commit" | tar -x -C "$dir"
        rm -rf "$work/clone"
    fi
    args=(verify --host "$file" --format silent)
    [ "$vars" != "-" ] && args+=(--vars "$vars")
    [ "$inline" != "-" ] && args+=(--vars-inline "$inline")
    set +e
    (cd "$dir" && timeout 300 "$phoenix" "${args[@]}" > /dev/null 2> "$work/err")
    code=$?
    set -e
    total=$((total + 1))
    case $code in
        0|1) understood=$((understood + 1)); verdict="understood (exit $code)" ;;
        2) verdict="refused: $(head -1 "$work/err")" ;;
        *) verdict="CRASH (exit $code): $(head -1 "$work/err")" ;;
    esac
    printf '%-40s %-40s %s [%s]\n' "$repo" "$file" "$verdict" "$licence"
done < bench/goss-corpus/SOURCES.tsv
echo "understood $understood of $total"
