"""Partial characters: a sample cut inside a multi-byte character loses that character's bytes,
and nothing else, for byte-level BPE and byte-fallback tokenizers."""

from __future__ import annotations

import os

import engines
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from batchgen.config import SamplingConfig
from batchgen.engine.logprobs import RowLogprobs
from batchgen.engine.partial_char import (
    BYTE_LEVEL_ALPHABET,
    PartialCharTrimmer,
    byte_scheme,
    partial_length,
)
from batchgen.store.rows import THINK_TAGS, split_reasoning

# Hebrew (2-byte characters), CJK (3 bytes), an emoji (4 bytes), mixed with ASCII.
TEXTS = ["שלום חיים", "中文字符", "ok 😀", "ab שלום 😀 中 x"]
REPLACEMENT = "\ufffd"


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def _proper_prefixes() -> set[bytes]:
    """Every proper prefix of the UTF-8 encoding of every code point but the surrogates."""
    prefixes = set()
    for code in range(0x80, 0x110000):
        if not 0xD800 <= code <= 0xDFFF:
            data = chr(code).encode()
            prefixes.update(data[:k] for k in range(1, len(data)))
    return prefixes


def test_byte_level_alphabet_is_gpt2s():
    assert {c: b for b, c in bytes_to_unicode().items()} == BYTE_LEVEL_ALPHABET


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", 0),
        (b"ab", 0),
        (b"\xd7", 1),
        (b"ab\xd7", 1),
        (b"\xe4\xb8", 2),
        (b"\xe4\xb8\xad\xe4", 1),
        (b"\xf0\x9f\x98", 3),
        (b"\xf0\x9f\x98\x80", 0),
        ("\ufffd".encode(), 0),  # the replacement character itself, whole
        (b"\x80", 0),  # a lone continuation byte: never the start of a character
        (b"\xe0\x80", 0),  # overlong
        (b"\xed\xa0", 0),  # a surrogate
        (b"\xf4\x90", 0),  # above U+10FFFF
        (b"\xc0", 0),
        (b"\xf5", 0),
    ],
)
def test_partial_length(data, expected):
    assert partial_length(data) == expected


def test_partial_length_is_the_unfinished_well_formed_suffix():
    prefixes = _proper_prefixes()
    tails = [bytes([a]) for a in range(256)] + [
        bytes([a, b]) for a in range(256) for b in range(256)
    ]
    tails += [
        bytes([a, b, c]) for a in range(0xE0, 0xF5) for b in range(0x80, 0xC0) for c in range(256)
    ]
    for data in tails:
        expected = max((k for k in range(1, len(data) + 1) if data[-k:] in prefixes), default=0)
        assert partial_length(data) == expected, data
        if expected:
            # Decoding puts exactly one U+FFFD for the unfinished character.
            lossy = data.decode("utf-8", "replace")
            assert lossy == data[:-expected].decode("utf-8", "replace") + REPLACEMENT


def test_smollm2_is_byte_level(smol_tokenizer):
    assert byte_scheme(smol_tokenizer) == "byte_level"


@pytest.mark.parametrize("text", TEXTS)
def test_cut_at_every_token_keeps_whole_characters_only(smol_tokenizer, text):
    trimmer = PartialCharTrimmer(smol_tokenizer)
    ids = ids_of(smol_tokenizer, text)
    inside = 0
    for k in range(1, len(ids) + 1):
        raw = decode(smol_tokenizer, ids[:k])
        trimmed = trimmer.trim(ids[:k], raw)
        inside += raw.endswith(REPLACEMENT)
        assert REPLACEMENT not in trimmed
        # The whole characters the cut bytes hold: where the decoding departs from the text.
        assert trimmed == os.path.commonprefix([text, raw])
        if not raw.endswith(REPLACEMENT):
            assert trimmed == raw  # a cut between characters changes nothing
    assert inside  # the tokenizer does split some of these characters


def test_whole_characters_in_the_cut_token_stay(smol_tokenizer):
    trimmer = PartialCharTrimmer(smol_tokenizer)
    ids = ids_of(smol_tokenizer, "שלום חיים")
    # One token holds the last "י" of "חיי" and the first byte of "ם".
    cut = next(k for k in range(len(ids)) if decode(smol_tokenizer, ids[:k]).endswith("יי\ufffd"))
    assert decode(smol_tokenizer, ids[cut - 1 : cut]) == "י" + REPLACEMENT
    assert trimmer.trim(ids[:cut], decode(smol_tokenizer, ids[:cut])) == "שלום חיי"


@pytest.mark.parametrize("text", ["ok \ufffd", "\ufffd", "a\ufffd\ufffd"])
def test_a_replacement_character_the_model_wrote_stays(smol_tokenizer, text):
    trimmer = PartialCharTrimmer(smol_tokenizer)
    ids = ids_of(smol_tokenizer, text)
    assert trimmer.trim(ids, decode(smol_tokenizer, ids)) == text


