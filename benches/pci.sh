#!/usr/bin/env bash
# virtio-pci vs virtio-mmio: boot to init and exits per 4 KiB virtio-blk request (see pci.py).
exec python3 "$(dirname "$0")/pci.py" "$@"
