#!/usr/bin/env bash
# The newcomer path, automated: a fresh virtual environment, then the README's two
# quick-start commands (the first ```bash block of README.md) exactly as written.
# .ci/run calls this, so an install step missing from the README fails CI first.
#
#   scripts/newcomer.sh            # venv in .venv-newcomer (recreated each time)
#   MBQ_VENV=/tmp/v scripts/newcomer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MBQ_VENV:-.venv-newcomer}"

mapfile -t cmds < <(awk '/^```bash$/{inb=1; next} inb && /^```$/{exit} inb && NF && !/^#/' README.md)
if [ "${#cmds[@]}" -ne 2 ]; then
    echo "README.md must open with exactly two commands in its first \`\`\`bash block, found ${#cmds[@]}" >&2
    exit 1
fi

echo "::: fresh virtual environment in $venv"
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install -q --upgrade pip

for c in "${cmds[@]}"; do
    echo "::: $c"
    start=$SECONDS
    bash -euo pipefail -c "$c"
    echo "::: finished in $((SECONDS - start)) s: $c"
done
