"""Tokenizer: a `tokenizers.Tokenizer` plus the facts a server needs around it.

Two sources build the same object:

- GGUF metadata (llama.cpp's ``tokenizer.ggml.*`` keys): `gguf_tokenizer` rebuilds the
  pipeline (pre-tokenizer, BPE model, decoder, special tokens) from the token list, merges or
  scores, and token types; this module adds the BOS/EOS policy and chat template.
- A Hugging Face directory (``tokenizer.json`` + ``tokenizer_config.json``).

Example::

    >>> tok = Tokenizer.from_pretrained_dir("SmolLM2-135M-Instruct/")
    >>> tok.encode("<|im_start|>user")
    [1, 4093]
    >>> tok.decode([1, 4093])
    '<|im_start|>user'
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from specserve.model.chat_template import fallback_template, render_chat_template
from specserve.model.gguf_tokenizer import (
    TokenizerLoadError,
    TokenType,
    backend_from_gguf,
    bytes_to_unicode,
)

__all__ = ["END_OF_TURN_TOKENS", "TokenType", "Tokenizer", "TokenizerLoadError", "bytes_to_unicode"]
_bytes_to_unicode = bytes_to_unicode  # the name tests/tiny.py imports

logger = logging.getLogger(__name__)


# End-of-turn tokens that stop generation besides the eos token (llama.cpp calls the union
# "end of generation" tokens). Only counted when the vocabulary has them as special tokens.
END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML (SmolLM2, Qwen)
    "<end_of_turn>",  # Gemma
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",
    "<|end|>",  # Phi-3
    "<|endoftext|>",  # GPT-2 family base eos, also emitted by ChatML chat models
    "<|end_of_text|>",
    "<EOT>",
)


class Tokenizer:
    """Text <-> token ids for one model, with its BOS/EOS policy and chat template.

    `vocab_size` is the number of ids the model's embedding has (the file's token count),
    `eos_ids` every id that ends generation, and `add_bos` whether `encode` prepends BOS.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        vocab_size: int,
        bos_id: int | None,
        eos_ids: Sequence[int],
        add_bos: bool,
        add_eos: bool = False,
        chat_template: str | None = None,
        source: str = "<memory>",
    ) -> None:
        self.backend = backend
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(eos_ids))  # ordered, without duplicates
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.add_bos = add_bos and bos_id is not None
        self.add_eos = add_eos and self.eos_id is not None
        self.chat_template = chat_template
        self.source = source
        # Ids of `<0xNN>` tokens when the model falls back to bytes (SentencePiece); the
        # incremental detokenizer keeps a run of them open until it ends.
        byte_fallback = bool(getattr(backend.model, "byte_fallback", False))
        byte_ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256 if byte_fallback else 0))
        self.byte_token_ids = frozenset(i for i in byte_ids if i is not None)
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str) -> Tokenizer:
        """Build from GGUF key/values as plain Python values (`GGUFFile.metadata`); `source`
        names the file.

        Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE from tokens + merges) and
        "llama" (SentencePiece BPE from tokens + scores + token types, with byte fallback).
        """
        backend, tokens, types = backend_from_gguf(metadata, source)

        def token_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
        eot_ids = (eos_id, token_id("eot_token_id"), token_id("eom_token_id"))
        eos_ids = [i for i in eot_ids if i is not None]
        control = {tokens[i] for i, t in enumerate(types) if t == TokenType.CONTROL}
        eos_ids += [i for i in _end_of_turn_ids(backend, control) if i not in eos_ids]
        if eos_id is None and not eos_ids:
            logger.warning("%s: no eos token; generation stops only at max_tokens", source)
        # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise.
        add_bos = metadata.get(
            "tokenizer.ggml.add_bos_token", metadata["tokenizer.ggml.model"] == "llama"
        )
        return cls(
            backend,
            vocab_size=len(tokens),
            bos_id=bos_id,
            eos_ids=eos_ids,
            add_bos=bool(add_bos),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
            source=source,
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> Tokenizer:
        """Build from a Hugging Face directory: `tokenizer.json`, `tokenizer_config.json` and,
        when present, `chat_template.jinja`, `generation_config.json` and `config.json`."""
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerLoadError(f"{root}: no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust error says what is wrong inside the file
            raise TokenizerLoadError(f"{tokenizer_file}: cannot parse: {exc}") from exc
        config = _read_json(root / "tokenizer_config.json")
        model_config = _read_json(root / "config.json")
        generation = _read_json(root / "generation_config.json")

        def special_id(name: str) -> int | None:
            token = config.get(name)
            if isinstance(token, dict):  # {"content": "<s>", "lstrip": false, ...}
                token = token.get("content")
            found = backend.token_to_id(token) if isinstance(token, str) else None
            fallback = model_config.get(f"{name}_id")
            return found if found is not None else fallback if isinstance(fallback, int) else None

        bos_id = special_id("bos_token")
        eos_ids = [i for i in [special_id("eos_token")] if i is not None]
        for source_config in (generation, model_config):
            eos_ids += _as_id_list(source_config.get("eos_token_id"))
        specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        eos_ids += _end_of_turn_ids(backend, specials)
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # no flag: trust the post-processor that tokenizer.json carries
            with_specials = backend.encode("", add_special_tokens=True).ids
            add_bos = bos_id is not None and with_specials[:1] == [bos_id]
        return cls(
            backend,
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            bos_id=bos_id,
            eos_ids=eos_ids,
            add_bos=bool(add_bos),
            add_eos=bool(config.get("add_eos_token", False)),
            chat_template=_hf_chat_template(root, config),
            source=str(root),
        )

    # -- use ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. "<|im_start|>") become
        their single ids. With `add_special_tokens`, BOS (and EOS) are added as the model wants."""
        # The backend's post-processor is bypassed so GGUF and HF sources follow one policy.
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes of an unfinished UTF-8 character come out as U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token as the vocabulary spells it, or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's spelling of one id (e.g. "Ġthe", "▁the"), or None."""
        return self.backend.id_to_token(token_id)

    def vocab_fingerprint(self) -> str:
        """sha256 over the ordered token spellings: equal fingerprints mean a draft model and a
        target model agree on every id. GGUF and HF sources of one model give the same value.
        Computed once (every request with a draft model checks it)."""
        if self._fingerprint is not None:
            return self._fingerprint
        digest = hashlib.sha256()
        for token_id in range(self.vocab_size):
            spelled = (self.backend.id_to_token(token_id) or "").encode("utf-8")
            digest.update(len(spelled).to_bytes(4, "little"))  # length prefix: no ambiguity
            digest.update(spelled)
        self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Render `messages` with the model's template, or a built-in one for its family
        (Gemma turns when the vocabulary has `<start_of_turn>`, otherwise ChatML). `tools`
        reaches the template as its `tools` variable (None when absent, as transformers)."""
        template = self.chat_template
        if template is None:
            family = "gemma" if self.token_to_id("<start_of_turn>") is not None else "chatml"
            template = fallback_template(family)
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._spelling(self.bos_id),
            eos_token=self._spelling(self.eos_id),
            tools=tools,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of the rendered chat. Like Hugging Face, no BOS is added here: templates
        that want one write `{{ bos_token }}` themselves."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        return self.encode(text, add_special_tokens=False)

    def _spelling(self, token_id: int | None) -> str:
        return "" if token_id is None else self.backend.id_to_token(token_id) or ""


def _end_of_turn_ids(backend: tokenizers.Tokenizer, specials: set[str]) -> list[int]:
    ids = []
    for name in END_OF_TURN_TOKENS:
        token_id = backend.token_to_id(name)
        if name in specials and token_id is not None:
            ids.append(token_id)
    return ids


# -- HF directory helpers ---------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerLoadError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object")
    return data


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _hf_chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    """The template from `chat_template.jinja` (transformers >= 4.43 writes it), or the
    `chat_template` entry of `tokenizer_config.json` (a string, or named variants)."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(root / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
