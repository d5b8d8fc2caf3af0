import random

import pytest
import tokenizers

from tests.factories import tiny_tokenizer
from tokenfactory.engine.text import TextStream
from tokenfactory.engine.tokenizer import Tokenizer

PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


def stream_text(tok, text, stop=(), chunk=1, prompt=PROMPT):
    """Push `text`'s tokens `chunk` at a time; return the stream, the emitted pieces, the stop."""
    ids = tok.encode(text, add_special_tokens=False)
    stream = TextStream(tok, tok.encode(prompt, add_special_tokens=False), stop)
    pieces, stop_hit = [], None
    for i in range(0, len(ids), chunk):
        piece, matched = stream.push(ids[i : i + chunk])
        pieces.append(piece)
        if matched is not None:
            stop_hit = matched
            break
    pieces.append(stream.finish())
    return stream, pieces, stop_hit


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
@pytest.mark.parametrize("text", ["The factory 🏭 makes 工厂 tokens 🔥🔥.", "漢字とカタカナ", " leading space", "a\n\n  b"])
def test_streamed_text_equals_full_decode(tok, text, chunk):
    stream, pieces, stop = stream_text(tok, text, chunk=chunk)
    assert "".join(pieces) == text == stream.text
    assert stop is None
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_character_waits_for_its_last_byte(tok):
    ids = tok.encode("🏭", add_special_tokens=False)
    assert len(ids) > 1  # the emoji spans several byte tokens
    stream = TextStream(tok, tok.encode("x"))
    assert [stream.push([i])[0] for i in ids] == [""] * (len(ids) - 1) + ["🏭"]


def test_incomplete_bytes_at_the_end_are_released_by_finish(tok):
    first_byte = tok.encode("🏭", add_special_tokens=False)[0]
    stream = TextStream(tok, tok.encode("x"))
    assert stream.push([first_byte]) == ("", None)
    assert stream.finish() == "\ufffd"
    assert stream.finish() == ""


def test_invalid_bytes_are_not_held_forever(tok):
    first_byte = tok.encode("🏭", add_special_tokens=False)[0]
    stream = TextStream(tok, tok.encode("x"))
    emitted = "".join(stream.push([first_byte])[0] for _ in range(20))
    assert "\ufffd" in emitted


def test_leading_space_after_the_prompt_is_kept(tok):
    stream = TextStream(tok, tok.encode("Hello"))
    assert stream.push(tok.encode(" world", add_special_tokens=False)) == (" world", None)


def test_special_tokens_are_skipped_or_kept(tok):
    ids = tok.encode("done<|im_end|>", add_special_tokens=False)
    assert TextStream(tok, [1]).push(ids)[0] == "done"
    assert TextStream(tok, [1], skip_special_tokens=False).push(ids)[0] == "done<|im_end|>"


def test_stop_string_spanning_tokens_split_across_pushes(tok):
    text = "Tokens flow. STOP and nothing more"
    assert len(tok.encode("STOP", add_special_tokens=False)) > 1
    stream, pieces, stop = stream_text(tok, text, stop=("STOP",))
    assert stop == "STOP"
    assert "".join(pieces) == stream.text == "Tokens flow. "
    assert all("S" not in p for p in pieces)  # no partial stop prefix ever left the stream
    assert stream.push(tok.encode(" more", add_special_tokens=False)) == ("", None)


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_stop_at_the_very_start(tok, chunk):
    stream, pieces, stop = stream_text(tok, "STOP right away", stop=("STOP",), chunk=chunk)
    assert stop == "STOP"
    assert "".join(pieces) == stream.text == ""


def test_stop_inside_one_token(tok):
    assert len(tok.encode(" factory", add_special_tokens=False)) == 1
    stream, pieces, stop = stream_text(tok, "the factory", stop=("act",))
    assert (stop, "".join(pieces)) == ("act", "the f")


def test_earliest_stop_wins(tok):
    stream, pieces, stop = stream_text(tok, "one two three", stop=("three", "two"), chunk=100)
    assert (stop, stream.text) == ("two", "one ")


def test_held_prefix_is_released_when_it_stops_matching(tok):
    stream, pieces, stop = stream_text(tok, "ST is not STO nor STOPP", stop=("STOP!",))
    assert stop is None
    assert "".join(pieces) == stream.text == "ST is not STO nor STOPP"
    # The held-back "ST" came out only once it could no longer start "STOP!".
    first_st = next(i for i, p in enumerate(pieces) if "ST" in p)
    assert pieces[first_st].startswith("ST")


def test_partial_stop_at_the_end_is_released_by_finish(tok):
    stream = TextStream(tok, [1], stop=("<END>",))
    emitted, stop = stream.push(tok.encode("ok <EN", add_special_tokens=False))
    assert (emitted, stop) == ("ok ", None)
    assert stream.finish() == "<EN"
    assert stream.text == "ok <EN"


def test_stop_completed_by_the_last_held_bytes(tok):
    # The stop string ends with an emoji whose bytes complete only at the end of the stream.
    ids = tok.encode("go 🏭", add_special_tokens=False)
    stream = TextStream(tok, [1], stop=("🏭",))
    results = [stream.push([i]) for i in ids]
    assert results[-1] == ("", "🏭")
    assert stream.text == "go "


class CountingTokenizer(Tokenizer):
    """The real tokenizer, counting how many token ids it decodes."""

    decoded_ids = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_ids += len(ids)
        return super().decode(ids, skip_special_tokens)


def test_cost_per_token_does_not_grow_with_the_output(tok):
    counting = CountingTokenizer(tok.backend, special_tokens=tok.special_tokens)
    ids = tok.encode("the factory makes tokens 🏭 and 工厂 " * 100, add_special_tokens=False)
    stream = TextStream(counting, [1], stop=("never seen",))
    for i in ids:
        stream.push([i])
    assert counting.decoded_ids < 20 * len(ids)  # re-decoding everything would be ~len(ids)**2 / 2
    assert stream.finish() + stream.text


def test_random_texts_in_random_chunks(tok):
    rng = random.Random(0)
    words = ["token", " factory", "🏭", "工厂", " é", "\n", " STO", "P", "ü", "🔥", " serve", "ｶﾀｶﾅ", "  "]
    for _ in range(50):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        ids = tok.encode(text, add_special_tokens=False)
        stream = TextStream(tok, [1], stop=("STOP",))
        pieces, i = [], 0
        while i < len(ids):
            n = rng.randint(1, 5)
            piece, stop = stream.push(ids[i : i + n])
            pieces.append(piece)
            i += n
            if stop:
                break
        pieces.append(stream.finish())
        assert "".join(pieces) == stream.text == text.split("STOP")[0]
        assert "\ufffd" not in stream.text


@pytest.fixture(scope="module")
def sentencepiece_style() -> Tokenizer:
    """A Metaspace ("▁word") tokenizer like Llama 2's, trained on a few sentences."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>"], show_progress=False)
    backend.train_from_iterator(["hello world, the world of tokens", "a factory of words"] * 10, trainer=trainer)
    return Tokenizer(backend, special_tokens={"bos_token": "<s>"})


def test_sentencepiece_leading_spaces_survive_token_by_token(sentencepiece_style):
    tok = sentencepiece_style
    ids = tok.encode("hello world of tokens")
    word = tok.encode("world")
    assert tok.decode(word) == "world"  # decoded alone, a word loses its leading space
    stream = TextStream(tok, ids[:1])
    pieces = [stream.push([i])[0] for i in ids[1:]]
    assert "".join(pieces) == tok.decode(ids)[len(tok.decode(ids[:1])) :] == " world of tokens"
