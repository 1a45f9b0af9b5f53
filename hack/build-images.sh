#!/usr/bin/env bash
# Builds Switchyard's container images on this machine, without a Docker engine, a
# registry or the internet (only Debian's package mirror, through the host's apt sources),
# as OCI archives that `ctr -n k8s.io images import` loads into the real test node:
#
#   $SWITCHYARD_CACHE_DIR/images/base/base.tar               glibc base (mmdebstrap), + uid 65532
#   $SWITCHYARD_CACHE_DIR/images/switchyard-worker/*.oci.tar   switchyard-worker + switchyard CLI
#   $SWITCHYARD_CACHE_DIR/images/switchyard-operator/*.oci.tar switchyard-operator
#   $SWITCHYARD_CACHE_DIR/images/pause/*.oci.tar               pod sandbox image (k8s pause.c)
#   $SWITCHYARD_CACHE_DIR/images/images.env                    WORKER_IMAGE=... WORKER_ARCHIVE=... etc.
#
# The images match images/worker.Containerfile and images/operator.Containerfile (what users
# build): same binaries, user 65532, entrypoint, labels, layout; built from
# images/local.Containerfile with release binaries from target/release and a base tarball
# in place of distroless/cc. Each output holds a stamp of its content key (binary digests,
# Containerfile, base key, recipe), so a second run with nothing changed is a no-op.
#
# Needs (Debian packages): buildah, mmdebstrap (hack/install-node-runtime.sh installs them),
# gcc and libc6-dev (static pause), Go (to locate k8s.io/kubernetes), cargo.
#
# Usage: hack/build-images.sh [--no-cargo] [--refresh-base] [--print-dir]
#   --no-cargo      use target/release as it is instead of running cargo build --release
#   --refresh-base  rebuild the base tarball (picks up Debian security updates)
#   --print-dir     print the output directory and exit
set -Eeuo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$repo/hack/versions.env"

cache=${SWITCHYARD_CACHE_DIR:-$HOME/.cache/switchyard}
out="$cache/images"

run_cargo=1
refresh_base=0
for arg in "$@"; do
  case $arg in
    --print-dir) echo "$out"; exit 0 ;;
    --no-cargo) run_cargo=0 ;;
    --refresh-base) refresh_base=1 ;;
    -h | --help) sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

step="start"
fail() {
  echo "build-images: FAILED at step '$step'" >&2
  echo "build-images: $*" >&2
  exit 1
}
trap 'fail "command exited with status $? (see the output above)"' ERR

log() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# --- what the machine needs -------------------------------------------------------------
step="check tools"
missing=()
need() { command -v "$1" >/dev/null || missing+=("$2"); }
need buildah buildah
need mmdebstrap mmdebstrap
need dpkg-deb dpkg
need gcc gcc
need readelf binutils
need flock util-linux
[[ -e /usr/lib/x86_64-linux-gnu/libc.a || -e /usr/lib/$(gcc -dumpmachine 2>/dev/null)/libc.a ]] ||
  missing+=("libc6-dev")
