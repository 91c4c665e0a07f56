#!/usr/bin/env python3
"""Make the shipped prompt set `shakespeare` from the tiny-shakespeare corpus (public domain).

usage: python3 scripts/make_prompt_set.py INPUT.txt OUT.jsonl

INPUT.txt is data/tinyshakespeare/input.txt of https://github.com/karpathy/char-rnn (sha256
86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed). The rule, so the file can be
made again byte for byte (workflow/cellbench/data/prompts/SOURCE.md states it too):

- the text from the first blank line after character START is cut into speeches at blank
  lines ("NAME:\\nlines...");
- prompt j takes the next SPEECHES[j % len(SPEECHES)] speeches (fewer when they would pass
  MAX_PROMPT_CHARS; a speech longer than that on its own is passed over), then the next speech's
  speaker line ("NAME:\\n"): the model is asked to speak next;
- its output_len is that next speech's length in characters / CHARS_PER_TOKEN (about SmolLM2's
  tokens of Shakespeare: its quality reference is 10,090 characters in 2,851 tokens), rounded,
  between MIN_OUTPUT and MAX_OUTPUT;
- the next prompt starts after that speech; COUNT prompts in all.
Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

INPUT_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
START = 200_000  # clear of the quality texts (characters 0-10,090 and 500,060-516,889)
COUNT = 200
SPEECHES = (1, 3, 2, 6, 1, 4, 10, 2, 5, 1, 8, 3)  # speeches per prompt, in turn: varied prompt lengths
MAX_PROMPT_CHARS = 1000  # with MAX_OUTPUT, fits a context of 512 tokens (max_model_len of the default study)
CHARS_PER_TOKEN = 3.5
MIN_OUTPUT, MAX_OUTPUT = 4, 128


def speeches(text: str) -> list[tuple[int, str]]:
    """(offset, speech) of every speech from START on, a speech being the text between blank lines."""
    offset = text.index("\n\n", START) + 2  # the first speech that starts after START
    found = []
    for part in text[offset:].split("\n\n"):
        if part.strip() and ":\n" in part:
            found.append((offset, part.strip("\n")))
        offset += len(part) + 2
    return found


def prompt_set(text: str) -> tuple[list[dict], int, int]:
    """The prompts, and the character range of the text they came from."""
    parts = speeches(text)
    entries, index = [], 0
    while len(entries) < COUNT:
        want = SPEECHES[len(entries) % len(SPEECHES)]
        taken: list[str] = []
        while len(taken) < want and index + 1 < len(parts):
            speech = parts[index][1]
            speaker = parts[index + 1][1].partition(":\n")[0]  # the line asking for the next speech
            if len("\n\n".join([*taken, speech, speaker])) + 2 > MAX_PROMPT_CHARS:
                if not taken:
                    index += 1  # a speech too long on its own
                    continue
                break
            taken.append(speech)
            index += 1
        if index >= len(parts):
            raise SystemExit("the text ran out before COUNT prompts")
        speaker, _, body = parts[index][1].partition(":\n")
        output_len = min(MAX_OUTPUT, max(MIN_OUTPUT, round(len(body) / CHARS_PER_TOKEN)))
        entries.append({"prompt": "\n\n".join(taken) + f"\n\n{speaker}:\n", "output_len": output_len})
        index += 1  # the next prompt starts after the speech this one asks for
    end = parts[index - 1][0] + len(parts[index - 1][1])
    return entries, parts[0][0], end


def main(argv: list[str]) -> int:
    source, out = Path(argv[1]), Path(argv[2])
    data = source.read_bytes()
    if hashlib.sha256(data).hexdigest() != INPUT_SHA256:
        raise SystemExit(f"{source}: not the tiny-shakespeare input.txt (sha256 differs)")
    entries, start, end = prompt_set(data.decode("utf-8"))
    out.write_text("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries), encoding="utf-8")
    print(f"{out}: {len(entries)} prompts from characters {start:,}-{end:,}, "
          f"sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
