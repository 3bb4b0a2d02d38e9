"""Deterministic sentence splitting: a long caption -> short caption and subcaptions.

The rule (method section 1 leaves it to us):
1. Line breaks end sentences (DCI and some ShareGPT4V captions put one statement per line).
2. Inside a line, a sentence ends at ".", "!" or "?" (with any closing quotes or brackets)
   followed by white space and then a character that is not a lower-case letter, unless the
   word before the "." is a known abbreviation ("e.g.", "Dr.", "St.", ...) or a single
   capital letter (an initial such as "J.").
3. Sentences are stripped; those with no letter or digit are dropped.
The short caption is the first sentence; the subcaptions are the first `max_subcaptions`
sentences (the first included). Captions that come with their own short caption or
subcaptions (a shard's json) keep them.
"""
import re
from typing import List, Optional, Sequence, Tuple

DEFAULT_MAX_SUBCAPTIONS = 8

ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e approx no fig mt ft inc ltd co dept est".split()
)

# A candidate end: terminal punctuation, optional closers, white space, then no lower-case letter.
_CANDIDATE = re.compile(r"[.!?]+[\"')\]]*(?=\s+[^a-z\s])")
_WORD_BEFORE = re.compile(r"(\S+)$")


def _is_abbreviation(text: str, end: int) -> bool:
    """Whether the "." at text[end] closes an abbreviation or an initial rather than a sentence."""
    match = _WORD_BEFORE.search(text[: end + 1])
    if match is None:
        return False
    word = match.group(1).lstrip("(\"'[").rstrip(".").lower()
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha() and text[end - 1].isupper())


def split_sentences(text: str) -> List[str]:
    """Split a caption into sentences by the documented rule (deterministic, no model)."""
    sentences = []
    for line in text.splitlines():
        start = 0
        for match in _CANDIDATE.finditer(line):
            if line[match.start()] == "." and match.end() - match.start() == 1 and _is_abbreviation(line, match.start()):
                continue
            sentences.append(line[start:match.end()])
            start = match.end()
        sentences.append(line[start:])
    return [s.strip() for s in sentences if any(c.isalnum() for c in s)]


def caption_fields(
    caption: str,
    short_caption: Optional[str] = None,
    subcaptions: Optional[Sequence[str]] = None,
    max_subcaptions: int = DEFAULT_MAX_SUBCAPTIONS,
) -> Tuple[str, str, List[str]]:
    """(long caption, short caption, subcaptions) of a sample.

    Missing short caption and subcaptions are derived with `split_sentences`; subcaptions are
    cut to `max_subcaptions`. A caption with no sentence keeps itself as its short caption and
    has no subcaption.
    """
    caption = caption.strip()
    sentences = None
    if short_caption is None or subcaptions is None:
        sentences = split_sentences(caption)
    if short_caption is None:
        short_caption = sentences[0] if sentences else caption
    if subcaptions is None:
        subcaptions = sentences
    subcaptions = [s.strip() for s in subcaptions if s and s.strip()][:max_subcaptions]
    return caption, short_caption.strip(), subcaptions
