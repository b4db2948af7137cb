"""Prompt templates: the one place where an example becomes the text and token ids a model sees.

Training, evaluation and chat all call `encode_prompt`, and the template is saved in the run folder
(`template.json`, the chat template's Jinja text included), so the format cannot drift between
training and inference. The prompt and the response are tokenised separately: the prompt ids used
for training are exactly the ids used for generation, and every response ends with a stop token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from affiner.core.errors import AffinerError
from affiner.core.files import write_json

TEMPLATE_FILE = "template.json"


@dataclass(frozen=True)
class Example:
    """One supervised example in canonical form, whatever the source format."""

    instruction: str
    response: str = ""
    input: str = ""
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, content) turns, chat templates only
    reference: str = ""  # what a correct answer must contain (a glossary definition); default: response
    key: str = ""  # the part of the reference that makes an answer right ("contains the key"); "": eval.key_before
    group: str = ""  # items that must stay on one side of a split (one acronym's paraphrases)
    source: str = ""  # file:line, for messages

    @property
    def expected(self) -> str:
        return self.reference or self.response

    @property
    def asked(self) -> str:
        """The question as a reader (or a judge) sees it: the instruction, and the task's input when there is one."""
        return asked_text(self.instruction, self.input)


def asked_text(instruction: str, input: str = "") -> str:
    return f"{instruction}\n\nInput: {input.strip()}" if input.strip() else instruction


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str = ""
    prompt_with_input: str = ""
    response_prefix: str = ""
    system_prompt: str | None = None
    chat_template: str | None = None
    stop_token_ids: tuple[int, ...] = field(default=())

    @property
    def is_chat(self) -> bool:
        return self.chat_template is not None


# Text templates: the response is written right after the prompt, so the prompt ends where the
# model starts talking. `response_prefix` is trained as part of the response (a leading space keeps
# BPE tokens in their usual word-initial form).
TEXT_TEMPLATES: dict[str, dict[str, str]] = {
    "alpaca": {
        "prompt": "### Instruction:\n{instruction}\n\n### Response:\n",
        "prompt_with_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "response_prefix": "",
    },
    "instruction": {
        "prompt": "Instruction: {instruction}\nRéponse:",
        "prompt_with_input": "Instruction: {instruction}\nEntrée: {input}\nRéponse:",
        "response_prefix": " ",
    },
    "qa": {
        "prompt": "### Question: {instruction}\n### Answer:",
        "prompt_with_input": "### Question: {instruction}\n{input}\n### Answer:",
        "response_prefix": " ",
    },
}


def build_template(name: str, tokenizer, system_prompt: str | None = None) -> Template:
    """Freeze a template for a run: text templates by name, or the tokenizer's own chat template."""
    if name == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise AffinerError("data.template is 'chat' but this model's tokenizer has no chat template "
                               "(base models usually have none); use alpaca, qa or instruction.")
        template = Template(name="chat", system_prompt=system_prompt, chat_template=tokenizer.chat_template)
        return Template(**{**asdict(template), "stop_token_ids": _chat_stop_ids(template, tokenizer)})
    if name not in TEXT_TEMPLATES:
        raise AffinerError(f"unknown template '{name}' (known: {', '.join([*TEXT_TEMPLATES, 'chat'])}).")
    return Template(name=name, system_prompt=system_prompt, stop_token_ids=(tokenizer.eos_token_id,),
                    **TEXT_TEMPLATES[name])


def _chat_stop_ids(template: Template, tokenizer) -> tuple[int, ...]:
    """EOS plus the token that closes an assistant turn in this chat template (<end_of_turn>, <|eot_id|>)."""
    probe = Example(instruction="ping", response="pong")
    prompt = chat_text(template, tokenizer, probe, with_response=False)
    full = chat_text(template, tokenizer, probe, with_response=True)
    tail_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    ids = [tokenizer.eos_token_id] + [i for i in tail_ids if i in special]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _messages(template: Template, example: Example, with_response: bool) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": template.system_prompt}] if template.system_prompt else []
    messages += [{"role": role, "content": content} for role, content in example.history]
    user = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
    messages.append({"role": "user", "content": user})
    if with_response:
        messages.append({"role": "assistant", "content": example.response})
    return messages


def chat_text(template: Template, tokenizer, example: Example, with_response: bool) -> str:
    return tokenizer.apply_chat_template(_messages(template, example, with_response),
                                         chat_template=template.chat_template, tokenize=False,
                                         add_generation_prompt=not with_response)


