import json
import shutil
from pathlib import Path

import pytest
import tokenizers
from transformers import AutoTokenizer

from tests.factories import tiny_tokenizer
from tokenfactory.engine.tiny import TINY_ASSETS_DIR
from tokenfactory.engine.tokenizer import ChatTemplateError, Tokenizer, TokenizerError

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city (café terraces included)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

CONVERSATIONS = {
    "user only": ([{"role": "user", "content": "How are tokens made?"}], None),
    "system user assistant": (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a factory."},
            {"role": "assistant", "content": "A token factory."},
            {"role": "user", "content": "Why? 🏭"},
        ],
        None,
    ),
    "tools": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER_TOOL]),
    "tool calls and responses": (
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris and Tokyo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "東京"}'}},
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "18C, sunny"},
            {"role": "tool", "tool_call_id": "b", "content": "22C, rain"},
            {"role": "assistant", "content": "Paris is sunny; Tokyo is rainy."},
        ],
        [WEATHER_TOOL],
    ),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def hf_tok():
    return AutoTokenizer.from_pretrained(TINY_ASSETS_DIR)


@pytest.mark.parametrize("text", ["Hello factory!", "  spaces\tand\nlines  ", "emoji 🏭🔥 and 工厂 tokens", ""])
def test_encode_decode_round_trip(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert tok.decode(ids) == text


def test_special_and_tool_tokens(tok):
    ids = tok.encode("<|im_start|>user\nhi<tool_call>x</tool_call><|im_end|>")
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert tok.token_to_id("<tool_call>") in ids
    # Chat control tokens are special (skipped); tool-call tags are plain text the agent parses.
    assert tok.decode(ids) == "user\nhi<tool_call>x</tool_call>"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<tool_call>x</tool_call><|im_end|>"
    assert tok.id_to_token(im_end) == "<|im_end|>"
    assert tok.vocab_size == 4096
    assert tok.bos_token_id is None
    assert tok.eos_token_ids == (im_end,)


def test_eos_ids_include_generation_config(tiny_model_dir):
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    assert tok.eos_token_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, name, add_generation_prompt):
    messages, tools = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    theirs = hf_tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert tok.encode(ours, add_special_tokens=False) == hf_tok(ours, add_special_tokens=False)["input_ids"]


def test_chat_template_content_parts_are_joined(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "Hello\nthere"}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(plain)


def test_chat_template_errors_are_clear(tok):
    with pytest.raises(ChatTemplateError, match="system message"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def _tokenizer_dir(tmp_path: Path, **config) -> Path:
    shutil.copyfile(TINY_ASSETS_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_missing_tokenizer_json_names_the_folder(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)) as err:
        Tokenizer.from_pretrained(tmp_path)
    assert isinstance(err.value, ValueError)


def test_no_chat_template_is_a_clear_error(tmp_path):
    tok = Tokenizer.from_pretrained(_tokenizer_dir(tmp_path, eos_token="<|endoftext|>"))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bos_is_added_once_even_when_the_template_writes_it(tmp_path):
    model_dir = _tokenizer_dir(
        tmp_path,
        bos_token={"content": "<|endoftext|>", "special": True},  # AddedToken form
        eos_token="<|im_end|>",
        add_bos_token=True,
        chat_template="{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
    )
    tok = Tokenizer.from_pretrained(model_dir)
    bos = tok.token_to_id("<|endoftext|>")
    assert tok.bos_token_id == bos
    assert tok.encode("plain text")[0] == bos
    assert bos not in tok.encode("plain text", add_special_tokens=False)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert prompt == "<|endoftext|>[user] hi\n"
    assert tok.encode(prompt).count(bos) == 1


def test_named_templates_and_hf_globals(tmp_path):
    model_dir = _tokenizer_dir(
        tmp_path,
        eos_token="<|im_end|>",
        chat_template=[
            {"name": "default", "template": "plain {{ messages[0].content | tojson }}"},
            {"name": "tool_use", "template": "tools {{ tools | tojson }} {{ strftime_now('%Y') | length }}"},
        ],
    )
    tok = Tokenizer.from_pretrained(model_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "<café>"}]) == 'plain "<café>"'
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"name": "f"}])
    assert rendered == 'tools [{"name": "f"}] 4'


def test_chat_template_jinja_file_is_read(tmp_path):
    model_dir = _tokenizer_dir(tmp_path, eos_token="<|im_end|>")
    (model_dir / "chat_template.jinja").write_text("{{ messages | length }} messages{{ extra }}")
    tok = Tokenizer.from_pretrained(model_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "a"}] * 3, extra="!") == "3 messages!"


def test_broken_templates_and_generation_marks(tmp_path):
    marked = "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    tok = Tokenizer.from_pretrained(_tokenizer_dir(tmp_path, eos_token="<|im_end|>", chat_template=marked))
    assert tok.apply_chat_template([{"role": "assistant", "content": "a"}] * 2) == "<a><a>"
    # Keyword arguments may override template variables such as the special tokens.
    tok.chat_templates["default"] = "{{ eos_token }}"
    assert tok.apply_chat_template([], eos_token="</s>") == "</s>"
    tok.chat_templates["default"] = "{% for m in messages %}"
    with pytest.raises(ChatTemplateError, match=str(tmp_path)):
        tok.apply_chat_template([{"role": "user", "content": "a"}])


def test_bos_from_the_post_processor_like_llama3(tmp_path):
    backend = tiny_tokenizer().backend
    bos = backend.token_to_id("<|endoftext|>")
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.add_bos_token
    assert tok.encode("hi") == [bos, *tok.encode("hi", add_special_tokens=False)]
    assert tok.encode("<|endoftext|>hi") == tok.encode("hi")
