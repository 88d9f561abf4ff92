"""Download the cleaned Alpaca data set to data/alpaca_data_cleaned.json, where finetune.py looks by default, checked.

    python phase2_lora/download_data.py                              # from GitHub (gururise/AlpacaDataCleaned)
    HF_ENDPOINT=https://hf-mirror.com python phase2_lora/download_data.py --source huggingface    # from China
    python phase2_lora/download_data.py --url URL                    # any mirror, or file:///path/to/a/copy
    python phase2_lora/download_data.py --sha256 HEX                 # also require these exact bytes

The file is checked before it takes its place: a JSON list of records that are exactly the three strings
instruction, input, output (the upstream repository's schema.json), 51,760 of them (--records), and the sha256
given with --sha256. No checksum is published for the upstream file, which lives on a branch that can move, so
none is pinned here: the script prints the sha256 it got, for you to pin with --sha256 on your other machines.
The download goes to a temporary file beside the target and is moved into place with os.replace, so a failed,
cut-short or interrupted download leaves nothing behind, never a half-written file. A target that is already
there is checked, not downloaded again (--force replaces it). Errors: one line on stderr, exit code 2.
"""

import argparse
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from chat import OneLineArgumentParser  # stdlib-only at import: one error line for a bad flag

SOURCES = {  # the data set's repository, and its author's copy on the Hugging Face hub (yahma/alpaca-cleaned)
    "github": "https://raw.githubusercontent.com/gururise/AlpacaDataCleaned/main/alpaca_data_cleaned.json",
    "huggingface": "{endpoint}/datasets/yahma/alpaca-cleaned/resolve/main/alpaca_data_cleaned.json",
}
HF_ENDPOINT = "https://huggingface.co"  # what huggingface_hub uses when HF_ENDPOINT is not set
DEFAULT_OUTPUT = Path("data") / "alpaca_data_cleaned.json"  # finetune.py's default --data_path
RECORDS = 51_760  # the row count of yahma/alpaca-cleaned, and what other projects' tests assert for the GitHub URL
FIELDS = {"instruction", "input", "output"}  # gururise/AlpacaDataCleaned schema.json: required, no others
CHUNK = 1 << 16  # bytes per read
TIMEOUT = 60  # seconds a connect or a read may stall before the download counts as failed


