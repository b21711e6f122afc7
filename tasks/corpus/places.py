"""Where a source's entries may lie: a manifest line must not make a worker request an arbitrary
place (a cloud metadata endpoint, another bucket, a file outside the corpus).

Each listed candidate carries the root its source's own entries lie under (a folder source; a
NeMo or Lhotse manifest's folder; a fairseq .tsv's root line, where that is in the same place as
the .tsv). `misplaced` says why an entry lies outside that root and every `corpus.allowed_roots`,
judged on the names alone, so that the probe task rejects it without fetching it.
"""

from __future__ import annotations

from infra.paths import is_remote_url, lies_under, parent_of
from tasks.corpus.manifest import Candidate

NAME_BREAKERS = {"\t": "a tab", "\n": "a line break", "\r": "a carriage return"}


def tsv_own_root(path: str, root: str) -> str:
    """Where a fairseq .tsv's entries lie by default: its root line (resolved, `root`) where that
    is the same kind of place as the .tsv (both local, or both in the same bucket), else the
    .tsv's folder, so that entries under a root line elsewhere must be allowed by `corpus.allowed_roots`."""
    folder = parent_of(path)
    if is_remote_url(root) != is_remote_url(folder):
        return folder
    if is_remote_url(root) and not lies_under(root, _bucket_of(folder)):
        return folder
    return root


def _bucket_of(url: str) -> str:
    """`s3://bucket` of `s3://bucket/any/prefix` (the protocol and the first path component)."""
    protocol, _, rest = url.partition("://")
    return f"{protocol}://{rest.split('/', 1)[0]}"


def misplaced(candidate: Candidate, allowed_roots: tuple[str, ...]) -> tuple[str, str] | None:
    """(reason, detail) when intake must reject an entry without reading it: a path outside its
    source's root and every allowed root, or one that fairseq's .tsv and our label files cannot
    hold (a tab or a line break); None when it may be read."""
    for character, name in NAME_BREAKERS.items():
        if character in candidate.path:
            return "bad file name", f"the path holds {name}, which a fairseq .tsv line cannot hold"
    if not any(lies_under(candidate.path, root) for root in (candidate.root, *allowed_roots)):
        allowed = f" nor any of corpus.allowed_roots {list(allowed_roots)}" if allowed_roots else ""
        return "outside the source", (
            f"resolves to {candidate.path}, under neither the source's root {candidate.root}{allowed}: not fetched "
            "(name its folder or URL prefix in corpus.allowed_roots to allow it)"
        )
    return None
