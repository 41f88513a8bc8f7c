"""The research MCP server through MCPToolSource over the in-memory transport."""

from __future__ import annotations

import json

import pytest

from swarm.examples.research_server import CORPUS_DIR, Corpus, build_server, tokenize
from swarm.tools.interface import ToolContext
from swarm.tools.mcp import MCPToolSource

CTX = ToolContext(task_id="t1", agent="researcher", session_id="s1")


@pytest.fixture
async def research(tmp_path):
    src = MCPToolSource("research", build_server(notes_dir=tmp_path), timeout_s=10)
    await src.start()
    yield src
    await src.aclose()


def _hits(result) -> list[dict]:
    assert not result.is_error, result.content
    return result.structured["result"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("how does vLLM reuse the KV cache for a shared prompt prefix", "vllm-prefix-caching"),
        ("restart a crashed actor with max_restarts", "ray-actors"),
        ("retry a payment safely with an Idempotency-Key header", "idempotency-keys"),
        ("agent card discovery between agents from different vendors", "a2a-protocol"),
        ("all-reduce of split weight matrices across GPUs", "tensor-parallelism"),
        ("gen_ai.usage.input_tokens span attributes", "otel-genai-conventions"),
        ("resume a workflow from a checkpoint after a crash", "durable-execution"),
        ("autoscaling replicas behind an HTTP proxy", "ray-serve"),
    ],
)
async def test_search_ranks_the_right_document_first(research, query, expected):
    hits = _hits(await research.call("search", {"query": query, "k": 3}, CTX))
    assert hits[0]["id"] == expected
    assert len(hits) == 3
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert hits[0]["score"] > hits[1]["score"]


async def test_search_results_carry_title_snippet_and_are_deterministic(research):
    args = {"query": "prefix caching", "k": 2}
    first = _hits(await research.call("search", args, CTX))
    again = _hits(await research.call("search", args, CTX))
    assert first == again
    top = first[0]
    assert set(top) == {"id", "title", "snippet", "score"}
    assert top["title"] == "vLLM automatic prefix caching"
    assert "prefix caching" in top["snippet"].lower()


async def test_search_with_no_matching_words_returns_nothing(research):
    assert _hits(await research.call("search", {"query": "the and of zyxxy"}, CTX)) == []


async def test_search_rejects_out_of_range_k(research):
    result = await research.call("search", {"query": "ray", "k": 50}, CTX)
    assert result.is_error and "less than or equal to 10" in result.content


async def test_read_doc_returns_the_whole_document(research):
    result = await research.call("read_doc", {"doc_id": "kv-cache"}, CTX)
    assert not result.is_error
    doc = result.structured
    assert doc["id"] == "kv-cache"
    assert doc["title"] == "The KV cache in transformer inference"
    assert "Prefill" in doc["text"] and len(doc["text"].split()) > 150
    assert json.loads(result.content) == doc


async def test_read_doc_with_unknown_id_lists_valid_ids(research):
    result = await research.call("read_doc", {"doc_id": "ray-actor"}, CTX)
    assert result.is_error
    assert "unknown doc id 'ray-actor'" in result.content
    assert "a2a-protocol" in result.content and "12 documents" in result.content


async def test_notes_roundtrip_through_the_jsonl_file(research, tmp_path):
    assert _hits(await research.call("list_notes", {}, CTX)) == []
    first = await research.call("save_note", {"title": "KV", "text": "128 KiB per token"}, CTX)
    second = await research.call("save_note", {"title": "TP", "text": "NVLink inside a node"}, CTX)
    ids = [first.structured["note_id"], second.structured["note_id"]]
    assert len(set(ids)) == 2 and all(i.startswith("note-") for i in ids)
    notes = _hits(await research.call("list_notes", {}, CTX))
    assert [(n["note_id"], n["title"], n["text"]) for n in notes] == [
        (ids[0], "KV", "128 KiB per token"), (ids[1], "TP", "NVLink inside a node")]
    lines = (tmp_path / "notes.jsonl").read_text().splitlines()
    assert [json.loads(line)["note_id"] for line in lines] == ids


async def test_save_note_rejects_an_empty_title(research, tmp_path):
    result = await research.call("save_note", {"title": "", "text": "x"}, CTX)
    assert result.is_error and "title" in result.content
    assert not (tmp_path / "notes.jsonl").exists()


async def test_tool_annotations_map_to_specs(research):
    specs = {s.name: s for s in await research.list_tools()}
    assert set(specs) == {"search", "read_doc", "save_note", "list_notes"}
    for name in ("search", "read_doc", "list_notes"):
        assert (specs[name].read_only, specs[name].destructive, specs[name].idempotent) == (
            True, False, True)
    note = specs["save_note"]
    assert (note.read_only, note.destructive, note.idempotent) == (False, False, False)
    assert specs["search"].parameters["required"] == ["query"]
    assert specs["search"].source == "research"


def test_corpus_has_twelve_titled_documents_named_by_stem():
    corpus = Corpus.load()
    assert len(corpus.docs) == 12
    assert set(corpus.docs) == {p.stem for p in CORPUS_DIR.glob("*.md")}
    assert all(d.title and len(d.body.split()) > 150 for d in corpus.docs.values())


def test_tokenize_lowercases_drops_stop_words_and_plurals():
    assert tokenize("The Actors and their GPUs, in Ray's cluster") == [
        "actor", "gpu", "ray", "cluster"]
