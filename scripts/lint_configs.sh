#!/usr/bin/env bash
# Lints the delivery configs like code: workflows, compose files, Drone, Dockerfile, every
# YAML file, the shell scripts and the documentation site. Run it with the lint tools:
#
#   python3 -m uv run --locked --group lint scripts/lint_configs.sh
#
# Exits non-zero at the first check that fails. actionlint comes from ../shared/tools (beside
# the checkout, as in this project's CI) or PATH, and is skipped with a message where neither
# has it; the GitHub workflow ci.yml runs its own actionlint.
set -euo pipefail
cd "$(dirname "$0")/.."

section() { printf '== %s\n' "$*"; }

section "actionlint (GitHub workflows)"
if [ -x ../shared/tools/actionlint.sh ]; then
    ../shared/tools/actionlint.sh .github/workflows/*.yml
elif command -v actionlint >/dev/null 2>&1; then
    actionlint
else
    echo "skipped: neither ../shared/tools/actionlint.sh nor actionlint on PATH"
fi

section "check-jsonschema (workflows, compose, Drone)"
check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
compose_files=(docker-compose.prod.yml)
# The development stack's compose file, where this checkout has it.
[ -f docker-compose.yml ] && compose_files+=(docker-compose.yml)
check-jsonschema --builtin-schema vendor.compose-spec "${compose_files[@]}"
check-jsonschema --builtin-schema vendor.drone-ci .drone.yml

section "hadolint (Dockerfile)"
hadolint Dockerfile

section "shellcheck (scripts, Git hooks)"
shellcheck scripts/*.sh .githooks/pre-commit deploy/slurm/*.sbatch

section "yamllint (every YAML file, .yamllint)"
yamllint --strict .

section "mkdocs build --strict (documentation site)"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
# No --quiet: it hides warnings from --strict too. NO_MKDOCS_2_WARNING: Material's end-of-life
# banner, printed on every build, is not a finding.
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$site"

echo "configs: all checks passed"
