#!/usr/bin/env bash
# Regenerate the Go code under gen/ from the repository's proto/ files.
#
#   ./generate.sh              # rewrite gen/ in place
#   ./generate.sh OUT_DIR      # write OUT_DIR/gen/... instead (the drift test compares the two)
#   ./generate.sh --plugins    # only install the pinned protoc plugins (CI's setup step)
#
# protoc is the one the repository's Python tests pin (grpcio-tools in the `test` extra), so the
# generated headers match what is committed; set PROTOC to use another. The plugins are
# installed at the versions below into .bin/ (ignored by git).
set -euo pipefail

PROTOC_GEN_GO_VERSION=v1.36.12     # google.golang.org/protobuf: same as go.mod
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2  # google.golang.org/grpc/cmd/protoc-gen-go-grpc

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
proto="$root/proto"
vendor="$proto/vendor/protovalidate"  # buf/validate/validate.proto
bin="$here/.bin"

if [ -z "${PROTOC:-}" ]; then
  python="$root/.venv/bin/python"
  [ -x "$python" ] || python=python3
  PROTOC="$python -m grpc_tools.protoc"
fi

install() {  # install PACKAGE@VERSION into .bin unless that version is there already
  local name="${1##*/}" stamp="$bin/.${1##*/}@$2"
  if [ ! -x "$bin/$name" ] || [ ! -e "$stamp" ]; then
    GOBIN="$bin" go install "$1@$2"
    rm -f "$bin/.$name@"*
    touch "$stamp"
  fi
}
install google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
install google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION"
[ "${1:-}" = --plugins ] && exit 0
out="$(mkdir -p "${1:-$here}" && cd "${1:-$here}" && pwd)"

# Our files only: validate.proto's Go package is the buf.build/gen/go module in go.mod.
protos=()
while IFS= read -r file; do protos+=("$file"); done \
  < <(cd "$proto" && find mlx_serving -name '*.proto' | LC_ALL=C sort)

rm -rf "$out/gen"
$PROTOC -I"$proto" -I"$vendor" \
  --plugin=protoc-gen-go="$bin/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="$bin/protoc-gen-go-grpc" \
  --go_out="$out" --go_opt=module=github.com/mlx-serving/mlx-serving/clients/go \
  --go-grpc_out="$out" --go-grpc_opt=module=github.com/mlx-serving/mlx-serving/clients/go \
  "${protos[@]}"
echo "generated $(cd "$out" && find gen -name '*.go' | wc -l) files under $out/gen"