if [[ ${#missing[@]} -gt 0 ]]; then
  fail "missing Debian packages: ${missing[*]}. hack/install-node-runtime.sh (as root) installs" \
    "buildah and mmdebstrap with the rest of the node runtime; or: apt-get install -y ${missing[*]}"
fi
[[ $run_cargo == 0 ]] || command -v cargo >/dev/null || fail "cargo is not on PATH (or pass --no-cargo)"

# --- versions ---------------------------------------------------------------------------
step="read versions"
version=$(awk '/^\[/ { s = ($0 == "[workspace.package]") } s && /^version *=/ { gsub(/.*= *"|".*/, ""); print; exit }' \
  "$repo/Cargo.toml")
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]] || fail "no [workspace.package] version in Cargo.toml (got '$version')"
for f in worker operator; do
  grep -qxF "ARG VERSION=$version" "$repo/images/$f.Containerfile" ||
    fail "images/$f.Containerfile's ARG VERSION default differs from Cargo.toml's version $version; update it"
done
registry=ghcr.io/switchyard-dev
worker_ref="$registry/switchyard-worker:$version"
operator_ref="$registry/switchyard-operator:$version"
pause_ref="localhost/switchyard/pause:$KUBERNETES_VERSION"
[[ $out != *[[:space:]]* ]] || fail "the cache path '$out' contains whitespace"

mkdir -p "$out"
exec 9>"$out/.lock"
flock -n 9 || { log "another build-images run holds $out/.lock; waiting..."; flock 9; }

total_start=$SECONDS

# --- release binaries -------------------------------------------------------------------
step="cargo build --release"
if [[ $run_cargo == 1 ]]; then
  log "cargo build --release (a cold build takes 10-25 minutes on 2 cores)..."
  start=$SECONDS
  (cd "$repo" && nice -n 10 cargo build --release --locked -p switchyard-worker -p switchyard-cli -p switchyard-operator --bins)
  log "cargo build --release: done in $((SECONDS - start))s"
fi
target=${CARGO_TARGET_DIR:-$repo/target}
case $target in /*) ;; *) target="$repo/$target" ;; esac
release="$target/release"
for b in switchyard-worker switchyard switchyard-operator; do
  [[ -x "$release/$b" ]] || fail "$release/$b does not exist; run without --no-cargo"
done

# --- buildah in its own storage under the cache ------------------------------------------
broot="$cache/buildah"
policy="$broot/policy.json"
bah() {
  buildah --storage-driver vfs --root "$broot/root" --runroot "$broot/run" "$@"
}
swept=0
# Nothing in this storage outlives a run: working containers and images of a killed run
# are removed before the first build (the lock makes this store ours alone).
sweep_storage() {
  bah rm --all >/dev/null
  bah rmi --all --force >/dev/null 2>&1 || true
}
prepare_buildah() {
  [[ $swept == 0 ]] || return 0
  mkdir -p "$broot/root" "$broot/run"
  # Only local files and FROM scratch are ever read; no host policy.json is required.
  printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$policy"
  sweep_storage
  swept=1
}

# stamped DIR KEY: whether DIR holds a complete output for exactly KEY.
stamped() { [[ -f "$1/.complete" && "$(<"$1/.complete")" == "$2" ]]; }
digest() { sha256sum | cut -c1-20; }

# --- glibc base tarball ------------------------------------------------------------------
base_packages=libc6,libgcc-s1,gcc-12-base,ca-certificates,tzdata
base_suite=bookworm
sources=${SWITCHYARD_DEBIAN_SOURCES:-}
if [[ -z $sources ]]; then
  for s in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    [[ -s $s ]] && { sources=$s; break; }
  done
fi

# Runs inside mmdebstrap as --extract-hook (debs still in the apt cache): records the
# packages like distroless does, in /var/lib/dpkg/status.d, for image scanners.
base_extract_hook='set -e
mkdir -p "$1/var/lib/dpkg/status.d"
for deb in "$1"/var/cache/apt/archives/*.deb; do
  pkg=$(dpkg-deb -f "$deb" Package)
  dpkg-deb -f "$deb" >"$1/var/lib/dpkg/status.d/$pkg"
  dpkg-deb -W --showformat="\${Package}=\${Version}\n" "$deb" >>"$BASE_PACKAGES_OUT"
done'
# The extract variant runs no --customize-hook, so the rest is done on the directory
# mmdebstrap leaves: what distroless/cc:nonroot has (users, /tmp 1777, CA bundle,
# nsswitch, os-release) and none of apt's state or host files (resolv.conf, hostname).
base_customize() {
  local r=$1
  rm -rf "$r/etc/apt" "$r/var/cache/apt" "$r/var/lib/apt" "$r/var/log/apt" "$r/var/cache/debconf" \
    "$r/etc/resolv.conf" "$r/etc/hostname" "$r/etc/hosts" "$r/etc/fstab" "$r/usr/share/man" \
    "$r/usr/share/info" "$r/usr/share/lintian"
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$r/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'tty:x:5:' 'staff:x:50:' 'nonroot:x:65532:' >"$r/etc/group"
  printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' 'networks: files' >"$r/etc/nsswitch.conf"
  printf '%s\n' 'PRETTY_NAME="Switchyard base (Debian GNU/Linux 12 glibc)"' 'NAME="Debian GNU/Linux"' \
    'ID=debian' 'VERSION_ID="12"' 'VERSION_CODENAME=bookworm' >"$r/etc/os-release"
  # No device nodes in an image: the runtime mounts /dev (and /proc, /sys).
  rm -rf "$r/dev"
  mkdir -p "$r/dev" "$r/proc" "$r/sys" "$r/tmp" "$r/root" "$r/home/nonroot" "$r/etc/ssl/certs"
  chmod 1777 "$r/tmp"
  chmod 700 "$r/root" "$r/home/nonroot"
  chown 65532:65532 "$r/home/nonroot"
  # What update-ca-certificates (not run by the extract variant) makes.
  LC_ALL=C cat "$r"/usr/share/ca-certificates/mozilla/*.crt >"$r/etc/ssl/certs/ca-certificates.crt"
  ldconfig -r "$r"
}

step="base tarball"
[[ -n $sources && -f $sources ]] || fail "no apt sources file found (/etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list); set SWITCHYARD_DEBIAN_SOURCES to a sources file"
base_dir="$out/base"
base_key="$base_suite $base_packages $( { cat "$sources"; echo "$base_extract_hook"; declare -f base_customize; } | digest)"
if [[ $refresh_base == 0 ]] && stamped "$base_dir" "$base_key"; then
  log "base: cached ($(du -m "$base_dir/base.tar" | cut -f1) MB, $(wc -l <"$base_dir/packages.txt") packages)"
else
  log "base: mmdebstrap --variant=extract $base_suite ($base_packages) from $sources..."
  start=$SECONDS
  rm -rf "$base_dir.tmp"
  mkdir -p "$base_dir.tmp"
  # mmdebstrap reads a mirror from stdin if given none: the host's sources file is always
  # passed explicitly.
  BASE_PACKAGES_OUT="$base_dir.tmp/packages.txt" \
    mmdebstrap --quiet --variant=extract --include="$base_packages" --extract-hook="$base_extract_hook" \
    "$base_suite" "$base_dir.tmp/root" "$sources" </dev/null
  base_customize "$base_dir.tmp/root"
  # A reproducible tarball: sorted, fixed mtimes, numeric owners.
  tar --sort=name --mtime=@0 --numeric-owner --format=gnu -C "$base_dir.tmp/root" -cf "$base_dir.tmp/base.tar" .
  rm -rf "$base_dir.tmp/root"
  tar -tf "$base_dir.tmp/base.tar" | sed -n 's|^\./||; /\.so[.0-9]*$/p' | sort >"$base_dir.tmp/files-so.txt"
  grep -qx 'lib/x86_64-linux-gnu/libc.so.6' "$base_dir.tmp/files-so.txt" || fail "base.tar has no libc.so.6"
  echo "$base_key" >"$base_dir.tmp/.complete"
  rm -rf "$base_dir"
  mv "$base_dir.tmp" "$base_dir"
  log "base: built in $((SECONDS - start))s ($(du -m "$base_dir/base.tar" | cut -f1) MB: $(paste -sd, "$base_dir/packages.txt"))"
fi

# --- Switchyard images -------------------------------------------------------------------
# build_image NAME REF BINARIES...: the image NAME from images/local.Containerfile (target
# NAME) with BINARIES from target/release, written to $out/NAME/NAME-<version>.oci.tar.
build_image() {
  local name=$1 ref=$2
  shift 2
  step="image $name"
  local dir="$out/$name" archive="$out/$name/$name-$version.oci.tar"
  local b key
  # Every shared library the binaries need must be in the base (libstdc++ is not).
  for b in "$@"; do
    local lib
    for lib in $(readelf -d "$release/$b" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      grep -q "/$lib\$" "$base_dir/files-so.txt" ||
        fail "$b needs $lib, which the base image lacks; add its package to base_packages"
    done
  done
  key="$ref $( { sha256sum "${@/#/$release/}" | cut -d' ' -f1; cat "$repo/images/local.Containerfile";
    echo "$base_key"; declare -f build_image; } | digest)"
  if stamped "$dir" "$key"; then
    log "$name: cached ($ref, $(du -m "$archive" | cut -f1) MB)"
    archives[$name]=$archive
    return 0
  fi
  log "$name: building $ref..."
  local start=$SECONDS
  prepare_buildah
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp/ctx/bin/$name"
  ln "$base_dir/base.tar" "$dir.tmp/ctx/base.tar" 2>/dev/null || cp "$base_dir/base.tar" "$dir.tmp/ctx/base.tar"
  for b in "$@"; do cp "$release/$b" "$dir.tmp/ctx/bin/$name/$b"; done
  bah bud --quiet --isolation chroot --signature-policy "$policy" --timestamp 0 \
    --target "$name" --build-arg VERSION="$version" --build-arg BINARIES="$name" \
    -f "$repo/images/local.Containerfile" -t "$ref" "$dir.tmp/ctx" >/dev/null
  bah push --quiet --signature-policy "$policy" "$ref" "oci-archive:$dir.tmp/${archive##*/}:$ref"
  sweep_storage
  rm -rf "$dir.tmp/ctx"
  echo "$key" >"$dir.tmp/.complete"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  log "$name: built in $((SECONDS - start))s ($(du -m "$archive" | cut -f1) MB)"
  archives[$name]=$archive
}

