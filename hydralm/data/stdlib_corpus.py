"""A real-text corpus that every machine has, for runs that may not download: the Python standard library's
own sources (code, comments and docstrings), concatenated in sorted path order into one UTF-8 file.

    python -m hydralm.data.stdlib_corpus data/stdlib.txt [max_chars]

Deterministic for a given Python version (the file records nothing else). Code is not prose: figures measured
on it (losses, MTP acceptance) say how a model learns real text with long-range structure, not how it reads
natural language.
"""

import glob
import os
import sys
import sysconfig

DEFAULT_MAX_CHARS = 30_000_000


def stdlib_sources() -> list:
    """The standard library's .py files (site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(f for f in files if "site-packages" not in f.split(os.sep))


def write_stdlib_corpus(path: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Write the first `max_chars` characters of the concatenated sources to `path` (reused when already there
    at that size) and return `path`."""
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 1:
        raise ValueError(f"max_chars must be an int >= 1, got {max_chars!r}")
    if os.path.isfile(path) and os.path.getsize(path) >= max_chars:
        return path
    parts, size = [], 0
    for source in stdlib_sources():
        with open(source, encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts.append(text[: max_chars - size])
        size += len(parts[-1])
        if size >= max_chars:
            break
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(parts))
    os.replace(tmp, path)  # atomic: a killed run never leaves a short corpus that looks complete
    return path


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m hydralm.data.stdlib_corpus <out.txt> [max_chars]")
    print(write_stdlib_corpus(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else DEFAULT_MAX_CHARS))
