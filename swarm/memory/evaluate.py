"""Recall quality on the labelled set shipped with swarm (`data/recall_set.jsonl`).

The set holds 200 facts (user preferences, team and product knowledge, customer notes, lessons
learned, general knowledge) and 50 questions, each labelled with the fact(s) that answer it and
worded differently from them. `recall_at_k` stores the facts through a `LanceMemoryStore` and asks
every question, as `remember` and `recall` would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarm.memory.longterm import NewMemory

if TYPE_CHECKING:
    from swarm.memory.embed import Embedder
    from swarm.memory.longterm import LanceMemoryStore

RECALL_SET = Path(__file__).parent / "data" / "recall_set.jsonl"


@dataclass(slots=True)
class RecallSet:
    """Facts (id to text) and questions (id, text, the ids of the facts that answer it)."""

    facts: dict[str, str]
    questions: list[tuple[str, str, list[str]]]


def load_recall_set(path: Path = RECALL_SET) -> RecallSet:
    """Read the labelled set."""
    facts: dict[str, str] = {}
    questions: list[tuple[str, str, list[str]]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row["kind"] == "fact":
            facts[row["id"]] = row["text"]
        else:
            questions.append((row["id"], row["text"], list(row["answers"])))
    return RecallSet(facts, questions)


async def recall_at_k(store: LanceMemoryStore, embedder: Embedder, k: int = 5,
                      namespace: str = "eval") -> dict[str, Any]:
    """Store the facts, ask the questions; recall@k is the mean share of each question's
    answering facts found in its top k. Also returns the misses, for a look."""
    rs = load_recall_set()
    ids = list(rs.facts)
    vecs = (await embedder.embed([rs.facts[i] for i in ids])).vectors
    # No deduplication: the set's facts are distinct, and their ids must stay theirs.
    written = await store.add([NewMemory(rs.facts[i], namespace, metadata={"fact": i})
                               for i in ids], vecs, dedup=False)
    by_memory = {mid: fid for (mid, _), fid in zip(written, ids, strict=True)}
    qvecs = (await embedder.embed([q for _, q, _ in rs.questions])).vectors
    total, misses = 0.0, []
    for (qid, text, answers), qv in zip(rs.questions, qvecs, strict=True):
        hits = await store.search(qv, [namespace], k)
        found = {by_memory.get(h.id) for h in hits}
        share = sum(1 for a in answers if a in found) / len(answers)
        total += share
        if share < 1.0:
            misses.append({"question": qid, "text": text, "answers": answers,
                           "got": [by_memory.get(h.id) for h in hits]})
    return {"k": k, "recall": total / len(rs.questions), "questions": len(rs.questions),
            "facts": len(ids), "misses": misses}
