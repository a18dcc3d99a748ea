"""Regenerate the hostile tar corpus: python3 gen.py (in this directory)."""
import gzip, io, tarfile

def tar(name, members, gz=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    b = buf.getvalue()
    if gz:
        b = gzip.compress(b, mtime=0)
    open(name, "wb").write(b)

def f(name, data=b"x"):
    ti = tarfile.TarInfo(name); ti.size = len(data); ti.mtime = 0; return ti, data
def typ(name, t, link=""):
    ti = tarfile.TarInfo(name); ti.type = t; ti.linkname = link; ti.mtime = 0; return ti, None

tar("dotdot.tar", [f("../evil")])
tar("absolute.tar", [f("/tmp/depcache-evil")])
tar("nested-dotdot.tar", [f("a/b"), f("a/../../evil")])
tar("symlink-escape.tar", [typ("link", tarfile.SYMTYPE, "../../../etc")])
tar("symlink-absolute.tar", [typ("link", tarfile.SYMTYPE, "/etc")])
tar("write-through-symlink.tar", [typ("sub", tarfile.DIRTYPE), typ("d", tarfile.SYMTYPE, "sub"), f("d/evil")])
tar("overwrite-symlink.tar", [typ("link", tarfile.SYMTYPE, "sub"), f("link")])
tar("hardlink-escape.tar", [typ("h", tarfile.LNKTYPE, "../../etc/passwd")])
tar("hardlink-absolute.tar", [typ("h", tarfile.LNKTYPE, "/etc/passwd")])
tar("hardlink-to-missing.tar", [typ("h", tarfile.LNKTYPE, "nothere")])
tar("chardev.tar", [typ("null", tarfile.CHRTYPE)])
tar("blockdev.tar", [typ("sda", tarfile.BLKTYPE)])
tar("fifo.tar", [typ("pipe", tarfile.FIFOTYPE)])
tar("duplicate.tar", [f("same", b"one"), f("same", b"two")])
# A member that claims more than the budget; its data is cut short, but the
# size check must refuse it before reading.
ti = tarfile.TarInfo("huge"); ti.size = 1 << 34; ti.mtime = 0
open("huge-member.tar", "wb").write(ti.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024)
# 64 MiB of zeros in ~64 KiB.
tar("gzip-bomb.tar.gz", [f("zeros", b"\0" * (64 << 20))], gz=True)
good = io.BytesIO()
with tarfile.open(fileobj=good, mode="w") as t:
    for i in range(20):
        d = bytes([i]) * 4096
        ti = tarfile.TarInfo(f"dir/file{i}"); ti.size = len(d); ti.mtime = 0
        t.addfile(ti, io.BytesIO(d))
gzb = gzip.compress(good.getvalue(), mtime=0)
open("truncated.tar.gz", "wb").write(gzb[: len(gzb) // 2])
open("truncated.tar", "wb").write(good.getvalue()[:5000])
