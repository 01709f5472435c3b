#!/bin/sh
# A stand-in for python:3.12-slim where no image registry is reachable: Debian bookworm (python3 3.11,
# its venv module, CA certificates) made by debootstrap from Debian's packages and imported as
# flagproxy-base:bookworm. Build with it: docker build --build-arg BASE=flagproxy-base:bookworm .
# The machine's CA bundle goes in, so pip in the build trusts what the machine trusts. Needs root.
set -eu
tag=${1:-flagproxy-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null 2>&1 || apt-get install -y -qq debootstrap >/dev/null
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc "$rootfs"/usr/share/man \
    "$rootfs"/usr/share/locale
cp /etc/ssl/certs/ca-certificates.crt "$rootfs"/etc/ssl/certs/ca-certificates.crt
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - "$tag" >/dev/null
echo "$tag"
