#!/usr/bin/env python
"""Prepare enwik8 (the first 10^8 bytes of the 2006 English Wikipedia dump) as a spikegpt dataset.

    python data/prepare_enwik8.py                          # download enwik8.zip, byte vocab
    python data/prepare_enwik8.py --input enwik8.zip --vocab char
    python data/prepare_enwik8.py --input path/to/enwik8   # the unzipped 100,000,000-byte file

Standard split: train = bytes [0, 90M), val = [90M, 95M), test = the last 5M bytes [95M, 100M).
The literature's enwik8 "BPC" is bits per byte of the test split.

Vocabularies:

* ``--vocab byte`` (default): 256 byte ids. Output: ``data/enwik8-byte``.
* ``--vocab char``: the Unicode characters of the train split + one unknown id (the last id), as the
  SpikeGPT reference does (its vocabulary: the characters of the training text). Output:
  ``data/enwik8-char``. The split boundaries stay at the exact byte offsets above. Each split's bytes are
  decoded with Python's ``surrogateescape``: a multibyte character cut by a boundary (or any invalid
  UTF-8) becomes one escape character (U+DC80 + byte value) per byte instead of being dropped, so the char
  splits cover exactly the same bytes as the byte splits. The summary and meta.json report these as
  ``escaped_bytes``, and val/test characters missing from the train vocabulary as ``unknown``.

Default paths are inside the repository's ``data/`` directory (this script's directory): the download
goes to ``data/enwik8.zip`` and is reused on later runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

try:
    import spikegpt  # noqa: F401
except ImportError:  # running from a checkout: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spikegpt.data import DataError, format_summary, prepare_splits  # noqa: E402
from spikegpt.cli import positive_float, positive_int, new_parser, run_cli  # noqa: E402
from spikegpt.fileio import atomic_write  # noqa: E402

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SIZE = 100_000_000
ENWIK8_MEMBER = "enwik8"
DATA_DIR = Path(__file__).resolve().parent


def enwik8_split_sizes(total: int = ENWIK8_SIZE) -> dict[str, int]:
    """Train / val / test byte sizes: val and test are 5% each at the end (90M / 5M / 5M for enwik8)."""
    held_out = total // 20
    return {"train": total - 2 * held_out, "val": held_out, "test": held_out}


def read_enwik8(path: str | os.PathLike[str], expected_size: int = ENWIK8_SIZE) -> bytes:
    """Read enwik8 from ``enwik8.zip`` (member ``enwik8``) or the raw file; verify its size.

    Raises:
        DataError: file missing, zip without an ``enwik8`` member, corrupt zip, or wrong size.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--input {p} not found")
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
                if ENWIK8_MEMBER not in names:
                    raise DataError(f"{p} is a zip without an {ENWIK8_MEMBER!r} member (it holds "
                                    f"{names[:5]}); pass the official enwik8.zip or the unzipped enwik8 file")
                size = zf.getinfo(ENWIK8_MEMBER).file_size
                if size != expected_size:
                    raise DataError(f"{p}:{ENWIK8_MEMBER} has {size:,} bytes, expected exactly "
                                    f"{expected_size:,}; it is not enwik8 (delete it and download again)")
                data = zf.read(ENWIK8_MEMBER)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(f"{p} is a corrupt zip ({e}); delete it and download again") from None
    else:
        size = p.stat().st_size
        if size != expected_size:
            hint = " (incomplete download?)" if p.suffix == ".zip" else ""
            raise DataError(f"{p} has {size:,} bytes, expected exactly {expected_size:,}: it is not the "
                            f"enwik8 file{hint}; pass enwik8.zip or the unzipped enwik8 file")
        data = p.read_bytes()
    if len(data) != expected_size:  # pragma: no cover - guards against a short read
        raise DataError(f"read {len(data):,} bytes from {p}, expected {expected_size:,}")
    return data


def download(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (atomically: nothing is left behind on failure). Raises DataError
    with the fix on failure."""
    print(f"downloading {url} -> {dest} ...", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            atomic_write(dest, lambda f: shutil.copyfileobj(r, f, length=1 << 20))
    except (TimeoutError, urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(
            f"could not download {url} ({reason}). Download enwik8.zip on a machine with network access and "
            f"pass it with --input PATH/enwik8.zip (or the unzipped 100,000,000-byte enwik8 file)"
        ) from None
    return dest


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("data/prepare_enwik8.py", "Prepare enwik8 (90M/5M/5M bytes train/val/test) for spikegpt.")
    p.add_argument("--input", help="enwik8.zip or the raw enwik8 file (default: download it to data/enwik8.zip)")
    p.add_argument("--vocab", choices=("byte", "char"), default="byte",
                   help="byte: 256 byte ids (default; standard BPC); char: Unicode characters of the train "
                        "split + an unknown id (as the SpikeGPT paper)")
    p.add_argument("--out", help="output directory (default: data/enwik8-byte or data/enwik8-char)")
    p.add_argument("--download-dir", help="where to download enwik8.zip when --input is not given "
                                          "(default: data/, next to this script)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset in --out that was prepared from different inputs")
    # Hidden options for tests and mirrors.
    p.add_argument("--url", default=ENWIK8_URL, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=positive_float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--expected-size", type=positive_int, default=ENWIK8_SIZE, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), prepare, argv)


def prepare(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else DATA_DIR / f"enwik8-{args.vocab}"
    if args.input:
        src = Path(args.input)
    else:
        src = (Path(args.download_dir) if args.download_dir else DATA_DIR) / "enwik8.zip"
        if src.is_file():
            print(f"using the earlier download {src}")
        else:
            download(args.url, src, timeout=args.timeout)
    data = read_enwik8(src, expected_size=args.expected_size)
    standard = args.expected_size == ENWIK8_SIZE
    meta = prepare_splits(
        data, out, args.vocab,
        split_sizes=enwik8_split_sizes(len(data)),
        utf8_errors="surrogateescape",
        source=("enwik8 (first 10^8 bytes of a 2006 English Wikipedia XML dump), "
                "split 90M/5M/5M bytes" if standard else
                f"enwik8-format file of {len(data):,} bytes (non-standard size), split 90%/5%/5%"),
        overwrite=args.overwrite,
        extra_meta={"dataset": "enwik8" if standard else "enwik8-test-size"},
        log=print,
        inputs=[src],
    )
    print(format_summary(meta, os.fspath(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
