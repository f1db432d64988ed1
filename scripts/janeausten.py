"""Jane Austen's six novels from Debian's r-cran-janeaustenr package, read without R.

The package keeps its data in R's lazy-load database: data/Rdata.rdx (a gzip-compressed R
serialization of list(variables = list(name = c(offset, length)), ...)) indexes data/Rdata.rdb, in
which each object is a 4-byte big-endian uncompressed length followed by a zlib stream holding an
R serialization ('X\\n', format version 2 or 3) of a character vector, one element per line of
the printed novel ("" between paragraphs).

    python scripts/janeausten.py --work ~/.cache/mixchat-train   # writes <work>/austen/<book>.txt
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import zlib
from pathlib import Path

PACKAGE = "r-cran-janeaustenr"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")

NILVALUE, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 254, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, ATTRLIST, ATTRLANG = 255, 239, 240
NA_INT = -(2**31)


class RReader:
    """Just enough of R's XDR unserialize for the objects janeaustenr stores."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError(f"not an R XDR serialization (starts {data[:2]!r})")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            n = self.int()  # native encoding name
            self.pos += n
        elif version != 2:
            raise ValueError(f"R serialization format {version} is not supported")

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == NILVALUE:
            return None
        if kind == REFSXP:
            index = flags >> 8
            return self.refs[(index if index else self.int()) - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if flags & (1 << 14) else "utf-8")
        if kind in (LISTSXP, ATTRLIST, ATTRLANG):  # pairlist: (attr) (tag) car cdr
            out = {}
            while True:
                attr = self.item() if has_attr else None
                del attr
                tag = self.item() if has_tag else None
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if kind == NILVALUE:
                    return out
                if kind not in (LISTSXP, ATTRLIST, ATTRLANG):
                    raise ValueError(f"unexpected cdr type {kind}")
        if kind in (INTSXP, LGLSXP):
            n = self.int()
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
            value = [None if v == NA_INT else v for v in values]
        elif kind == REALSXP:
            n = self.int()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (STRSXP, VECSXP):
            n = self.int()
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"R type {kind} is not supported by this reader")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names is not None and kind == VECSXP:
                return dict(zip(names, value, strict=True))
        return value


def unserialize(data: bytes):
    return RReader(data).item()


def read_index(rdx: Path) -> dict[str, tuple[int, int]]:
    index = unserialize(zlib.decompress(rdx.read_bytes(), 47))  # 47: gzip or zlib header
    return {name: (int(pos[0]), int(pos[1])) for name, pos in index["variables"].items()}


def read_object(rdb: Path, offset: int, length: int):
    with open(rdb, "rb") as f:
        f.seek(offset)
        blob = f.read(length)
    (size,) = struct.unpack(">I", blob[:4])
    data = zlib.decompress(blob[4:])
    if len(data) != size:
        raise ValueError(f"{rdb}@{offset}: {len(data)} bytes decompressed, header says {size}")
    return unserialize(data)


def read_books(data_dir: Path) -> dict[str, list[str]]:
    """Book name -> its lines (NA elements become "")."""
    index = read_index(data_dir / "Rdata.rdx")
    books = {}
    for name in BOOKS:
        lines = read_object(data_dir / "Rdata.rdb", *index[name])
        books[name] = ["" if line is None else line for line in lines]
    return books


def fetch(work: Path) -> Path:
    """Download and unpack the Debian package into `work` (once); returns the data folder."""
    data_dir = work / "janeaustenr" / DATA_DIR
    if (data_dir / "Rdata.rdb").is_file():
        return data_dir
    work.mkdir(parents=True, exist_ok=True)
    debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=work, check=True)
        debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(work / "janeaustenr")], check=True)
    return data_dir


def extract(work: Path) -> dict[str, Path]:
    """Write <work>/austen/<book>.txt, one line per element; returns book -> path."""
    books = read_books(fetch(work))
    out = work / "austen"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, lines in books.items():
        paths[name] = out / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mixchat-train")
    args = ap.parse_args()
    for name, path in extract(args.work).items():
        text = path.read_text(encoding="utf-8")
        print(f"{name:18s} {text.count(chr(10)):6d} lines {len(text):8d} chars  {path}")


if __name__ == "__main__":
    main()
