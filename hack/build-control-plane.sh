#!/usr/bin/env bash
# Builds the binaries of Switchyard's test control plane from Go modules, at the versions
# pinned in hack/versions.env, into a cache keyed by version:
#
#   $SWITCHYARD_CACHE_DIR/tools/kubernetes-<v>/  kube-apiserver kube-controller-manager
#                                                kube-scheduler kubectl kubelet kube-proxy
#   $SWITCHYARD_CACHE_DIR/tools/etcd-<v>/        etcd
#   $SWITCHYARD_CACHE_DIR/tools/kwok-<v>/        kwok
#   $SWITCHYARD_CACHE_DIR/tools/helm-<v>/        helm
#   $SWITCHYARD_CACHE_DIR/tools/coredns-<v>/     coredns (Service DNS on the real test node)
#   $SWITCHYARD_CACHE_DIR/tools/grpcurl-<v>/     grpcurl (a third-party gRPC client for tests)
#   $SWITCHYARD_CACHE_DIR/tools/bin/             links to all of the above (what tests use)
#
# A component whose directory holds a complete stamp is not rebuilt, so a second run is a
# no-op. Needs only Go and the Go module proxy. Usage: hack/build-control-plane.sh [--print-bin-dir]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$repo/hack/versions.env"

cache=${SWITCHYARD_CACHE_DIR:-$HOME/.cache/switchyard}
tools="$cache/tools"
bindir="$tools/bin"

if [[ "${1:-}" == "--print-bin-dir" ]]; then
  echo "$bindir"
  exit 0
fi

export GOTOOLCHAIN="$GO_TOOLCHAIN" CGO_ENABLED=0 GOFLAGS=-mod=mod
# Two cores and 24 GB: building more packages at once only raises peak memory.
export GOMAXPROCS=${GOMAXPROCS:-2}

step=""
fail() {
  echo "build-control-plane: FAILED at step '$step'" >&2
  echo "build-control-plane: $*" >&2
  exit 1
}
trap 'fail "command exited with status $? (see the output above)"' ERR

command -v go >/dev/null || { step="check go"; fail "go is not on PATH; install Go $(<"$repo/hack/tools/kubernetes/go.mod" grep '^go ' | cut -d' ' -f2) or newer"; }

log() { printf '[build-control-plane %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# build NAME VERSION DIR BINARIES... -- COMMAND...: runs COMMAND (which writes BINARIES into
# DIR) unless DIR already has a stamp for exactly this version, then links them into bin/.
build() {
  local name=$1 version=$2 dir=$3
  shift 3
  local bins=()
  while [[ $1 != "--" ]]; do bins+=("$1"); shift; done
  shift
  step="$name $version"
  local stamp="$dir/.complete"
  # The stamp records the version and a digest of the recipe (the build function and the
  # wrapper module it uses), so changing either rebuilds and nothing else does.
  local key
  key="$version $( { declare -f "$1"; cat "$repo/hack/tools/$name/go.sum" 2>/dev/null || true; } | sha256sum | cut -c1-16)"
  if [[ -f $stamp && "$(<"$stamp")" == "$key" ]]; then
    log "$name $version: cached in $dir"
  else
    log "$name $version: building (this takes a while on a cold cache)..."
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp"
    local start=$SECONDS
    BUILD_OUT="$dir.tmp" "$@"
    for b in "${bins[@]}"; do
      [[ -s "$dir.tmp/$b" ]] || fail "$b was not produced in $dir.tmp"
    done
    echo "$key" >"$dir.tmp/.complete"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
    log "$name $version: built in $((SECONDS - start))s"
  fi
  mkdir -p "$bindir"
  for b in "${bins[@]}"; do ln -sfn "$dir/$b" "$bindir/$b"; done
}

check_pin() {
  local modfile=$1 module=$2 version=$3
  grep -qE "^require $module $version\$|^\s+$module $version\$" "$modfile" ||
    { step="check pins"; fail "$modfile does not require $module $version (hack/versions.env); run hack/gen-wrapper-modules.sh"; }
}
check_pin "$repo/hack/tools/kubernetes/go.mod" k8s.io/kubernetes "$KUBERNETES_VERSION"
check_pin "$repo/hack/tools/etcd/go.mod" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"

k8s_build() {
  local minor=${KUBERNETES_VERSION#v1.}
  minor=${minor%%.*}
  local pkg=k8s.io/component-base/version
  local ldflags="-s -w -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  (cd "$repo/hack/tools/kubernetes" && go build -trimpath -tags selinux,notest \
    -ldflags "$ldflags" -o "$BUILD_OUT/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy)
}

etcd_build() {
  (cd "$repo/hack/tools/etcd" && go build -trimpath -ldflags "-s -w" -o "$BUILD_OUT/etcd" go.etcd.io/etcd/server/v3)
}

kwok_build() {
  # kwok's module has no replace directives, so `go install` works as it is.
  GOBIN="$BUILD_OUT" GOFLAGS= go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  # The kwok controller alone has no stages (what makes fake nodes Ready and pods Running);
  # kwokctl embeds its defaults. Take the same published stage files from the module.
  local src
  src=$(GOFLAGS= go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -d $src/kustomize/stage ]] || fail "kwok module source not found (go mod download gave '$src')"
  local f first=1
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [[ $first == 1 ]] || echo "---"
    first=0
    cat "$src/kustomize/stage/$f"
  done >"$BUILD_OUT/kwok-stages.yaml"
}

helm_build() {
  local pkg=helm.sh/helm/v4/internal/version
  GOBIN="$BUILD_OUT" GOFLAGS= go install -trimpath -ldflags "-s -w -X $pkg.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
}

coredns_build() {
  # CoreDNS's module has no replace directives; its default plugin set (kubernetes, forward,
  # cache, ...) is compiled in, which is what the real-node tier needs.
  GOBIN="$BUILD_OUT" GOFLAGS= go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
}

grpcurl_build() {
  GOBIN="$BUILD_OUT" GOFLAGS= go install -trimpath -ldflags "-s -w -X main.version=$GRPCURL_VERSION" \
    "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
}

total_start=$SECONDS
build etcd "$ETCD_VERSION" "$tools/etcd-$ETCD_VERSION" etcd -- etcd_build
build kwok "$KWOK_VERSION" "$tools/kwok-$KWOK_VERSION" kwok kwok-stages.yaml -- kwok_build
build helm "$HELM_VERSION" "$tools/helm-$HELM_VERSION" helm -- helm_build
build grpcurl "$GRPCURL_VERSION" "$tools/grpcurl-$GRPCURL_VERSION" grpcurl -- grpcurl_build
build coredns "$COREDNS_VERSION" "$tools/coredns-$COREDNS_VERSION" coredns -- coredns_build
build kubernetes "$KUBERNETES_VERSION" "$tools/kubernetes-$KUBERNETES_VERSION" \
  kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy -- k8s_build
step="verify"
"$bindir/kube-apiserver" --version | grep -qF "$KUBERNETES_VERSION" ||
  fail "kube-apiserver --version does not report $KUBERNETES_VERSION"
log "all control-plane binaries ready in $bindir ($((SECONDS - total_start))s)"
