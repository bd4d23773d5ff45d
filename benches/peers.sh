#!/usr/bin/env bash
# Puts the peer VMMs the benchmarks compare against under target/peers/ without touching the
# system's own packages (installing Debian's qemu-system-x86 would replace a newer qemu-img):
#   target/peers/qemu/usr/bin/qemu-system-x86_64   Debian bookworm's qemu 7.2, unpacked
# Its shared libraries are installed from Debian as usual. Prints the qemu binary's path.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest="$repo/target/peers/qemu"
qemu="$dest/usr/bin/qemu-system-x86_64"
if [ ! -x "$qemu" ]; then
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >&2
	# Runtime libraries qemu-system-x86 depends on, minus qemu's own packages.
	libs=$(apt-cache depends --no-recommends --no-suggests qemu-system-x86 qemu-system-common |
		awk '/Depends:/ {print $2}' | grep -v -e '^qemu' -e '^<' -e '^ipxe' -e '^seabios' |
		sort -u)
	# shellcheck disable=SC2086
	apt-get install -y -q --no-install-recommends $libs >&2
	(cd "$work" && apt-get download qemu-system-x86 qemu-system-data qemu-system-common \
		seabios >&2)
	mkdir -p "$dest"
	for deb in "$work"/*.deb; do dpkg -x "$deb" "$dest"; done
fi
"$qemu" --version >&2
echo "$qemu"
