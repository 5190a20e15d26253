#!/usr/bin/env bash
# Prepare podman for the `container` test tier and print the local base image's name.
#
# Why: the tier builds the real Dockerfile and runs the image, on machines (CI, this one) where no
# registry can be pulled from and crun cannot set rlimits. So:
#   1. podman, runc and debootstrap come from Debian (apt-get, only when missing);
#   2. podman runs with `--runtime runc` and a containers.conf holding `default_ulimits = []`
#      (written to the cache folder; the tests point CONTAINERS_CONF at it);
#   3. the base image (Debian bookworm + python3 + python3-venv, what the official slim Python
#      image gives the Dockerfile) is made once with `debootstrap --variant=minbase`, kept as a
#      tarball keyed by the recipe below, and `podman import`ed only when `podman image exists`
#      says it is not there yet.
#
# Idempotent: a second run with everything in place takes well under a second.
# Output (stdout, last line): the base image reference, for `--build-arg BASE=...`.
#
# Environment:
#   CONTAINER_CACHE  cache folder (default ${XDG_CACHE_HOME:-~/.cache}/inference-server/containers)
#   DEBIAN_MIRROR    debootstrap's mirror (default http://deb.debian.org/debian)
set -euo pipefail

SUITE="bookworm"
PACKAGES="python3,python3-venv,ca-certificates"
RECIPE_VERSION="1"   # bump when the recipe changes in a way the variables above do not show

cache="${CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-server/containers}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
key="$(printf '%s|%s|%s|minbase' "$RECIPE_VERSION" "$SUITE" "$PACKAGES" | cksum | cut -d' ' -f1)"
image="localhost/inference-server-base:${SUITE}-${key}"
tarball="$cache/base-${SUITE}-${key}.tar"
conf="$cache/containers.conf"

log() { printf 'container-base: %s\n' "$*" >&2; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]} (apt-get)"
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman runc debootstrap >&2
fi

mkdir -p "$cache"
if [ ! -f "$conf" ]; then
  printf '[containers]\n# crun/runc cannot set rlimits on this kind of machine\ndefault_ulimits = []\n' \
    >"$conf"
fi
export CONTAINERS_CONF="$conf"

if podman --runtime runc image exists "$image"; then
  printf '%s\n' "$image"
  exit 0
fi

if [ ! -s "$tarball" ]; then
  root="$(mktemp -d "$cache/rootfs.XXXXXX")"
  trap 'sudo_ rm -rf "$root"' EXIT
  log "debootstrap $SUITE ($PACKAGES) into $root (about 40 s)"
  sudo_ debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" >&2
  sudo_ rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  sudo_ tar -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
log "podman import $tarball as $image"
podman --runtime runc import "$tarball" "$image" >&2
printf '%s\n' "$image"
