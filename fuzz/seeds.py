#!/usr/bin/env python3
"""Writes the seed corpora of virtio_mmio and qcow2_write (see README.md for their input)."""
import os
import struct
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def op(kind, arg=0, off=0, value=0):
    return struct.pack("<BBHI", kind, arg, off, value)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def mmio():
    # kinds: 0 write, 1 read, 2 poke, 3 device pass, 4 start-up, 5 request
    # request: arg = type index (0 IN, 1 OUT, 2 FLUSH, 3 GET_ID, 4 DISCARD, 5 WRITE_ZEROES;
    # bit 3 unmap), off = slot | (sectors - 1) << 8, value = sector.
    ident = b"".join(op(1, 2, o) for o in (0, 4, 8, 0xC, 0x10, 0x34, 0x44, 0x60, 0x70, 0xFC))
    config = b"".join(op(1, w, 0x100 + o) for w in range(5) for o in (0, 8, 0x14, 0x22))
    write("virtio_mmio", "identity", ident + config)
    io = op(4, 4, 0, 0xFFFFFFFF) + op(5, 1, 0x0300, 7) + op(3) + op(5, 0, 0x0303, 7) + op(3)
    io += op(5, 2, 6) + op(3) + op(5, 3, 9) + op(3) + op(1, 2, 0x60) + op(0, 2, 0x64, 1)
    io += op(0, 2, 0x70, 0) + op(3) + op(1, 2, 0x70)
    write("virtio_mmio", "start_write_read_flush_reset", io)
    dz = op(4, 4, 0, 0xFFFFFFFF) + op(5, 4, 0x0100, 3) + op(3) + op(5, 13, 0x0204, 2) + op(3)
    dz += op(5, 1, 0x0707, 2040) + op(3) + op(0, 2, 0x50, 0) + op(3)
    write("virtio_mmio", "discard_zeroes_out_of_range", dz)
    # By hand: the driver's registers one by one, queue 0 of size 8, then a notify.
    hand = b"".join(op(0, 2, 0x70, s) for s in (0, 1, 3))
    hand += op(0, 2, 0x24, 1) + op(0, 2, 0x20, 1) + op(0, 2, 0x70, 11) + op(0, 2, 0x30, 0)
    hand += op(0, 2, 0x38, 8) + op(0, 2, 0x80, 0x1000) + op(0, 2, 0x90, 0x2000)
    hand += op(0, 2, 0xA0, 0x3000) + op(0, 2, 0x44, 1) + op(0, 2, 0x70, 15) + op(0, 2, 0x50, 0)
    hand += op(3) + op(0, 0, 0x71, 0) + op(0, 3, 0x80, 5) + op(1, 2, 0x70)
    write("virtio_mmio", "by_hand", hand)


