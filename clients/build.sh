#!/usr/bin/env bash
# Build the example clients, as tests/test_clients.py runs them; .ci/run calls it before the
# tests. Each step is skipped when its output is up to date, and a language whose toolchain is
# missing is skipped with a note (its tests then skip too). Exits non-zero if a build failed.
#
#   clients/build.sh          # go, node and java
#   clients/build.sh go node  # some of them
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto="$here/../proto"

# has LANGUAGE TOOL...: whether every TOOL is on PATH; says which one is not.
has() {
  local language="$1" tool
  shift
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "clients/build.sh: $tool not found, skipping the $language client" >&2
      return 1
    fi
  done
}

# A file newer than $1 (or $1 missing) among the rest.
stale() {
  local target="$1"
  shift
  [ ! -e "$target" ] || [ -n "$(find "$@" -newer "$target" -print -quit)" ]
}

build_go() {
  has go go || return 0
  cd "$here/go"
  go build -o .bin/client .  # incremental: Go's build cache decides
  ./generate.sh --plugins    # the pinned protoc plugins, for the drift test
}

build_node() {
  has node node npm || return 0
  cd "$here/node"
  # npm ci starts from scratch, so only when the lock file changed since the last one.
  if ! cmp -s package-lock.json node_modules/.installed-package-lock.json; then
    npm ci --no-audit --no-fund --loglevel=error
    cp package-lock.json node_modules/.installed-package-lock.json
  fi
}

build_java() {
  has java java mvn || return 0
  cd "$here/java"
  if stale target/mlx-serving-client-example.jar pom.xml src "$proto"; then
    mvn -B -q -Dstyle.color=never package -DskipTests
  fi
}

languages=("$@")
[ $# -gt 0 ] || languages=(go node java)
failed=()
for language in "${languages[@]}"; do
  start=$SECONDS
  set +e
  (set -e; "build_$language")  # a failure ends this language's build, not the others'
  status=$?
  set -e
  if [ "$status" -eq 0 ]; then
    echo "clients/build.sh: $language done in $((SECONDS - start)) s"
  else
    echo "clients/build.sh: $language FAILED (exit $status)" >&2
    failed+=("$language")
  fi
done
[ ${#failed[@]} -eq 0 ]