def test_only_the_cut_replacement_character_goes(smol_tokenizer):
    trimmer = PartialCharTrimmer(smol_tokenizer)
    # The replacement character the model wrote, then the first byte of a Hebrew letter.
    cut = ids_of(smol_tokenizer, REPLACEMENT) + [smol_tokenizer.convert_tokens_to_ids("×")]
    assert decode(smol_tokenizer, cut) == REPLACEMENT * 2
    assert trimmer.trim(cut, decode(smol_tokenizer, cut)) == REPLACEMENT


def test_special_tokens_after_the_cut_add_no_bytes(smol_tokenizer):
    trimmer = PartialCharTrimmer(smol_tokenizer)
    cut = ids_of(smol_tokenizer, "שלום חיים")[:-1] + [smol_tokenizer.eos_token_id]
    assert trimmer.trim(cut, decode(smol_tokenizer, cut)) == "שלום חיי"


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-like SentencePiece BPE: pieces for "a", "b" and spaces, every other character
    spelled in ``<0xHH>`` byte tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "a", "b", "ab", "▁ab"]:
        vocab[piece] = len(vocab)
    bpe = models.BPE(vocab, [("a", "b"), ("▁", "ab")], unk_token="<unk>", byte_fallback=True)
    backend = Tokenizer(bpe)
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens([AddedToken(t, special=True) for t in ["<unk>", "<s>", "</s>"]])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_byte_fallback_cut_at_every_token():
    tok = byte_fallback_tokenizer()
    trimmer = PartialCharTrimmer(tok)
    ids = ids_of(tok, "ab 中中 ab")
    assert trimmer.scheme == "byte_fallback"
    assert tok.convert_ids_to_tokens(ids)[2:5] == ["<0xE4>", "<0xB8>", "<0xAD>"]
    # ByteFallback spoils a whole run of byte tokens that is not valid UTF-8, "中" included.
    assert decode(tok, ids[:6]) == "ab " + REPLACEMENT * 4
    expected = ["ab", "ab ", "ab ", "ab ", "ab 中", "ab 中", "ab 中", "ab 中中", "ab 中中 ab"]
    trimmed = [trimmer.trim(ids[:k], decode(tok, ids[:k])) for k in range(1, len(ids) + 1)]
    assert trimmed == expected


def test_wordpiece_is_left_alone():
    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "\ufffd": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    trimmer = PartialCharTrimmer(tok)
    assert trimmer.scheme is None
    assert trimmer.trim([1, 2], "a \ufffd") == "a \ufffd"


def load(path, sampling: SamplingConfig, logprobs: bool = False):
    return engines.load(path, sampling, logprobs=logprobs)


def test_engine_drops_the_cut_character_and_counts_its_tokens(tiny_models):
    engine, tok = load(tiny_models["chat"], SamplingConfig(max_new_tokens=16), logprobs=True)
    ids = ids_of(tok, "שלום חיים")[:-1]
    scores = RowLogprobs([-float(i) for i in range(len(ids))], None, None)
    sample = engine.sample(ids, scores)
    assert (sample.text, sample.finish_reason) == ("שלום חיי", "length")
    assert sample.completion_tokens == len(ids)
    assert sample.logprobs == scores.chosen


def test_engine_keeps_what_eos_ends(tiny_models):
    engine, tok = load(tiny_models["chat"], SamplingConfig(max_new_tokens=16))
    ids = ids_of(tok, "שלום חיים")[:-1] + [tok.eos_token_id]
    sample = engine.sample(ids)
    # The model ended the text there itself: the bytes it wrote stay, as decoded.
    assert (sample.text, sample.finish_reason) == ("שלום חיי" + REPLACEMENT, "stop")


def test_engine_trims_with_ignore_eos(tiny_models):
    engine, tok = load(tiny_models["chat"], SamplingConfig(max_new_tokens=16, ignore_eos=True))
    ids = ids_of(tok, "שלום חיים")[:-1] + [tok.eos_token_id]
    sample = engine.sample(ids)
    assert (sample.text, sample.finish_reason) == ("שלום חיי", "length")
    assert sample.completion_tokens == len(ids)


def test_stop_string_cut_leaves_no_partial_character(tiny_models):
    engine, tok = load(tiny_models["chat"], SamplingConfig(max_new_tokens=16, stop=[" "]))
    # Cut by the limit inside "ם" with no stop string in the text: the limit's cut.
    ids = ids_of(tok, "חיים")[:-1]
    assert engine.sample(ids).text == "חיי"
    # A stop string ends the text before the cut character's bytes.
    ids = ids_of(tok, "חיים 😀")[:-1]
    sample = engine.sample(ids)
    assert (sample.text, sample.finish_reason) == ("חיים", "stop")


def test_reasoning_cut_inside_a_character_ends_whole(tiny_models):
    engine, tok = load(tiny_models["chat"], SamplingConfig(max_new_tokens=16))
    ids = ids_of(tok, "<think>שלום חיים")[:-1]
    reasoning, response, truncated = split_reasoning("q", engine.sample(ids).text, THINK_TAGS)
    assert (reasoning, response, truncated) == ("שלום חיי", "", True)