def qcow2():
    # header: cluster bits - 9, refcount order | 8 backing | 0x10 compat 0.10 | 0x40 hostile
    # ops: 0-2 write, 3 zeroes, 4 discard, 5 flush, 6 verify, 7 compressed, 8 snapshot,
    # 9 apply, 10 delete, 11 reopen; off * 64 = offset, value bits 16-20 = sectors - 1.
    w = lambda off, n, fill, arg=0: op(0, arg, off, (n - 1) << 16 | fill)
    s = bytes([7, 4]) + w(0, 8, 1) + w(1000, 3, 2) + op(5) + op(6, 0, 0, 15 << 16)
    s += op(3, 1, 8, 2 << 16) + op(4, 0, 1000, 1 << 16) + op(11, 0, 1000, 4 << 16)
    write("qcow2_write", "c64k_r16", s)
    s = bytes([0, 8]) + w(3, 9, 5, 0x40) + op(4, 0x40, 5, 0x10203) + op(7, 1, 200, 9)
    s += op(3, 0, 40, 3 << 16) + op(11) + op(6, 0x80, 0, 31 << 16)
    write("qcow2_write", "c512_r1_backing", s)
    s = bytes([3, 2]) + w(0, 16, 1) + op(8) + w(64, 4, 2) + op(8) + w(0, 2, 3) + op(9, 0)
    s += op(6, 0, 0, 31 << 16) + op(10, 1) + op(8) + op(9, 1) + op(11) + op(10, 0)
    write("qcow2_write", "c4k_r4_snapshots", s)
    s = bytes([12, 6 | 8 | 0x10]) + w(40000, 32, 7, 0x80) + op(8) + w(40010, 2, 8) + op(9, 0)
    s += op(4, 0, 40000, 4 << 16) + op(3, 0, 100, 1 << 16) + op(11)
    write("qcow2_write", "c2m_r64_v2_backing", s)
    with tempfile.TemporaryDirectory() as d:
        img = os.path.join(d, "h.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                        img, "1M"], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 7 0 8k", img], check=True,
                       stdout=subprocess.DEVNULL)
        image = open(img, "rb").read()
    ops = op(0, 3, 1, 9) + op(2, 1, 0) + op(4) + op(3) + op(1, 0, 2) + op(5, 7, 0)
    write("qcow2_write", "hostile_small", bytes([0, 0x44, len(ops) // 8]) + ops + image)


def image():
    # Small qemu-img images of several shapes.
    shapes = {
        "c4k_data": ["-o", "cluster_size=4096"],
        "c512_r1": ["-o", "cluster_size=512,refcount_bits=1"],
        "c1k_v2": ["-o", "cluster_size=1024,compat=0.10"],
        "c4k_r64_snapshot": ["-o", "cluster_size=4096,refcount_bits=64"],
    }
    with tempfile.TemporaryDirectory() as d:
        for name, opts in shapes.items():
            img = os.path.join(d, name)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, img, "256k"],
                           check=True)
            subprocess.run(["qemu-io", "-c", "write -P 9 4k 12k", "-c", "write -z 64k 8k",
                            img], check=True, stdout=subprocess.DEVNULL)
            if "snapshot" in name:
                subprocess.run(["qemu-img", "snapshot", "-c", "s1", img], check=True)
                subprocess.run(["qemu-io", "-c", "write -P 3 0 4k", img], check=True,
                               stdout=subprocess.DEVNULL)
            write("qcow2_image", name, open(img, "rb").read())
        raw = os.path.join(d, "raw")
        with open(raw, "wb") as f:
            f.write(bytes(range(256)) * 256)
        img = os.path.join(d, "compressed")
        subprocess.run(["qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
                        "cluster_size=4096", raw, img], check=True)
        write("qcow2_image", "c4k_compressed", open(img, "rb").read())


def api():
    write("api_request", "get", b"\x00GET / HTTP/1.1\r\n\r\n")
    write("api_request", "pipelined",
          b"\x02PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n"
          b'{"state":"Paused"}GET / HTTP/1.0\r\n\r\n')
    body = b'{"drive_id":"root","path_on_host":"/tmp/a.img","is_root_device":true,' \
           b'"is_read_only":false}'
    req = b"PUT /drives/root HTTP/1.1\r\nContent-Type: application/json\r\n" \
          b"Content-Length: %d\r\n\r\n" % len(body) + body
    # Stream mode: (length, bytes) pieces.
    pieces = b"".join(bytes([len(req[i:i + 40])]) + req[i:i + 40] for i in range(0, len(req), 40))
    write("api_request", "put_drive_in_pieces", b"\x01" + pieces)


def blk():
    # Descriptor table at 0, available ring at 0x100, used ring at 0x200: an OUT request
    # (header, data, status), then an IN request of the same sector, then GET_ID.
    mem = bytearray(0x3000)

    def desc(i, addr, length, flags, nxt):
        struct.pack_into("<QIHH", mem, i * 16, addr, length, flags, nxt)

    reqs = [(1, 0x1000, 0), (0, 0x1800, 2), (8, 0x2000, 0)]
    for n, (kind, data, write_flag) in enumerate(reqs):
        hdr = 0x400 + n * 16
        struct.pack_into("<IIQ", mem, hdr, kind, 0, 3)
        desc(n * 3, hdr, 16, 1, n * 3 + 1)
        desc(n * 3 + 1, data, 512 if kind != 8 else 20, 1 | write_flag, n * 3 + 2)
        desc(n * 3 + 2, 0x600 + n, 1, 2, 0)
        struct.pack_into("<H", mem, 0x104 + n * 2, n * 3)
    struct.pack_into("<HH", mem, 0x100, 0, len(reqs))
    mem[0x1000:0x1200] = bytes(range(256)) * 2
    write("virtio_blk_request", "out_in_getid", bytes(mem))


mmio()
qcow2()
image()
api()
blk()
