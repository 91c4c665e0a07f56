"""The quality texts: chunks of the reference passage and cell.json's entry, checked by hand."""

from cellbench import paths, quality_texts

ON = {"prompts": 32, "max_tokens": 32, "chunk_chars": 1200}


def test_speeches_are_packed_into_chunks_cut_at_blank_lines():
    text = "A:\nx\n\nB:\nyy\n\nC:\nzzz\n"
    # "A:\nx" (4) + blank line (2) + "B:\nyy" (5) = 11 fits 12; adding "C:\nzzz" (6) would be 19.
    assert quality_texts.split_chunks(text, 12) == ["A:\nx\n\nB:\nyy", "C:\nzzz"]
    assert quality_texts.split_chunks(text, 10) == ["A:\nx", "B:\nyy", "C:\nzzz"]
    assert quality_texts.split_chunks(text, 100) == ["A:\nx\n\nB:\nyy\n\nC:\nzzz"]


def test_a_speech_longer_than_a_chunk_is_cut_at_line_ends_into_chunks_of_its_own():
    text = "A:\nx\n\nB:\nabcdefgh\nij\n\nC:\nz"
    # "B:\nabcdefgh\nij" (14) > 6: lines "B:", "abcdef|gh" (a line over 6 cut at 6), "gh\nij" packed.
    assert quality_texts.split_chunks(text, 6) == ["A:\nx", "B:", "abcdef", "gh\nij", "C:\nz"]


def test_the_reference_passage_in_default_chunks():
    text = quality_texts.load_reference()
    chunks = quality_texts.split_chunks(text, 1200)
    assert all(0 < len(chunk) <= 1200 for chunk in chunks) and len(chunks) == 10
    # Cut only at blank lines: the chunks are the passage without its final newline and the
    # blank line between each two chunks.
    assert "\n\n".join(chunks) == text.removesuffix("\n")
    assert quality_texts.reference_bytes(chunks) == 10090 - 1 - 2 * (len(chunks) - 1)
    assert quality_texts.reference_bytes(["é"]) == 2  # bytes, not characters


def test_cell_entry_only_for_the_measured_round_of_a_cell_with_quality_on():
    entry = quality_texts.cell_entry({**ON, "prompts": 3, "max_tokens": 7}, 1)
    assert entry["prompts"] == quality_texts.load_prompts()[:3] and entry["max_tokens"] == 7
    assert entry["prompts"][0].startswith("Nurse:\nJesu, what haste?")
    assert entry["chunks"] == quality_texts.split_chunks(paths.QUALITY_REFERENCE.read_text(), 1200)
    assert entry["reference_bytes"] == quality_texts.reference_bytes(entry["chunks"])
    assert quality_texts.cell_entry(ON, 2) is None
    assert quality_texts.cell_entry(False, 1) is None


def test_the_shipped_texts_hold_what_the_issue_asks():
    assert len(quality_texts.load_prompts()) == 64
    assert len(quality_texts.load_reference()) == 10090