declare -A archives
build_image switchyard-worker "$worker_ref" switchyard-worker switchyard
build_image switchyard-operator "$operator_ref" switchyard-operator

# --- pause image -------------------------------------------------------------------------
# Keyed by the Kubernetes version (the module's content is fixed by its checksum), so a
# cached run does not need Go at all.
pause_recipe() {
  local src
  command -v go >/dev/null || fail "go is not on PATH (needed to find k8s.io/kubernetes's pause.c)"
  src=$(cd / && GOFLAGS= GOTOOLCHAIN=local go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -f $src/build/pause/linux/pause.c ]] ||
    fail "k8s.io/kubernetes@$KUBERNETES_VERSION source not found (go mod download gave '$src')"
  gcc -Os -Wall -Werror -static -DVERSION="$KUBERNETES_VERSION" -o "$1/pause" "$src/build/pause/linux/pause.c"
  strip "$1/pause"
}
step="image pause"
pause_dir="$out/pause"
pause_archive="$pause_dir/pause-$KUBERNETES_VERSION.oci.tar"
pause_key="$pause_ref $( { declare -f pause_recipe; cat "$repo/images/pause.Containerfile"; } | digest)"
if stamped "$pause_dir" "$pause_key"; then
  log "pause: cached ($pause_ref)"
