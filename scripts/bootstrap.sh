# Shared by scripts/test and scripts/serve: a virtualenv in .venv with this project installed.
apt_install() {
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "note: could not install $* (not root or no apt-get)" >&2
    return 1
  fi
}

# Install the Debian packages whose command of the same name is missing.
ensure_commands() {
  local missing=()
  for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd"); done
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}" || true
}

# The project is installed editable, so code changes need no reinstall; pyproject.toml changes (dependencies, console
# scripts) do. A stamp of its hash per install spec skips pip when nothing changed (a restart in ~1 s, not ~13 s).
# The stamp alone is not enough: a later `pip install .` (the README's install command, run with .venv active)
# replaces the editable install with a copy, so the install must also still be this checkout's editable one.
editable_here() {
  local f
  for f in .venv/lib/python*/site-packages/d2v-*.dist-info/direct_url.json; do
    [ -f "$f" ] && grep -q '"editable": *true' "$f" || continue
    grep -q -e "\"file://$PWD\"" -e "\"file://$(pwd -P)\"" "$f" && return 0  # the path as given, or resolved
  done
  return 1
}

ensure_venv() {
  local spec=$1
  local stamp=".venv/.d2v-installed-${spec//[^a-z]/_}"
  local want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    if editable_here; then
      return 0
    fi
    echo "note: .venv's d2v is no longer the editable install of $PWD (a later 'pip install .'?): reinstalling" >&2
  fi
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv 2>/dev/null || { rm -rf .venv; apt_install python3-venv; python3 -m venv .venv; }
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  # onnxruntime-gpu (what older versions of pyproject.toml asked for on Linux) and onnxruntime ship the same module:
  # remove both, and the install below brings back the one pyproject.toml names.
  if .venv/bin/python -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -q -y onnxruntime-gpu onnxruntime
  fi
  .venv/bin/python -m pip install -q -e "$spec"
  echo "$want" > "$stamp"
}
