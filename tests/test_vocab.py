import json

import pytest

from data.vocab import SPECIALS, Vocab, VocabError


def test_build_orders_by_frequency_and_keeps_specials_first():
    v = Vocab.build(["x ^ { 2 }", "x + y", "x"], min_count=1)
    assert tuple(v.tokens[:4]) == SPECIALS
    assert v.tokens[4] == "x"  # most frequent first
    assert v.pad_id == 0 and v.tokens[v.bos_id] == "<s>" and v.tokens[v.eos_id] == "</s>"


def test_min_count_maps_rare_tokens_to_unk():
    v = Vocab.build(["a b", "a c", "a"], min_count=2)
    assert "b" not in v.tokens
    assert v.encode("a b") == [v.index["a"], v.unk_id]
    assert v.unknown("a b c") == ["b", "c"]


def test_decode_stops_at_eos_and_skips_specials():
    v = Vocab.build(["\\frac { a } { b }"])
    ids = [v.bos_id] + v.encode("\\frac { a } { b }") + [v.eos_id] + v.encode("a")
    assert v.decode(ids) == "\\frac { a } { b }"


def test_save_load_roundtrip(tmp_path):
    v = Vocab.build(["\\alpha _ { 1 }", "é ∑"])
    v.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == v


def test_extended_keeps_old_ids():
    v = Vocab.build(["a b"])
    w = v.extended(["b", "c", "d", "c"])
    assert w.tokens[:len(v)] == v.tokens and w.tokens[len(v):] == ["c", "d"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "'tokens' list"),
    (json.dumps({"version": 1, "tokens": ["a", "b"]}), "must start with"),
    (json.dumps({"version": 1, "tokens": list(SPECIALS) + ["a", "a"]}), "duplicate"),
    (json.dumps({"version": 1, "tokens": list(SPECIALS) + ["a b"]}), "invalid token"),
    (json.dumps({"version": 7, "tokens": list(SPECIALS)}), "version"),
])
def test_malformed_files_fail_clearly(tmp_path, content, message):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(VocabError, match=message) as e:
        Vocab.load(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(VocabError, match="not found"):
        Vocab.load(tmp_path / "nope.json")
