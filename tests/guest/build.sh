#!/usr/bin/env bash
# Builds Ember's guest kit into target/guest/:
#   vmlinux, bzImage        minimal Linux 6.1 (tests/guest/kernel.config + patches/*.patch)
#   initramfs.cpio(.gz)     busybox + tests/guest/rootfs (init reads ember.run= / ember.end=)
#   rootfs.ext4             the same tree as a 64 MiB ext4 root filesystem
#   vmlinux-kunit           with --kunit only: the same kernel plus KUnit and a few of its
#                           suites (tests/guest/kunit.config), for `ember test`'s KTAP check
# Installs what it needs with apt-get on Debian. Cached twice: target/guest/ is reused when
# its inputs did not change, and built artifacts are kept under $EMBER_GUEST_CACHE
# (default ~/.cache/ember-guest) so a fresh checkout on the same machine skips the compile.
# Run time on 2 cores: about 6 minutes cold, under 2 seconds when cached.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out="${EMBER_GUEST_OUT:-$repo/target/guest}"
cache="${EMBER_GUEST_CACHE:-$HOME/.cache/ember-guest}"
jobs=$(nproc)

log() { echo "guest-kit: $*" >&2; }
die() { echo "guest-kit: error: $*" >&2; exit 1; }

# Everything the README's test command needs on a fresh Debian 12 machine comes from here:
# the kit's build tools, and what the tests drive (iproute2, iptables and dnsmasq for the
# network tests, e2fsprogs to read guest disks back, qemu-img as the disk tests' reference —
# installed only when missing, the machine may carry a newer one than Debian's).
install_packages() {
	local pkgs=(linux-source-6.1 build-essential flex bison bc libelf-dev cpio lz4
		busybox-static e2fsprogs xz-utils pkg-config iproute2 iptables dnsmasq-base
		curl acpica-tools)
	command -v qemu-img >/dev/null || pkgs+=(qemu-utils)
	local missing=()
	for p in "${pkgs[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return
	log "installing ${missing[*]}"
	local sudo=
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	$sudo apt-get update -q >&2
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
		"${missing[@]}" >&2
}

# Hash of the named files plus extra strings: the cache key of an artifact set.
key_of() {
	local files=() extra=()
	for a in "$@"; do if [ -e "$a" ]; then files+=("$a"); else extra+=("$a"); fi; done
	{ find "${files[@]}" -type f -print0 | sort -z | xargs -0 sha256sum | sed "s#$repo/##"
	  printf '%s\n' "${extra[@]}"; } | sha256sum | cut -c1-16
}

