"""Regenerate the hostile zip corpus: python3 gen_zip.py (in this directory).

Each archive must be refused by manager/unpack.ExtractZip with the one error
named in manager/unpack/unpack_test.go's hostileWants (budget 8 MiB)."""
import stat, struct, zipfile

def z(name, members, method=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(name, "w", method) as zf:
        for zi, data in members:
            zf.writestr(zi, data)

def f(name, data=b"x", mode=0o644):
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.create_system = 3  # unix: the mode lives in the high 16 bits
    zi.external_attr = (stat.S_IFREG | mode) << 16
    zi.compress_type = zipfile.ZIP_DEFLATED
    return zi, data

def typ(name, kind, data=b""):
    zi, _ = f(name)
    zi.external_attr = (kind | 0o777) << 16
    return zi, data

z("zip-dotdot.zip", [f("../evil")])
z("zip-absolute.zip", [f("/tmp/depcache-evil")])
z("zip-nested-dotdot.zip", [f("a/b"), f("a/../../evil")])
z("zip-symlink-escape.zip", [typ("link", stat.S_IFLNK, b"../../../etc")])
z("zip-symlink-absolute.zip", [typ("link", stat.S_IFLNK, b"/etc")])
z("zip-symlink-chain.zip", [typ("d/up", stat.S_IFLNK, b".."), typ("L", stat.S_IFLNK, b"d/up/..")])
z("zip-write-through-symlink.zip", [typ("d", stat.S_IFLNK, b"sub"), f("d/evil")])
z("zip-chardev.zip", [typ("null", stat.S_IFCHR)])
z("zip-blockdev.zip", [typ("sda", stat.S_IFBLK)])
z("zip-fifo.zip", [typ("pipe", stat.S_IFIFO)])
z("zip-socket.zip", [typ("sock", stat.S_IFSOCK)])
z("zip-duplicate.zip", [f("same", b"one"), f("same", b"two")])
# 64 MiB of zeros in ~64 KiB: one member, then sixteen that pass the bound
# together.
z("zip-bomb.zip", [f("zeros", b"\0" * (64 << 20))])
z("zip-bomb-many.zip", [f("z%02d" % i, b"\0" * (1 << 20)) for i in range(16)])

# A member whose sizes (local header and central directory) claim 10 bytes
# of the 100 000 its data holds: the reader must stop at the claim.
z("zip-lying-size.zip", [f("liar", b"a" * 100000)], method=zipfile.ZIP_STORED)
b = bytearray(open("zip-lying-size.zip", "rb").read())
struct.pack_into("<I", b, 22, 10)  # local header: uncompressed size
cd = b.find(b"PK\x01\x02")
struct.pack_into("<I", b, cd + 24, 10)  # central directory: uncompressed size
open("zip-lying-size.zip", "wb").write(b)

good = "zip-truncated.zip"
z(good, [f("dir/file%d" % i, bytes([i]) * 4096) for i in range(20)])
b = open(good, "rb").read()
open(good, "wb").write(b[: len(b) // 2])