else
  log "pause: building $pause_ref from k8s.io/kubernetes@$KUBERNETES_VERSION build/pause/linux/pause.c..."
  start=$SECONDS
  prepare_buildah
  rm -rf "$pause_dir.tmp"
  mkdir -p "$pause_dir.tmp/ctx"
  pause_recipe "$pause_dir.tmp/ctx"
  bah bud --quiet --isolation chroot --signature-policy "$policy" --timestamp 0 \
    --build-arg VERSION="$KUBERNETES_VERSION" \
    -f "$repo/images/pause.Containerfile" -t "$pause_ref" "$pause_dir.tmp/ctx" >/dev/null
  bah push --quiet --signature-policy "$policy" "$pause_ref" \
    "oci-archive:$pause_dir.tmp/${pause_archive##*/}:$pause_ref"
  sweep_storage
  rm -rf "$pause_dir.tmp/ctx"
  echo "$pause_key" >"$pause_dir.tmp/.complete"
  rm -rf "$pause_dir"
  mv "$pause_dir.tmp" "$pause_dir"
  log "pause: built in $((SECONDS - start))s"
fi

# --- images.env ---------------------------------------------------------------------------
step="images.env"
{
  echo "# Written by hack/build-images.sh; import with: ctr -n k8s.io images import <ARCHIVE>"
  echo "WORKER_IMAGE=$worker_ref"
  echo "OPERATOR_IMAGE=$operator_ref"
  echo "PAUSE_IMAGE=$pause_ref"
  echo "WORKER_ARCHIVE=${archives[switchyard-worker]}"
  echo "OPERATOR_ARCHIVE=${archives[switchyard-operator]}"
  echo "PAUSE_ARCHIVE=$pause_archive"
} >"$out/images.env.tmp"
if cmp -s "$out/images.env.tmp" "$out/images.env"; then
  rm "$out/images.env.tmp"
else
  mv "$out/images.env.tmp" "$out/images.env"
fi
log "images ready in $out ($((SECONDS - total_start))s); see $out/images.env"
