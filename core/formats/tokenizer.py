"""Tokenizer: a thin layer over Hugging Face `tokenizers`.

- encode with offsets, decode;
- StreamDecoder: incremental decoding that never emits half a UTF-8 character;
- train a character-level or byte-level BPE vocabulary from text files;
- special tokens and chat templates: Sol's own for Sol models, and for
  imported models the Jinja template where transformers keeps it
  (`chat_template.jinja`, `additional_chat_templates/*.jinja`, the
  `chat_template` of `tokenizer_config.json`, or a processor's
  `chat_template.json`), rendered in a sandbox built like transformers' own
  (a template is data, never code we run with our privileges).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import SolError

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


# Special tokens that tell which chat format a model was trained on. A model that has them but no
# template must not be chatted with in another format (Sol's own would fit it silently and badly).
TEMPLATE_FAMILIES = {
    "ChatML": ("<|im_start|>", "<|im_end|>"),
    "Llama 3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "Phi-3": ("<|user|>", "<|assistant|>", "<|end|>"),
    "Mistral": ("[INST]", "[/INST]"),
    "Gemma": ("<start_of_turn>", "<end_of_turn>"),
    "DeepSeek": ("<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"),
}
# The named special tokens transformers hands every template (its SPECIAL_TOKENS_ATTRIBUTES).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class Encoding:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special: list[bool]

    def to_json(self) -> dict:
        """What `sol tokenize --json` prints and `sol serve`'s /sol/tokenize answers."""
        return {"ids": self.ids, "tokens": self.tokens, "offsets": [list(o) for o in self.offsets]}