# build_kernel TAG TARGETS FRAGMENT...: tinyconfig + the fragments + patches/ in its own tree
# (target/guest/linux-6.1 for the kit, linux-6.1-TAG for a variant). TAG "kernel" is the
# kit's kernel (vmlinux, bzImage, kernel.config); "kunit" the KUnit one (vmlinux-kunit,
# kernel-kunit.config).
build_kernel() {
	local tag=$1 targets=$2
	shift 2
	local frags=("$@")
	local src_ver key dir tree suffix
	suffix=$([ "$tag" = kernel ] || echo "-$tag")
	src_ver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
	key=$(key_of "${frags[@]}" "$here/patches" "$here/build.sh" "linux-source-6.1=$src_ver")
	dir="$cache/$tag-$key"
	if [ -f "$out/.$tag-$key" ] && [ -f "$out/vmlinux$suffix" ]; then
		log "$tag up to date ($key)"
		return
	fi
	if [ ! -f "$dir/vmlinux" ]; then
		tree="$out/linux-6.1$suffix"
		# A tree left by an earlier build is reused (an incremental rebuild) when it was made
		# from the same source and patches; otherwise it is extracted afresh.
		local tree_key
		tree_key=$(key_of "$here/patches" "linux-source-6.1=$src_ver")
		if [ "$(cat "$tree/.ember-tree" 2>/dev/null)" != "$tree_key" ]; then
			log "extracting and patching linux-source-6.1 into $tree"
			rm -rf "$tree" "$out/linux-source-6.1" && mkdir -p "$out"
			tar -xf /usr/src/linux-source-6.1.tar.xz -C "$out" && mv "$out/linux-source-6.1" "$tree"
			for p in "$here"/patches/*.patch; do
				patch -d "$tree" -p1 --quiet --forward <"$p" || die "patch $p does not apply"
			done
			echo "$tree_key" >"$tree/.ember-tree"
		fi
		log "building $tag $key in $tree (a few minutes)"
		make -C "$tree" -s tinyconfig >&2
		"$tree/scripts/kconfig/merge_config.sh" -m -O "$tree" "$tree/.config" \
			"${frags[@]}" >/dev/null
		make -C "$tree" -s olddefconfig >&2
		check_config "$tree/.config" "${frags[@]}"
		# shellcheck disable=SC2086 # targets is a word list
		make -C "$tree" -s -j"$jobs" $targets >&2
		mkdir -p "$dir"
		cp "$tree/vmlinux" "$tree/.config" "$dir/"
		[[ " $targets " != *" bzImage "* ]] || cp "$tree/arch/x86/boot/bzImage" "$dir/"
	else
		log "$tag $key from cache $dir"
	fi
	mkdir -p "$out"
	cp "$dir/vmlinux" "$out/vmlinux$suffix" && cp "$dir/.config" "$out/kernel$suffix.config"
	[ ! -f "$dir/bzImage" ] || cp "$dir/bzImage" "$out/bzImage$suffix"
	rm -f "$out/.$tag-"* && touch "$out/.$tag-$key"
}

# Every option the fragments set must survive olddefconfig (a dependency may drop it); an
# option a later fragment sets again is checked there only.
check_config() {
	local cfg=$1 bad=0 line opt i later
	shift
	local frags=("$@")
	for ((i = 0; i < ${#frags[@]}; i++)); do
		while read -r line; do
			case "$line" in ''|'#'*) continue ;; esac
			opt=${line%%=*}
			later=0
			for f in "${frags[@]:i+1}"; do grep -q "^$opt=" "$f" && later=1; done
			[ $later -eq 0 ] || continue
			if [[ "$line" == *=n ]]; then
				grep -q "^$opt=" "$cfg" && { log "option $opt is still set"; bad=1; }
			else
				grep -qx -- "$line" "$cfg" || { log "option $line did not stick"; bad=1; }
			fi
		done <"${frags[i]}"
	done
	[ $bad -eq 0 ] || die "kernel config check failed"
}

build_rootfs() {
	local bb_ver key stage
	bb_ver=$(dpkg-query -W -f='${Version}' busybox-static)
	key=$(key_of "$here/rootfs" "$here/build.sh" "busybox-static=$bb_ver")
	if [ -f "$out/.rootfs-$key" ] && [ -f "$out/rootfs.ext4" ] && [ -f "$out/initramfs.cpio.gz" ]; then
		log "rootfs up to date ($key)"
		return
	fi
	log "building initramfs and rootfs.ext4 ($key)"
	stage=$(mktemp -d)
	trap 'rm -rf "$stage"' RETURN
	mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,root}
	cp -a "$here/rootfs/." "$stage/"
	cp /bin/busybox "$stage/bin/busybox"
	local applet
	for applet in $("$stage/bin/busybox" --list-full); do
		[ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
	done
	mkdir -p "$stage/sbin" && ln -sf /init "$stage/sbin/init"
	(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
		>"$out/initramfs.cpio"
	gzip -9 -n -c "$out/initramfs.cpio" >"$out/initramfs.cpio.gz"
	rm -f "$out/rootfs.ext4"
	mkfs.ext4 -q -F -L ember-root -E root_owner=0:0 -d "$stage" "$out/rootfs.ext4" 64M
	rm -f "$out"/.rootfs-* && touch "$out/.rootfs-$key"
}

kunit=0
for arg in "$@"; do
	case "$arg" in
	--kunit) kunit=1 ;;
	*) die "unknown option '$arg' (usage: build.sh [--kunit])" ;;
	esac
done
install_packages
mkdir -p "$out" "$cache"
build_kernel kernel "vmlinux bzImage" "$here/kernel.config"
[ $kunit -eq 0 ] || build_kernel kunit vmlinux "$here/kernel.config" "$here/kunit.config"
build_rootfs
ls -l "$out"/vmlinux "$out"/bzImage "$out"/initramfs.cpio.gz "$out"/rootfs.ext4 >&2
[ $kunit -eq 0 ] || ls -l "$out"/vmlinux-kunit >&2
