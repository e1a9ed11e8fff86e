#!/usr/bin/env bash
# Shared by the launch scripts (sourced, not run): printing commands and failing with the script's name.
set -euo pipefail

# print a command so that it can be pasted into a shell (plain words as they are, the rest single-quoted)
show() {
    local out="" arg sq="'" esc="'\\''"
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
            out+="$arg "
        else
            out+="'${arg//"$sq"/"$esc"}' "
        fi
    done
    printf '%s\n' "${out% }"
}

# one line naming the script, then exit 2
die() { echo "${LAUNCH_SCRIPT:-launch}: $*" >&2; exit 2; }