class Tokenizer:
    def __init__(self, hf: HFTokenizer, config: dict | None = None, path: Path | None = None,
                 templates: dict[str, str] | None = None):
        self.hf = hf
        self.config = config or {}   # tokenizer_config.json of imported models, if any
        self.path = path
        # Named chat templates ("default", "tool_use", ...), as transformers keeps them.
        self.templates = templates if templates is not None else \
            config_templates(self.config.get("chat_template"), "tokenizer_config.json")

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
        return cls(hf, config, path, read_chat_templates(path.parent, config))

    def save(self, path: str | Path) -> None:
        from ..atomic import write_text
        write_text(Path(path), self.hf.to_str(pretty=False))

    # ---- basic operations ---------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def id_limit(self) -> int:
        """One past the highest token id: a model's rows from here on belong to no token."""
        return max(self.hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1

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
        # All of Sol's chat and tool tokens: Phi-3 has <|user|>, <|assistant|> and <|end|> too.
        return all(self.token_to_id(t) is not None for t in
                   ("<|user|>", "<|assistant|>", "<|end|>", "<|tool_call|>", "<|tool_result|>", "<|tool_end|>"))

    @property
    def template_family(self) -> str | None:
        """The chat format this vocabulary's special tokens belong to (None for Sol's or an unknown one)."""
        if self.is_sol:
            return None
        return next((name for name, toks in TEMPLATE_FAMILIES.items()
                     if all(self.token_to_id(t) is not None for t in toks)), None)

    @property
    def chat_template(self) -> str | None:
        """The template used without tools (transformers' "default")."""
        return self.template_for(None, required=False)

    def template_for(self, tools: list | None, required: bool = True) -> str | None:
        """The template transformers would pick: "tool_use" when tools are given and the model has one,
        else "default"; Sol's own for Sol vocabularies without one."""
        t = self.templates
        if tools and "tool_use" in t:
            return t["tool_use"]
        if "default" in t:
            return t["default"]
        where = self.path.parent if self.path else "tokenizer"
        if t:
            if not required:
                return None
            raise SolError(f"{where}: this model has several chat templates ({', '.join(sorted(t))}) but none named "
                           "'default'; name one chat_template.jinja")
        if self.is_sol:
            return SOL_CHAT_TEMPLATE
        if not required:
            return None
        family = self.template_family
        if family:
            raise SolError(f"{where}: the tokenizer has {family} chat tokens "
                           f"({', '.join(TEMPLATE_FAMILIES[family])}) but the model has no chat template "
                           "(no chat_template.jinja, chat_template.json or chat_template in tokenizer_config.json); "
                           "copy the template from the original model's files")
        raise SolError(f"{where}: this model has no chat template (no chat_template.jinja, chat_template.json or "
                       "chat_template in tokenizer_config.json); use `sol generate` for raw completion")

    def template_tokens(self) -> dict[str, str]:
        """The named special tokens a template sees (bos_token, eos_token, ...), only those the model defines."""
        return {k: v for k in TEMPLATE_TOKENS if (v := self._config_token(k))}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str:
        return render_template(self.template_for(tools), messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **{**self.template_tokens(), **kwargs})


def config_templates(value, source: str) -> dict[str, str]:
    """`chat_template` as tokenizer_config.json or chat_template.json store it: one string, or a list of
    {"name", "template"} (transformers' legacy form for several)."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise SolError(f"{source}: chat_template must be a string or a list of {{\"name\", \"template\"}} objects")


def read_chat_templates(d: Path, config: dict) -> dict[str, str]:
    """A model folder's chat templates, found where transformers looks: chat_template.jinja and
    additional_chat_templates/*.jinja take priority over tokenizer_config.json; chat_template.json
    (a processor's file) comes last."""
    found = {}
    if (d / "chat_template.jinja").is_file():
        found["default"] = _read_text(d / "chat_template.jinja")
    extra = d / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            found[f.name[:-len(".jinja")]] = _read_text(f)
    if found:
        return found
    found = config_templates(config.get("chat_template"), str(d / "tokenizer_config.json"))
    if not found and (d / "chat_template.json").is_file():
        f = d / "chat_template.json"
        try:
            data = json.loads(_read_text(f))
        except json.JSONDecodeError as e:
            raise SolError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(data, dict) or "chat_template" not in data:
            raise SolError(f"{f}: expected an object with a chat_template field")
        found = config_templates(data["chat_template"], str(f))
    return found


def _read_text(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SolError(f"{f}: not a UTF-8 text file") from None


# ---- rendering templates (the environment transformers' _compile_jinja_template builds) -----------------
@lru_cache(maxsize=32)
def compile_template(template: str, generation_marks: tuple[str, str] | None = None):
    """A template compiled in a sandbox with what transformers' chat templates may use: loop controls,
    {% generation %}, raise_exception, strftime_now, tojson with json.dumps' options, dict, namespace.
    `generation_marks`: two strings written around each {% generation %} body, so training can find
    the assistant's text (core/train/chat_format.py); None writes the body alone."""
    from datetime import datetime

    import jinja2
    import jinja2.ext

    from .template_limits import LimitedSandbox

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} marks the assistant's tokens for training masks
        (transformers' AssistantTracker); rendering writes its body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            body = caller()
            return f"{generation_marks[0]}{body}{generation_marks[1]}" if generation_marks else body

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Not Jinja's own tojson, which escapes <, >, & and ' for HTML.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        # dict() without the dict type itself, whose attributes lead out of the sandbox.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespace() that refuses underscore names, the way to CPython internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace cannot hold {name!r} (a name starting with _)")

    # The sandbox keeps a template from Python's internals; its limits keep it from hanging Sol.
    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise SolError(f"chat template line {e.lineno}: {e.message}") from None


def render_template(template: str, generation_marks: tuple[str, str] | None = None, **context) -> str:
    """The rendered text. A SolError it raises carries `template_line`: the template's line that failed,
    when Jinja's traceback names it (else None)."""
    import jinja2

    from .template_limits import TemplateLimit, render_limited
    compiled = compile_template(template, generation_marks)
    try:
        return render_limited(compiled, context)
    except jinja2.TemplateError as e:   # raise_exception, undefined values, the sandbox refusing something
        cause, err = e, SolError(f"chat template: {e}")
    except TemplateLimit as e:
        cause, err = e, SolError(f"chat template: {e}; the template is refused (fix chat_template in "
                                 "tokenizer_config.json)")
    except Exception as e:   # a template is data: its TypeError ("str" + None) is a mismatch, not a crash of Sol
        cause, err = e, SolError(f"chat template: {type(e).__name__}: {e}; the messages do not have the form "
                                 "this template expects")
    err.template_line = _template_line(cause)
    raise err from None


def _template_line(e: BaseException) -> int | None:
    """The template line an error came from: Jinja maps its frames back to the template's own lines
    (filename "<template>"); the innermost one is where it failed."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


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
