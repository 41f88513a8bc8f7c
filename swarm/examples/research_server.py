"""A research MCP server: BM25 search over the bundled corpus, document reads and notes.

Run it over stdio with `python -m swarm.examples.research_server`, or over streamable HTTP on
127.0.0.1 with `python -m swarm.examples.research_server --http --port 8000` (path `/mcp`).
Notes go to a JSONL file in `$SWARM_NOTES_DIR` (default: `swarm-notes` in the temp directory).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field
from typing_extensions import TypedDict

CORPUS_DIR = Path(__file__).parent / "corpus"
NOTES_FILE = "notes.jsonl"

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_STOP = frozenset(
    "a an and are as at be but by can do does for from has have how if in into is it its of on "
    "or s so such t than that the their then there these this to was what when where which while "
    "who why will with without you your".split()
)


def tokenize(text: str) -> list[str]:
    """Lowercase words without stop words, with a plural 's' stripped."""
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP]


def _stem(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


@dataclass(frozen=True, slots=True)
class Doc:
    """One corpus document: its id (the file stem), title line and body."""

    id: str
    title: str
    body: str


class SearchHit(TypedDict):
    """One ranked search result."""

    id: str
    title: str
    snippet: str
    score: float


class DocText(TypedDict):
    """A whole document."""

    id: str
    title: str
    text: str


class NoteRef(TypedDict):
    """The id of a saved note."""

    note_id: str


class Note(TypedDict):
    """A saved note."""

    note_id: str
    title: str
    text: str
    created_at: float


class Corpus:
    """Markdown documents with an Okapi BM25 index (k1=1.5, b=0.75; titles count twice)."""

    K1 = 1.5
    B = 0.75

    def __init__(self, docs: Sequence[Doc]) -> None:
        self.docs = {d.id: d for d in sorted(docs, key=lambda d: d.id)}
        self._tf = {d.id: Counter(tokenize(f"{d.title} {d.title} {d.body}")) for d in docs}
        self._len = {i: sum(tf.values()) for i, tf in self._tf.items()}
        self._avg_len = sum(self._len.values()) / max(1, len(self._len))
        df: Counter[str] = Counter()
        for tf in self._tf.values():
            df.update(tf.keys())
        n = len(docs)
        self._idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    @classmethod
    def load(cls, directory: Path = CORPUS_DIR) -> Corpus:
        """Read every `*.md` file; the first line (without '#') is the title."""
        docs = []
        for path in sorted(directory.glob("*.md")):
            title, _, body = path.read_text(encoding="utf-8").partition("\n")
            docs.append(Doc(path.stem, title.lstrip("#").strip(), body.strip()))
        return cls(docs)

    def score(self, doc_id: str, terms: Sequence[str]) -> float:
        """The BM25 score of one document for already-tokenised query terms."""
        tf, length = self._tf[doc_id], self._len[doc_id]
        total = 0.0
        for term in terms:
            f = tf.get(term, 0)
            if f:
                norm = f + self.K1 * (1 - self.B + self.B * length / self._avg_len)
                total += self._idf[term] * f * (self.K1 + 1) / norm
        return total

    def search(self, query: str, k: int = 3) -> list[SearchHit]:
        """The `k` best-scoring documents; ties are broken by id so results are deterministic."""
        terms = list(dict.fromkeys(tokenize(query)))
        scored = [(round(self.score(i, terms), 4), i) for i in self.docs]
        ranked = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))[:k]
        return [
            SearchHit(id=i, title=self.docs[i].title, snippet=self._snippet(i, terms), score=s)
            for s, i in ranked
        ]

    def _snippet(self, doc_id: str, terms: Sequence[str], limit: int = 240) -> str:
        sentences = _SENTENCE_END.split(" ".join(self.docs[doc_id].body.split()))
        wanted = set(terms)
        start = max(range(len(sentences)), key=lambda i: len(wanted & set(tokenize(sentences[i]))))
        snippet = sentences[start]
        for following in sentences[start + 1 :]:
            if len(snippet) >= limit // 2:
                break
            snippet = f"{snippet} {following}"
        return snippet if len(snippet) <= limit else snippet[: limit - 1].rstrip() + "…"


class NoteStore:
    """Notes appended to a JSONL file, one JSON object a line."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / NOTES_FILE
        self._lock = threading.Lock()

    def save(self, title: str, text: str) -> str:
        """Append a note and return its id."""
        note_id = f"note-{uuid.uuid4().hex[:12]}"
        line = json.dumps({"note_id": note_id, "title": title, "text": text,
                           "created_at": time.time()}, ensure_ascii=False)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
        return note_id

    def list(self) -> list[Note]:
        """Every note, oldest first; a damaged line is skipped."""
        if not self.path.exists():
            return []
        notes: list[Note] = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                notes.append(Note(**json.loads(line)))
            except (ValueError, TypeError):
                continue
        return notes


def default_notes_dir() -> Path:
    """`$SWARM_NOTES_DIR`, else `swarm-notes` under the system temp directory."""
    configured = os.environ.get("SWARM_NOTES_DIR")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "swarm-notes"


_READ = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
_APPEND = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
)


def build_server(corpus_dir: Path | None = None, notes_dir: Path | None = None) -> MCPServer:
    """The research server with its four tools, over a corpus and a notes directory."""
    corpus = Corpus.load(corpus_dir or CORPUS_DIR)
    notes = NoteStore(notes_dir or default_notes_dir())
    server = MCPServer(
        "research",
        instructions="Search and read short articles on agent infrastructure; save notes.",
        log_level="WARNING",
    )

    @server.tool(annotations=_READ)
    def search(query: str, k: Annotated[int, Field(ge=1, le=10)] = 3) -> list[SearchHit]:
        """Search the research corpus; returns up to k documents ranked by BM25 relevance."""
        return corpus.search(query, k)

    @server.tool(annotations=_READ)
    def read_doc(doc_id: str) -> DocText:
        """Read a whole document by the id that search returned."""
        doc = corpus.docs.get(doc_id)
        if doc is None:
            some = ", ".join(list(corpus.docs)[:5])
            raise ToolError(
                f"unknown doc id {doc_id!r}; {len(corpus.docs)} documents, e.g. {some} "
                "(use search to find ids)"
            )
        return DocText(id=doc.id, title=doc.title, text=doc.body)

    @server.tool(annotations=_APPEND)
    def save_note(
        title: Annotated[str, Field(min_length=1, max_length=200)],
        text: Annotated[str, Field(max_length=20_000)],
    ) -> NoteRef:
        """Save a research note; every call appends a new note."""
        return NoteRef(note_id=notes.save(title, text))

    @server.tool(annotations=_READ)
    def list_notes() -> list[Note]:
        """List every saved note, oldest first."""
        return notes.list()

    return server


def main(argv: Sequence[str] | None = None) -> None:
    """Run the server over stdio, or over streamable HTTP with `--http`."""
    parser = argparse.ArgumentParser(prog="python -m swarm.examples.research_server")
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP, not stdio")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1")
    args = parser.parse_args(argv)
    server = build_server()
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.port, streamable_http_path="/mcp")
    else:
        server.run("stdio")


if __name__ == "__main__":
    main()
