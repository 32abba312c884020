#!/usr/bin/env bash
# A Python base image made from Debian packages, for machines that reach a
# Debian mirror but no image registry. The Dockerfile takes it through its
# PYTHON_IMAGE build argument, in place of python:3.11-slim:
#
#   deploy/image/base.sh                  # prints the tag, e.g. waddle-ai-base:bookworm-1
#   docker build --build-arg PYTHON_IMAGE=waddle-ai-base:bookworm-1 --network host .
#
# What it holds: Debian bookworm (debootstrap --variant=minbase) plus python3
# (3.11, as in python:3.11-slim), python3-venv (the Dockerfile makes virtualenvs),
# passwd (useradd, for the image's non-root user) and ca-certificates. apt stays
# in, pointed at the same mirror, so the Dockerfile can add libgomp1.
#
# Cached twice, so a repeated run costs a second: the imported image itself
# (kept while it exists, with the recipe's version in its tag), and the root
# file system as a tarball under BASE_CACHE_DIR (for a daemon whose images were
# wiped). Needs root (debootstrap), a Docker client whose daemon answers, and
# Debian's debootstrap package. Settings (environment):
#   DOCKER          the docker client (default: docker)
#   DEBIAN_MIRROR   default: the first deb.debian.org-style URI of this machine's
#                   apt sources, else http://deb.debian.org/debian
#   BASE_CACHE_DIR  default: .cache/image (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/../.."

# Bump RECIPE when the package list or the import options change: the tag
# changes with it, so a stale base is never reused.
RECIPE=2
SUITE=bookworm
PACKAGES=python3,python3-venv,passwd,ca-certificates
TAG="waddle-ai-base:${SUITE}-${RECIPE}"
DOCKER=${DOCKER:-docker}
CACHE_DIR=${BASE_CACHE_DIR:-.cache/image}
TARBALL="$CACHE_DIR/${SUITE}-${RECIPE}.tar"

log() { echo "image-base: $*" >&2; }
# Exit 3, the reason on stdout: this machine cannot make the base (the check
# then says "skipped" with that reason); any other failure is a real one.
cannot() { echo "$*"; exit 3; }

mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  # deb822 sources (URIs: …) or one-line sources (deb URI suite …), the first
  # one that serves the main archive (not -security, not a third party's).
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ {print $2}' | grep -v -e security -e '^$' | grep '/debian/\?$' | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' \
          | grep -v security | grep '/debian/\?$' | head -n1 || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
  log "$TAG is there (cached)"
  echo "$TAG"
  exit 0
fi

if [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null || cannot "debootstrap is not installed (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || cannot "debootstrap needs root"
  mkdir -p "$CACHE_DIR"
  root=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
  # mktemp makes it 0700, and the tarball's "./" carries that to the image's
  # "/" (vfs applies it; overlay2 happens not to): no user but root could run.
  chmod 0755 "$root"
  trap 'rm -rf "$root"' EXIT
  url=$(mirror)
  log "debootstrap $SUITE from $url with $PACKAGES (about a minute)"
  if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$url" \
      >"$CACHE_DIR/debootstrap.log" 2>&1; then
    tail -n 20 "$CACHE_DIR/debootstrap.log" >&2
    log "debootstrap failed; its log: $CACHE_DIR/debootstrap.log"
    exit 1
  fi
  # What a container never needs: downloaded packages, package lists (the
  # Dockerfile runs apt-get update itself), the host's resolver and hostname.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
         "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/*
  : >"$root/etc/resolv.conf"
  : >"$root/etc/hostname"
  tar --numeric-owner --xattrs -C "$root" -cf "$TARBALL.part" .
  mv "$TARBALL.part" "$TARBALL"
  rm -rf "$root"
  trap - EXIT
fi

# docker import keeps no environment: set what python:3.11-slim sets, PATH
# first (without it, ENV PATH=/opt/venv/bin:$PATH in the Dockerfile would
# leave apt-get and useradd off the PATH).
log "importing $TARBALL as $TAG"
"$DOCKER" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap $SUITE minbase + $PACKAGES" \
  "$TARBALL" "$TAG" >/dev/null
# Older recipes' bases and tarballs are of no further use.
for stale in $("$DOCKER" images --format '{{.Repository}}:{{.Tag}}' waddle-ai-base); do
  [ "$stale" = "$TAG" ] || "$DOCKER" rmi "$stale" >/dev/null 2>&1 || true
done
find "$CACHE_DIR" -maxdepth 1 -name '*.tar' ! -name "$(basename "$TARBALL")" -delete
echo "$TAG"
