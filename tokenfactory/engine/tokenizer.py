"""Text <-> token ids for one checkpoint, and chat messages -> prompt text.

Wraps the `tokenizers` library (the Rust tokenizer behind Hugging Face's fast tokenizers) and
reads the same files a Hugging Face checkpoint ships: `tokenizer.json`, `tokenizer_config.json`
(special tokens, `add_bos_token`, `chat_template`), an optional `chat_template.jinja`, and the
EOS ids of `generation_config.json` / `config.json`. Chat templates render in a sandboxed Jinja2
environment set up like Hugging Face's, so a checkpoint's template gives the same prompt here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or cannot do what was asked; the message says why."""


class ChatTemplateError(TokenizerError):
    """The checkpoint has no chat template, or its template rejected the messages."""


class Tokenizer:
    """One checkpoint's tokenizer: encode, decode, chat templates, special token ids."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        add_bos_token: bool | None = None,
        chat_templates: Mapping[str, str] | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        self.name_or_path = name_or_path
        self.special_tokens = dict(special_tokens or {})
        self.chat_templates = dict(chat_templates or {})
        self._jinja_cache: dict[str, jinja2.Template] = {}
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        self.pad_token_id = self._special_id("pad_token")
        # Without `add_bos_token` in the config, follow what tokenizer.json's post-processor does
        # (Llama 3 adds BOS there; ChatML models add nothing).
        self.add_bos_token = add_bos_token if add_bos_token is not None else self._post_processor_adds_bos()
        eos = [*extra_eos_token_ids, *([self.eos_token_id] if self.eos_token_id is not None else [])]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Load the tokenizer of a Hugging Face style checkpoint folder."""
        root = Path(model_dir)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json in {root} (only fast tokenizers are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise TokenizerError(f"cannot read {path}: {e}") from None
        config = _read_json(root / "tokenizer_config.json")
        special = {k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        templates = _parse_chat_templates(config.get("chat_template"))
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():  # newer transformers save the default template in its own file
            templates["default"] = jinja_file.read_text()
        extra_eos = _eos_ids(_read_json(root / "generation_config.json")) or _eos_ids(_read_json(root / "config.json"))
        add_bos = config.get("add_bos_token")
        return cls(
            backend,
            special_tokens=special,
            add_bos_token=None if add_bos is None else bool(add_bos),
            chat_templates=templates,
            extra_eos_token_ids=extra_eos,
            name_or_path=str(root),
        )

    # -- ids and text -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens, BOS is prepended unless text already starts with it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render chat messages (OpenAI shape) into the prompt text the model was trained on.

        Message content may be a string or a list of `{"type": "text", "text": ...}` parts;
        the parts are joined so templates that expect strings work. `tool_calls` on assistant
        messages and `tool` role messages are passed to the template unchanged. Extra keyword
        arguments become template variables (e.g. `enable_thinking`).
        """
        variables = {
            **{name: token for name, token in self.special_tokens.items() if token is not None},
            **kwargs,
            "messages": [_flatten_text_parts(m) for m in messages],
            "tools": list(tools) if tools else None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._compiled_template(bool(tools)).render(**variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template of {self.name_or_path or 'the model'} failed: {e}") from e

    def _compiled_template(self, with_tools: bool) -> jinja2.Template:
        source = self._template_source(with_tools)
        compiled = self._jinja_cache.get(source)
        if compiled is None:
            compiled = self._jinja_cache[source] = _JINJA.from_string(source)
        return compiled

    def _template_source(self, with_tools: bool) -> str:
        if not self.chat_templates:
            raise ChatTemplateError(
                f"the tokenizer in {self.name_or_path or '(memory)'} has no chat template; "
                "send a plain completion prompt instead, or use a chat-tuned checkpoint"
            )
        if with_tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if len(self.chat_templates) == 1:
            return next(iter(self.chat_templates.values()))
        raise ChatTemplateError(
            f"the tokenizer in {self.name_or_path} has several chat templates "
            f"({', '.join(self.chat_templates)}) and none is named 'default'"
        )

    # -- helpers --------------------------------------------------------------------------------

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_token_id is None:
            return False
        with_special = self.backend.encode("a", add_special_tokens=True).ids
        return bool(with_special) and with_special[0] == self.bos_token_id


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson escapes HTML characters and sorts keys; chat templates expect
    # plain json.dumps output, as Hugging Face renders it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationMarker(Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text for training loss masks.

    Some chat templates use it; when rendering a prompt the mark means nothing, so the body
    renders as if the tag were not there.
    """

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)  # the `generation` name token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationMarker]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_JINJA = _make_environment()


def _flatten_text_parts(message: Mapping[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    texts = [part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type") == "text"]
    return {**message, "content": "\n".join(texts)}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None


def _token_content(value: Any) -> str | None:
    """A special token given as a string or as a serialised AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _parse_chat_templates(raw: Any) -> dict[str, str]:
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list):
        return {t["name"]: t["template"] for t in raw if isinstance(t, Mapping) and "name" in t}
    return {}


def _eos_ids(config: Mapping[str, Any]) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        return tuple(int(e) for e in eos)
    return () if eos is None else (int(eos),)