class DataError(Exception):
    """A download or a check failed: main() prints `error: <msg>` and exits 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=SOURCES, default="github",
                   help="github: raw.githubusercontent.com; huggingface: the Hugging Face copy, from HF_ENDPOINT "
                        "when set (e.g. https://hf-mirror.com) (default: %(default)s)")
    p.add_argument("--url", type=url, default=None, help="download from this http(s):// or file:// URL instead")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write it (default: %(default)s)")
    p.add_argument("--records", type=count, default=RECORDS,
                   help="the number of records the file must hold; 0 accepts any (default: %(default)s)")
    p.add_argument("--sha256", type=sha256_hex, default=None, help="the file's sha256 must be this (64 hex digits)")
    p.add_argument("--force", action="store_true", help="download even if --output exists, then replace it")
    return p.parse_args(argv)


def url(text: str) -> str:
    if urllib.parse.urlsplit(text).scheme not in ("http", "https", "file"):
        raise argparse.ArgumentTypeError(f"expected an http://, https:// or file:// URL, got {text!r}")
    return text


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def sha256_hex(text: str) -> str:
    digest = text.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise argparse.ArgumentTypeError(f"expected 64 hex digits, got {text!r}")
    return digest


# ---------------------------------------------------------------- download

class Progress:
    """Bytes received so far, on stderr: one line redrawn in place on a terminal; in a log file a plain line at
    every 10% (every 4 MiB when the server does not say the size), so the log holds no carriage returns."""

    def __init__(self, total: int | None):
        self.total, self.start, self.last = total, time.monotonic(), 0.0
        self.tty = sys.stderr.isatty()
        self.step = max(total // 10, 1) if total else 4 << 20
        self.next, self.shown = self.step, -1

    def __call__(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if self.tty and (final or now - self.last >= 0.1):
            print(f"\r{self.line(done, now)}", end="\n" if final else "", file=sys.stderr, flush=True)
            self.last = now
        elif not self.tty and (done >= self.next or (final and done != self.shown)):
            print(self.line(done, now), file=sys.stderr, flush=True)
            self.next, self.shown = done + self.step, done

    def line(self, done: int, now: float) -> str:
        of = f" of {self.total / 2**20:.1f} MiB ({100 * done // self.total}%)" if self.total else ""
        return f"{done / 2**20:.1f} MiB{of}, {done / 2**20 / max(now - self.start, 1e-9):.1f} MiB/s"


def download(source: str, dest: Path) -> int:
    """Stream source into the new file dest, showing progress; returns the bytes written. DataError with one line
    when the server cannot be reached, answers with an error, or the transfer stops before the announced size."""
    hint = ("offline, or the host blocked? From China: HF_ENDPOINT=https://hf-mirror.com python "
            "phase2_lora/download_data.py --source huggingface, or --url with another mirror")
    size = 0
    try:
        request = urllib.request.Request(source, headers={"User-Agent": "download_data.py (urllib)"})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response, open(dest, "xb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            progress = Progress(total)
            while block := response.read(CHUNK):
                f.write(block)
                size += len(block)
                progress(size)
            progress(size, final=True)
    except urllib.error.HTTPError as e:  # before URLError: it is one
        raise DataError(f"{source} answered HTTP {e.code} {e.reason}; {hint}") from None
    except urllib.error.URLError as e:  # no network, unknown host, refused connection, TLS failure
        raise DataError(f"cannot download {source}: {e.reason}; {hint}") from None
    except (OSError, http.client.HTTPException) as e:  # a stall past TIMEOUT, a dropped connection, a full disk
        raise DataError(f"download of {source} failed after {size:,} bytes: {e!r}; {hint}") from None
    if total is not None and size != total:
        raise DataError(f"download of {source} was cut short: {size:,} of {total:,} bytes; run it again")
    return size


def check_data(path: Path, records: int, sha256: str | None) -> tuple[int, str]:
    """(records, sha256) of the file at path, once it is known to be the data set: a JSON list of objects with
    exactly the string fields instruction, input, output, `records` of them (0: any number), whose sha256 is
    `sha256` when one is given. DataError names the first thing that is wrong."""
    try:
        data = path.read_bytes()
    except OSError as e:  # e.g. --output names a folder
        raise DataError(f"cannot read {path}: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        rows = json.loads(data)
    except ValueError as e:  # e.g. an HTML page from a proxy or a captive portal, served with status 200
        raise DataError(f"{path} is not JSON ({e}); the server sent something else (an error page?)") from None
    if not isinstance(rows, list):
        raise DataError(f"{path} holds a JSON {type(rows).__name__}, not the list of records of the data set")
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and row.keys() == FIELDS and all(isinstance(v, str) for v in row.values())):
            raise DataError(f"record {i} of {path} is not an object of exactly the strings instruction, input, "
                            f"output: {json.dumps(row, ensure_ascii=False)[:100]}")
    if records and len(rows) != records:
        raise DataError(f"expected {records:,} records, got {len(rows):,} (if the upstream file has changed, "
                        f"check it and pass --records {len(rows)})")
    if sha256 and digest != sha256:
        raise DataError(f"sha256 mismatch: expected {sha256}, got {digest} (another version of the file, or "
                        f"a damaged copy)")
    return len(rows), digest


# ---------------------------------------------------------------- main

def source_url(args) -> str:
    endpoint = (os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
    return args.url or SOURCES[args.source].format(endpoint=endpoint)


def run(args) -> None:
    out = args.output
    if out.exists() and not args.force:  # already downloaded: check it instead of fetching 44 MB again
        try:
            n, digest = check_data(out, args.records, args.sha256)
        except DataError as e:
            raise DataError(f"{out} exists but is not the expected file: {e}; --force downloads it again") from None
        print(f"{out} is already there and checks out: {n:,} records, sha256 {digest}")
        return
    source = source_url(args)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")  # same folder, so os.replace is an atomic rename
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {source}", file=sys.stderr)
        size = download(source, tmp)
        n, digest = check_data(tmp, args.records, args.sha256)
        os.replace(tmp, out)
    except OSError as e:  # the output folder cannot be created or written
        raise DataError(f"cannot write {out}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already after os.replace; after any failure, nothing is left behind
    print(f"{n:,} records, {size / 2**20:.1f} MiB, sha256 {digest} -> {out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
