#!/usr/bin/env bash
# Create (or reuse) the project's environments; name one or more kinds: scripts/setup_env.sh KIND [KIND...]
#
#   fresh       .venv            Python 3.11 + requirements.txt
#   container   .venv-container  Python 3.10 + the NeMo 24.07 container's library versions and its NeMo
#                                (2.0.0rc1), then the container install line, as a user runs it in the container
#   serve       .venv-serve      Python 3.11 + requirements-serve.txt: `transformers serve`, the local
#                                OpenAI-compatible server that the export smoke test (and notebook 2) runs against
#
# The container environment is built in four steps:
#   1. constraints/nemo-24.07-image.txt: what the container ships (torch 2.3, transformers 4.40, ..., and what
#      NeMo's NLP collection needs to import);
#   2. NeMo itself, $NEMO_TOOLKIT with --no-deps (the container's NeMo line; its own requirement list would
#      pull in newer torch and NumPy): the tests then run NeMo's own code on the project's commands and files;
#   3. the users' line `pip install -r requirements-container.txt -c constraints/nemo-24.07.txt`, run by
#      scripts/check_container_install.py, which fails if it would replace or did replace any container package
#      (NeMo's included);
#   4. `pip install --no-deps -e .` (the project itself).
# A venv whose stamp matches the inputs (Python, requirement files, NeMo's version) is reused; FORCE=1 rebuilds
# it. pip's download cache (~/.cache/pip) makes a rebuild with unchanged versions take about a minute.
# Interpreters: $PYTHON311 / $PYTHON310, else python3.11 / python3.10 found on PATH or under ~/.pyenv.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIP_VERSION="pip==24.0"
NEMO_TOOLKIT="nemo_toolkit==2.0.0rc1"

usage() {
    echo "usage: $0 fresh|container|serve [fresh|container|serve ...]" >&2
    exit 2
}

# Print the path of a python interpreter of the given minor version ("3.10"), or fail.
find_python() {
    local minor="$1" override="$2" candidate
    if [[ -n "$override" ]]; then
        echo "$override"
        return
    fi
    for candidate in "python$minor" "$HOME"/.pyenv/versions/"$minor".*/bin/"python$minor"; do
        if "$candidate" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$minor'.split('.')))" \
            >/dev/null 2>&1; then
            command -v "$candidate" || echo "$candidate"
            return
        fi
    done
    echo "error: no Python $minor found; set PYTHON${minor/./} to its path" >&2
    exit 2
}

# Hash of everything that decides the venv's contents.
input_stamp() {
    local python="$1"
    shift
    { "$python" --version; echo "$PIP_VERSION"; cat "$@"; } | sha256sum | cut -d' ' -f1
}

# Exit 0 when VENV was built from the same inputs and still imports MODULE (default: the project).
venv_is_current() {
    local venv="$1" stamp="$2" module="${3:-dapt}"
    [[ "${FORCE:-0}" != 1 && -f "$venv/.dapt-env-stamp" && "$(cat "$venv/.dapt-env-stamp")" == "$stamp" ]] &&
        "$venv/bin/python" -c "import $module" >/dev/null 2>&1
}

new_venv() {
    local python="$1" venv="$2"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$PIP_VERSION"
}

# (Re)install the project editable from THIS checkout (a reused venv may point at another clone).
install_project() {
    "$1/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$REPO"
}

setup_fresh() {
    local venv="$1" python stamp
    python="$(find_python 3.11 "${PYTHON311:-}")"
    stamp="$(input_stamp "$python" "$REPO/requirements.txt" "$REPO/pyproject.toml")"
    if venv_is_current "$venv" "$stamp"; then
        echo "fresh environment $venv: packages up to date"
    else
        new_venv "$python" "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$REPO/requirements.txt"
        echo "$stamp" >"$venv/.dapt-env-stamp"
    fi
    install_project "$venv"
}

setup_container() {
    local venv="$1" python stamp
    python="$(find_python 3.10 "${PYTHON310:-}")"
    stamp="$( (echo "$NEMO_TOOLKIT"; input_stamp "$python" "$REPO/constraints/nemo-24.07-image.txt" \
        "$REPO/constraints/nemo-24.07.txt" "$REPO/requirements-container.txt" "$REPO/pyproject.toml") |
        sha256sum | cut -d' ' -f1)"
    if venv_is_current "$venv" "$stamp"; then
        echo "container environment $venv: packages up to date"
    else
        new_venv "$python" "$venv"
        echo "step 1/4: the container's own packages (constraints/nemo-24.07-image.txt) [$((SECONDS - start)) s]"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$REPO/constraints/nemo-24.07-image.txt"
        echo "step 2/4: the container's NeMo, $NEMO_TOOLKIT --no-deps [$((SECONDS - start)) s]"
        "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "$NEMO_TOOLKIT"
        echo "step 3/4: the users' container install line, checked [$((SECONDS - start)) s]"
        "$venv/bin/python" "$REPO/scripts/check_container_install.py" --venv "$venv" --install
        echo "$stamp" >"$venv/.dapt-env-stamp"
    fi
    echo "step 4/4: the project [$((SECONDS - start)) s]"
    install_project "$venv"
}

# The server has no use for the project: only transformers[serving] and torch.
setup_serve() {
    local venv="$1" python stamp
    python="$(find_python 3.11 "${PYTHON311:-}")"
    stamp="$(input_stamp "$python" "$REPO/requirements-serve.txt")"
    if venv_is_current "$venv" "$stamp" transformers.cli.serve; then
        echo "serve environment $venv: packages up to date"
    else
        new_venv "$python" "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$REPO/requirements-serve.txt"
        echo "$stamp" >"$venv/.dapt-env-stamp"
    fi
}

setup_one() {
    local kind="$1" venv start=$SECONDS
    case "$kind" in
        fresh) venv="$REPO/.venv"; setup_fresh "$venv" ;;
        container) venv="$REPO/.venv-container"; setup_container "$venv" ;;
        serve) venv="$REPO/.venv-serve"; setup_serve "$venv" ;;
        *) usage ;;
    esac
    echo "$kind environment ready: $venv ($("$venv/bin/python" --version), $((SECONDS - start)) s," \
        "$(du -sh "$venv" | cut -f1))"
}

main() {
    [[ $# -ge 1 ]] || usage
    local kind
    for kind in "$@"; do
        case "$kind" in fresh|container|serve) ;; *) usage ;; esac
    done
    for kind in "$@"; do
        setup_one "$kind"
    done
}

main "$@"
