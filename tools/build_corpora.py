"""Rebuild the bundled corpora in ``stages_of_inference/corpora/`` from plain-text sources.

Usage: ``python tools/build_corpora.py SOURCE_DIR``, where SOURCE_DIR holds the Austen novels
(``austen_*.txt``) and Melville's Moby Dick (``mobydick.txt``), as extracted from the Debian
packages ``r-cran-janeaustenr`` and ``r-cran-tokenizers``.

Each text is normalised the same way: the Project Gutenberg header and footer are removed
(Moby Dick only; the Austen sources carry none), hard line breaks inside a paragraph are joined
with a space, paragraphs are separated by one blank line, and the result is compressed with xz.
"""

from __future__ import annotations

import lzma
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "stages_of_inference" / "corpora"


def strip_gutenberg(text: str) -> str:
    """Keep the text between the Gutenberg START marker and the 'End of Project Gutenberg' line."""
    start = re.search(r"^\*\*\* ?START OF TH(IS|E) PROJECT GUTENBERG.*$", text, flags=re.M)
    end = re.search(r"^(End of (the )?Project Gutenberg|\*\*\* ?END OF TH(IS|E) PROJECT GUTENBERG)",
                    text, flags=re.M)
    if start is None or end is None:
        raise ValueError("no Project Gutenberg START/END markers found")
    body = text[start.end():end.start()]
    # The producer credit right after the marker belongs to the Gutenberg edition, not the book.
    body = re.sub(r"^\s*Produced by[^\n]*\n", "", body, count=1)
    # So does the transcriber's note on how the etext was assembled (Moby Dick: before ETYMOLOGY).
    body = re.sub(r"Original Transcriber's Notes:.*?(?=^ETYMOLOGY)", "", body, count=1,
                  flags=re.S | re.M)
    return body


def unwrap(text: str) -> str:
    """Join hard-wrapped lines within paragraphs; one blank line between paragraphs."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n")
    paragraphs = re.split(r"\n\s*\n", text)
    joined = (" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)
    return "\n\n".join(p for p in joined if p) + "\n"


def main(source: Path) -> None:
    """Write the bundled corpora (unwrapped, Gutenberg boilerplate stripped) from ``source``."""
    for path in sorted(source.glob("austen_*.txt")) + [source / "mobydick.txt"]:
        text = path.read_text(encoding="utf-8")
        if path.name == "mobydick.txt":
            text = strip_gutenberg(text)
        text = unwrap(text)
        (OUT / (path.stem + ".txt.xz")).write_bytes(lzma.compress(text.encode("utf-8"), preset=9))
        print(f"{path.name}: {len(text):,} characters")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
