#!/usr/bin/env bash
# A local base image for the Dockerfile where no image registry is reachable: Debian (this machine's
# release unless told otherwise) from its own package mirror, with python3 and venv, made with
# debootstrap and committed with buildah. api_tests/test_container.py builds on it:
#
#   docker/local-base.sh                 # prints the image name: localhost/metanet-base:<codename>
#   buildah bud --build-arg BASE_IMAGE=localhost/metanet-base:bookworm ...
#
# An image of that name made from the same recipe is reused; downloaded packages are cached in
# $METANET_CI_CACHE (default /var/cache/metanet-ci). Needs root, debootstrap and buildah.
set -euo pipefail

SUITE="${METANET_BASE_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:?}")}"
# The first Debian mirror apt is configured with (deb822 or one-line style): one this machine reaches.
default_mirror() {
    { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
      grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | sed 's/\[[^]]*\]//' | awk '{print $2}'
    } | grep -v -e security -e '^$' | head -n 1 || true
}
MIRROR="${METANET_DEBIAN_MIRROR:-$(default_mirror)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
PACKAGES="python3,python3-venv,ca-certificates"
IMAGE="${1:-localhost/metanet-base:$SUITE}"
RECIPE="debootstrap minbase $SUITE +$PACKAGES v1"
CACHE="${METANET_CI_CACHE:-/var/cache/metanet-ci}/debootstrap-$SUITE"

have="$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "org.metanet.recipe"}}' "$IMAGE" \
        2>/dev/null || true)"
if [ "$have" = "$RECIPE" ]; then
    echo "$IMAGE"
    exit 0
fi

echo "== debootstrap $SUITE from $MIRROR into $IMAGE" >&2
mkdir -p "$CACHE"
ctr="$(buildah from scratch)"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root="$(buildah mount "$ctr")"
debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$CACHE" "$SUITE" "$root" "$MIRROR" >&2
# Package lists and logs only weigh the image down; the Dockerfile runs no apt-get on this base.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
       "$root"/var/log/* "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
buildah umount "$ctr" >/dev/null
buildah config --env LANG=C.UTF-8 --cmd '["python3"]' --label "org.metanet.recipe=$RECIPE" "$ctr"
buildah commit --quiet --rm "$ctr" "$IMAGE" >/dev/null
trap - EXIT
echo "$IMAGE"