def render_prompt(template: Template, example: Example, tokenizer=None) -> str:
    """The exact text the model is conditioned on, up to where its answer starts."""
    if template.is_chat:
        return chat_text(template, tokenizer, example, with_response=False)
    if example.history:
        raise AffinerError(f"{example.source or 'an example'} is a multi-turn conversation, which the "
                           f"'{template.name}' template cannot express; use template: chat.")
    pattern = template.prompt_with_input if example.input else template.prompt
    text = pattern.format(instruction=example.instruction, input=example.input)
    return f"{template.system_prompt}\n\n{text}" if template.system_prompt else text


def encode_prompt(template: Template, tokenizer, example: Example) -> list[int]:
    return encode_text(tokenizer, render_prompt(template, example, tokenizer))


def starts_with_bos(tokenizer, text: str) -> bool:
    """Whether `text` already holds BOS (a chat template writes it as text): adding it again would give the
    model two, so special tokens are then not added (the one rule, wherever a prompt is tokenised)."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS before a text by itself (what llama.cpp's add_bos_token says)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def encode_text(tokenizer, text: str) -> list[int]:
    """A prompt's token ids with exactly one BOS (where the tokenizer uses one)."""
    return tokenizer(text, add_special_tokens=not starts_with_bos(tokenizer, text))["input_ids"]


def encode_response(template: Template, tokenizer, example: Example) -> list[int]:
    """Response ids ending with a stop token, so the tuned model learns to stop."""
    if template.is_chat:
        prompt = chat_text(template, tokenizer, example, with_response=False)
        full = chat_text(template, tokenizer, example, with_response=True)
        if not full.startswith(prompt):
            raise AffinerError("the chat template renders the conversation differently with and without "
                               "the answer, so the answer's tokens cannot be isolated; use a text template.")
        ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        stops = [i for i, token in enumerate(ids) if token in template.stop_token_ids]
        # Cut after the turn's closing token: what follows (a newline) is never generated.
        return ids[: stops[0] + 1] if stops else ids + [tokenizer.eos_token_id]
    ids = tokenizer(template.response_prefix + example.response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def save_template(template: Template, folder: Path) -> None:
    write_json(folder / TEMPLATE_FILE, asdict(template))


def template_for_adapters(folders: list[Path], asked: str | None, default: str, tokenizer) -> Template:
    """The template of LoRA adapters given by folder: the one saved beside them (an export's adapter/ and a run
    folder have template.json, system prompt included), else `asked` or `default` built for the tokenizer."""
    saved = [(Path(folder), load_template(folder)) for folder in folders if (Path(folder) / TEMPLATE_FILE).is_file()]
    if not saved:
        return build_template(asked or default, tokenizer)
    first, template = saved[0]
    if asked and asked != template.name:
        raise AffinerError(f"--template {asked}: {first} was trained with the '{template.name}' template "
                           f"({first / TEMPLATE_FILE}); leave --template out to prompt it as it was trained.")
    return one_template(saved)


def one_template(saved: list[tuple[Path, Template]], purpose: str = "") -> Template:
    """The template the folders were all trained with: every model of a command is prompted with one template,
    so a folder trained with another (another system prompt) would be answered, scored or served with a
    prompt it never saw."""
    (first, template), *others = saved
    for folder, other in others:
        if other != template:
            raise AffinerError(f"{folder} was trained with another prompt than {first} (its {TEMPLATE_FILE} "
                               f"differs, e.g. data.system_prompt): each model must see the prompt it was trained "
                               f"on, so use them one at a time" + (f"; {purpose}" if purpose else "."))
    return template


def load_template(folder: Path) -> Template:
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        raise AffinerError(f"{folder} has no {TEMPLATE_FILE}: it is not an affiner run folder.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw["stop_token_ids"] = tuple(raw.get("stop_token_ids", ()))
        template = Template(**raw)
        _check_saved(template)
        return template
    except (ValueError, UnicodeDecodeError, TypeError, AttributeError) as exc:  # not JSON, or not a template's
        raise AffinerError(f"{path} is damaged ({exc}); restore it from a backup, or copy it from a run trained "
                           "with the same template.") from None


def _check_saved(template: Template) -> None:
    """A saved template that can prompt the model as it was trained: one missing its prompt would condition every
    answer on an empty text, and the scores would look like the model's own."""
    if template.is_chat:
        if not isinstance(template.chat_template, str) or not template.chat_template.strip():
            raise ValueError("its chat_template is empty")
        return
    for key, fields in (("prompt", ("{instruction}",)), ("prompt_with_input", ("{instruction}", "{input}"))):
        text = getattr(template, key)
        if not isinstance(text, str) or not all(f in text for f in fields):
            raise ValueError(f"its {key} must be a text holding {' and '.join(fields)}")
    if not all(isinstance(i, int) for i in template.stop_token_ids):
        raise ValueError("its stop_token_ids must be token ids")
