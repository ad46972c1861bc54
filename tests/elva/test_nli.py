"""NLI pair reader: SimCSE csv, tsv and jsonl, the writer round trip, and file:line errors."""
import json

import pytest

from elva.data.nli import NliPair, load_nli_pairs, write_nli_pairs


def test_simcse_csv_with_quoted_commas(tmp_path):
    path = tmp_path / "nli_for_simcse.csv"
    path.write_text('sent0,sent1,hard_neg\n"A man, smiling, waves.",A man waves.,Nobody waves.\nTwo dogs play.,Dogs play.,Cats sleep.\n')
    pairs = load_nli_pairs(path)
    assert pairs == [
        NliPair("A man, smiling, waves.", "A man waves.", "Nobody waves.", f"{path}:2"),
        NliPair("Two dogs play.", "Dogs play.", "Cats sleep.", f"{path}:3"),
    ]


def test_tsv_without_hard_negatives_and_jsonl(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("sent0\tsent1\nA cat.\tA kitten.\n\n")
    assert load_nli_pairs(tsv) == [NliPair("A cat.", "A kitten.", None, f"{tsv}:2")]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"sent0": "A", "sent1": "B", "hard_neg": "C"}) + "\n" + json.dumps({"sent0": "D", "sent1": "E"}) + "\n")
    assert [(p.anchor, p.positive, p.hard_negative) for p in load_nli_pairs(jsonl)] == [("A", "B", "C"), ("D", "E", None)]


def test_write_then_read_round_trip(tmp_path):
    pairs = [NliPair("a\ttab? no: a, comma", "b", "c"), NliPair('quote "x"', "y", "z")]
    path = tmp_path / "out.tsv"
    write_nli_pairs(path, pairs)
    assert [(p.anchor, p.positive, p.hard_negative) for p in load_nli_pairs(path)] == [(p.anchor, p.positive, p.hard_negative) for p in pairs]
    with pytest.raises(ValueError, match="either every pair has a hard negative or none does"):
        write_nli_pairs(path, [NliPair("a", "b", "c"), NliPair("d", "e")])


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.csv", "sent0,hard_neg\nA,B\n", r":1: header lacks column\(s\) sent1"),
        ("bad.csv", "sent0,sent1,hard_neg\nA,B,C\nD,E\n", r":3: expected 3 fields \(sent0, sent1, hard_neg\), got 2"),
        ("bad.tsv", "sent0\tsent1\tfoo\nA\t\tx\n", r":2: sent1 must be a non-empty string, got ''"),
        ("bad.jsonl", '{"sent0": "A", "sent1": "B"}\n{"sent0": "A", \n', r":2: malformed JSON"),
        ("bad.jsonl", '{"sent0": "A", "sent1": "B"}\n\n{"sent1": "B"}\n', r":3: missing required field\(s\) sent0"),
        ("bad.txt", "", r": unknown NLI pair format '.txt'"),
    ],
)
def test_errors_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{path}{message}"):
        load_nli_pairs(path)
