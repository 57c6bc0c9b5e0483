"""Tokenizer: a thin layer over Hugging Face `tokenizers`.

- encode with offsets, decode;
- StreamDecoder: incremental decoding that never emits half a UTF-8 character;
- train a character-level or byte-level BPE vocabulary from text files;
- special tokens and chat templates: Sol's own for Sol models, the Jinja
  `chat_template` of `tokenizer_config.json` for imported models, rendered in
  a sandbox (a template is data, never code we run with our privileges).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from .errors import SolError

EOT = "<|endoftext|>"
UNK = "<|unk|>"   # a character-level vocabulary's stand-in for characters its corpus lacked
# Sol's chat and tool-call markup (see ARCHITECTURE.md, "Tool calls").
SOL_SPECIAL_TOKENS = [
    EOT, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>",
    "<|tool_call|>", "<|tool_result|>", "<|tool_end|>",
]

# Sol's chat template. A turn is <|role|>content<|end|>. A tool call and its
# result stay inside the assistant's turn, exactly as the engine produces them
# at inference (the result tokens are forced):
#   <|user|>what is 12 times 7?<|end|><|assistant|><|tool_call|>calculator: 12*7<|tool_end|>
#   <|tool_result|>84<|tool_end|>12 times 7 is 84.<|end|>
# which is the messages list
#   user "what is 12 times 7?", assistant "<|tool_call|>calculator: 12*7<|tool_end|>",
#   tool "84", assistant "12 times 7 is 84."
# An assistant message right after a tool message continues the same turn
# (no new header), and one right before a tool message leaves the turn open.
SOL_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% set prev = messages[loop.index0 - 1]['role'] if not loop.first else '' %}"
    "{% set next = messages[loop.index0 + 1]['role'] if not loop.last else '' %}"
    "{% if m['role'] == 'tool' %}<|tool_result|>{{ m['content'] }}<|tool_end|>"
    "{% elif m['role'] == 'assistant' %}"
    "{% if prev != 'tool' %}<|assistant|>{% endif %}{{ m['content'] }}{% if next != 'tool' %}<|end|>{% endif %}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and (not messages or messages[-1]['role'] != 'tool') %}<|assistant|>{% endif %}"
)


@dataclass
class Encoding:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special: list[bool]


class Tokenizer:
    def __init__(self, hf: HFTokenizer, config: dict | None = None, path: Path | None = None):
        self.hf = hf
        self.config = config or {}   # tokenizer_config.json of imported models, if any
        self.path = path

    # ---- loading and saving -------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise SolError(f"{path}: tokenizer file not found")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception with a serde message
            raise SolError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        config = {}
        cfg_path = path.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise SolError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
            except (UnicodeDecodeError, RecursionError) as e:
                raise SolError(f"{cfg_path}: cannot be read ({type(e).__name__}); save it as plain UTF-8 JSON") from None
            if not isinstance(config, dict):
                raise SolError(f"{cfg_path}: expected a JSON object {{...}}, found a {type(config).__name__}")
        return cls(hf, config, path)

    def save(self, path: str | Path) -> None:
        from .atomic import write_text
        write_text(Path(path), self.hf.to_str(pretty=False))

    # ---- basic operations ---------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        enc = self.hf.encode(text, add_special_tokens=add_special_tokens)
        return Encoding(enc.ids, enc.tokens, [tuple(o) for o in enc.offsets],
                        [bool(m) for m in enc.special_tokens_mask])

    def encode_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch_ids(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def _config_token(self, key: str) -> str | None:
        tok = self.config.get(key)
        if isinstance(tok, dict):  # older configs store AddedToken objects
            tok = tok.get("content")
        return tok

    @property
    def eos_id(self) -> int | None:
        for name in (self._config_token("eos_token"), EOT, "</s>", "<|im_end|>", "<|eot_id|>"):
            if name and self.token_to_id(name) is not None:
                return self.token_to_id(name)
        return None

    @property
    def bos_id(self) -> int | None:
        name = self._config_token("bos_token")
        return self.token_to_id(name) if name else None

    # ---- chat templates -----------------------------------------------------
    @property
    def is_sol(self) -> bool:
        return all(self.token_to_id(t) is not None for t in ("<|user|>", "<|assistant|>", "<|end|>"))

    @property
    def chat_template(self) -> str | None:
        tmpl = self.config.get("chat_template")
        if isinstance(tmpl, list):  # several named templates: take "default"
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
        if tmpl:
            return tmpl
        return SOL_CHAT_TEMPLATE if self.is_sol else None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        tmpl = self.chat_template
        if tmpl is None:
            raise SolError(f"{self.path or 'tokenizer'}: this model has no chat template "
                           "(no chat_template in tokenizer_config.json); use `sol generate` for raw completion")
        return render_template(tmpl, messages=messages, add_generation_prompt=add_generation_prompt,
                               tools=tools, bos_token=self._config_token("bos_token") or "",
                               eos_token=self._config_token("eos_token") or "")


def render_template(template: str, **context) -> str:
    from datetime import datetime

    import jinja2

    from .template_limits import LimitedSandbox, TemplateLimit, render_limited

    def raise_exception(message):
        raise SolError(f"chat template: {message}")

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return render_limited(env, template, context)
    except jinja2.TemplateError as e:
        raise SolError(f"chat template: {e}") from None
    except TemplateLimit as e:
        raise SolError(f"chat template: {e}; the template is refused (fix chat_template in "
                       "tokenizer_config.json)") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, MemoryError) as e:
        raise SolError(f"chat template: {type(e).__name__}: {e}") from None


class StreamDecoder:
    """Turns a stream of token ids into text pieces, never half a character.

    Byte-level tokens can split one UTF-8 character across several tokens.
    We decode a short window of recent ids and emit only what became final:
    text that grew and does not end in the replacement character U+FFFD.
    Seeding it with the prompt's last ids gives continuations the right
    leading space for tokenizers (SentencePiece) whose decode strips it.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int] | None = None, skip_special_tokens=False):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(context_ids[-4:]) if context_ids else []
        self.prefix = 0            # start of the window
        self.read = len(self.ids)  # end of what was already emitted

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(done) and not now.endswith("\ufffd"):
            piece = now[len(done):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes as U+FFFD)."""
        done = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(done):] if len(now) > len(done) else ""


# ---- training ---------------------------------------------------------------
def _iter_texts(files: list[Path]) -> Iterable[str]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk


def train_char(files: list[str | Path], special_tokens: list[str] = SOL_SPECIAL_TOKENS) -> Tokenizer:
    """A character-level vocabulary: one token per distinct character of the corpus (nanoGPT's shakespeare_char)."""
    chars = set()
    for text in _iter_texts([Path(f) for f in files]):
        chars.update(text)
    if not chars:
        raise SolError(f"{files[0]}: corpus is empty; a tokenizer needs some text to learn from")
    # A character the corpus lacked ("ã" in a chat with a Shakespeare model) gets its own token:
    # mapped to end-of-text it would tell the model a new document starts mid-sentence.
    special_tokens = list(special_tokens) + ([UNK] if UNK not in special_tokens else [])
    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for c in sorted(chars):
        vocab.setdefault(c, len(vocab))
    hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split every character apart ([\s\S] matches newlines too, unlike '.').
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(special_tokens)
    return Tokenizer(hf)


def train_bpe(files: list[str | Path], vocab_size: int, special_tokens: list[str] = SOL_SPECIAL_TOKENS) -> Tokenizer:
    """A byte-level BPE vocabulary (GPT-2's scheme): any text encodes, no unknown tokens."""
    paths = [str(f) for f in files]
    for p in paths:
        if Path(p).stat().st_size == 0:
            raise SolError(f"{p}: corpus is empty; a tokenizer needs some text to learn from")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train(paths, trainer)
    return Tokenizer(hf)
