"""Decoding prompts in batches where each row leaves as soon as it is done, and the next prompts take its place.

`model.generate` computes every row of a batch until its longest row ends: a row that stopped is still
run through the model, as padding, at every later step. On the quickstart's base model 83 % of the answers
run into a new turn of the template after ~24 tokens while their batch goes on to the 48-token limit, so
about half of the decoding work was for rows already done. Here a finished row's entries are dropped from
the KV cache (`Cache.batch_select_indices`, the cache's public API) and the batch shrinks as rows end.

A shrunken batch is slow per token: a decode step reads every weight whatever its number of rows (measured on the
instruct recipe's base, Gemma 3 270M on a 2-core Zen 4: 81 ms a step with 8-15 rows, 172 ms with 64), and a batch
of 64 held-out questions spent a third of its time in a tail of 8-15 rows that had not stopped. So `decode_queue`
refills the batch: once a quarter of its rows have ended, the next prompts are read (prefilled) on their own and
their KV cache joins the running one, each row keeping its own positions, left-padded to a common length (padding
is masked, as in any left-padded batch). Leading columns that became padding for every row are dropped.

Only the loop and the joining are ours: the cache, the attention masks and the sampling warpers are transformers'.
Greedy answers are token for token those of `model.generate` one prompt at a time (tested on GPT-2, Llama and
Gemma 3, whose sliding-window layers keep only their window).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from affiner.core import kv_cache
from affiner.core.settings import Settings

REFILL_PART = 4  # the next prompts join once this part of the batch (at least a row) has ended

# Given the rows still in the batch (their indices in the batch given) and their new tokens so far, which of them
# are done (besides stop tokens and the limit).
RowsDone = Callable[[list[int], list[list[int]]], list[bool]]
# The next prompts to decode, at most the given number: their row indices, left-padded ids and attention mask.
Refill = Callable[[int], "tuple[list[int], torch.Tensor, torch.Tensor] | None"]


@torch.no_grad()
def decode_rows(model, input_ids: torch.Tensor, attention: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
                settings: Settings, done: RowsDone | None = None) -> list[list[int]]:
    """The new tokens of each left-padded row, up to and including its first stop token, up to where `done`
    said it was done, or `max_new_tokens` long."""
    new_tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    first = (list(range(input_ids.shape[0])), input_ids, attention)
    for row, tokens in _decode(model, first, lambda room: None, max_new_tokens, stop_ids, settings, done):
        new_tokens[row] = tokens
    return new_tokens


@torch.no_grad()
def decode_queue(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int, stop_ids: list[int],
                 settings: Settings, done: RowsDone | None = None, batch_size: int = 16,
                 device: torch.device | None = None) -> Iterator[tuple[int, list[int]]]:
    """(index, new tokens) of each prompt as it ends (as `decode_rows` ends a row), the prompts read in the order
    given, at most `batch_size` decoded at once: rows that end make room for the next prompts."""
    if not prompts:
        return
    queue = list(range(len(prompts)))

    def refill(room: int) -> tuple[list[int], torch.Tensor, torch.Tensor] | None:
        if not queue or room <= 0:
            return None
        rows = queue[:room]
        del queue[:room]
        input_ids, attention = left_pad([prompts[i] for i in rows], pad_id)
        return rows, input_ids.to(device), attention.to(device)

    yield from _decode(model, refill(batch_size), refill, max_new_tokens, stop_ids, settings, done, batch_size)


def _decode(model, first: tuple[list[int], torch.Tensor, torch.Tensor], refill: Refill, max_new_tokens: int,
            stop_ids: list[int], settings: Settings, done: RowsDone | None,
            batch_size: int = 0) -> Iterator[tuple[int, list[int]]]:
    new_tokens: dict[int, list[int]] = {}
    pick = _picker(settings)
    keyword = _cache_keyword(model)
    batch = _Batch.prefill(model, *first, pick, keyword, new_tokens)
    joins = kv_cache.joinable(batch.cache)
    stops = set(stop_ids)
    while batch.size:
        # Decided on the host from the tokens already copied there: the step's one device-to-host copy is `record`'s.
        rows = batch.rows
        finished = [new_tokens[row][-1] in stops or len(new_tokens[row]) >= max_new_tokens for row in rows]
        if done is not None:
            finished = [a or b for a, b in zip(finished, done(list(rows), [new_tokens[row] for row in rows]),
                                               strict=True)]
        for row, ended in zip(rows, finished):
            if ended:
                yield row, new_tokens.pop(row)
        if any(finished):
            batch.keep([i for i, ended in enumerate(finished) if not ended])
        if batch.size:
            batch.step(model, pick, keyword, new_tokens)
        # Enough rows free (all of them where the cache cannot be joined): the next prompts come in.
        if batch.size <= (batch_size - max(1, batch_size // REFILL_PART) if joins else 0):
            more = refill(batch_size - batch.size)
            if more is not None:
                joining = _Batch.prefill(model, *more, pick, keyword, new_tokens)
                batch = batch.join(joining) if batch.size else joining


@dataclass
class _Batch:
    """The rows decoding together: their KV cache, indices, attention mask (prompt and answer columns), the position
    of the last token read, every token picked so far (`answers`, left-padded with each row's own first token,
    which a repetition penalty counts once anyway) and the token just picked, not yet read (`chosen`)."""
    cache: object
    rows: list[int]
    attention: torch.Tensor
    position: torch.Tensor
    answers: torch.Tensor
    chosen: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.rows)

    @classmethod
    def prefill(cls, model, rows: list[int], input_ids: torch.Tensor, attention: torch.Tensor, pick, keyword: str,
                new_tokens: dict[int, list[int]]) -> "_Batch":
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts its positions from 0
        cache = kv_cache.new_cache(model)
        output = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                       logits_to_keep=last_position(input_ids.device), **{keyword: cache})
        empty = input_ids.new_zeros((input_ids.shape[0], 0))
        chosen = pick(empty, output.logits[:, -1, :])
        batch = cls(cache, list(rows), attention, positions[:, -1:], chosen[:, None], chosen)
        batch.record(new_tokens)
        return batch

    def record(self, new_tokens: dict[int, list[int]]) -> None:
        for row, token in zip(self.rows, self.chosen.tolist()):  # one host sync per step, whatever the batch
            new_tokens.setdefault(row, []).append(token)

    def step(self, model, pick, keyword: str, new_tokens: dict[int, list[int]]) -> None:
        """Read the chosen tokens, pick the next ones."""
        self.attention = torch.cat([self.attention, self.attention.new_ones((self.size, 1))], dim=1)
        self.position = self.position + 1
        output = model(input_ids=self.chosen[:, None], attention_mask=self.attention, position_ids=self.position,
                       use_cache=True, **{keyword: self.cache})
        self.chosen = pick(self.answers, output.logits[:, -1, :])
        self.answers = torch.cat([self.answers, self.chosen[:, None]], dim=1)
        self.record(new_tokens)

    def keep(self, kept: list[int]) -> None:
        """Only the `kept` rows (their places in the batch) go on; columns now padding in every row are dropped."""
        index = torch.tensor(kept, dtype=torch.long, device=self.chosen.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in kept]
        self.attention, self.position = self.attention[index], self.position[index]
        self.answers, self.chosen = self.answers[index], self.chosen[index]
        if self.size:
            unused = int(self.attention.any(0).int().argmax())  # leading columns no row attends to
            if unused:
                self.attention = self.attention[:, unused:]
                for layer in self.cache.layers:
                    kv_cache.drop_leading(layer, unused)

    def join(self, other: "_Batch") -> "_Batch":
        """Both batches as one: cache, masks and answers left-padded to the longer one's length."""
        width = max(self.attention.shape[1], other.attention.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            kv_cache.join_layers(mine, theirs, width)
        self.rows = self.rows + other.rows
        self.attention = torch.cat([kv_cache.pad_left(mask, width, 0) for mask in (self.attention, other.attention)])
        self.position = torch.cat([self.position, other.position])
        answers = max(self.answers.shape[1], other.answers.shape[1])
        self.answers = torch.cat([kv_cache.pad_left(tokens, answers) for tokens in (self.answers, other.answers)])
        self.chosen = torch.cat([self.chosen, other.chosen])
        return self


def tokens_for(text: str, ids: list[int], tokenizer) -> int:
    """How many of the generated `ids` it took to write `text`, the start of their decoding (an answer cut at a
    stop text or a new turn): the tokens actually generated, never more than `ids`. Tokenising the text again
    would count otherwise where the model split words its own way, or a character across tokens (each half
    decodes to U+FFFD, which tokenises to 3)."""
    for count in range(len(ids) + 1):
        decoded = tokenizer.decode(ids[:count], skip_special_tokens=True)
        # A character still missing some of its byte tokens decodes to U+FFFD: not written yet.
        if (len(decoded) >= len(text) and not decoded[:len(text)].endswith("\ufffd")) or decoded.startswith(text):
            return count
    return len(ids)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left to one width, and their attention mask: what `decode_rows` takes."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention[i, width - len(row):] = 1
    return input_ids, attention


def last_position(device: torch.device) -> torch.Tensor:
    """`logits_to_keep` for the last position only, given as an index rather than as `1`: the model then takes
    its last hidden states by indexing (a contiguous copy), not as a strided view, which for a frozen bf16 head
    sent torch's matmul through a batched product copying the whole 262k-row head once per row (measured on
    Gemma 3: 12 s for the prefill of 20 rows, against 0.03 s)."""
    return torch.tensor([-1], device=device)


def _cache_keyword(model) -> str:
    """transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns until 5.40);
    earlier 5.x releases know only the old one."""
    import inspect

    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def penalties(settings: Settings, prompt_width: int) -> list:
    """The logits processors of `settings.repetition_penalty`, for sequences whose first `prompt_width` tokens are
    the (left-padded) prompt: a repetition penalty over the answer's own tokens only (`AnswerRepetitionPenalty`).

    Why not the prompt too, as `model.generate(repetition_penalty=...)` does: measured on the instruct recipe's
    held-out set (64 questions, greedy), penalising the prompt makes answers avoid the question's own words: ROUGE-L
    0.146 -> 0.120 at 1.2, where penalising the answer alone keeps 0.139 and still ends the loops (repeated 3-grams
    34 % -> 0.1 %, answers stopping 75 % -> 98 %). It is also what OpenAI's frequency and presence penalties count.
    """
    if settings.repetition_penalty == 1.0:
        return []
    return [AnswerRepetitionPenalty(float(settings.repetition_penalty), prompt_width)]


class AnswerRepetitionPenalty:
    """transformers' repetition penalty (CTRL's: a logit already used is divided by `penalty` when positive,
    multiplied when negative) over the tokens after the first `prompt_width`, the same logits as its
    `RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt_width)` (tested).

    Ours because that processor pads, scatters out of place and slices the whole vocabulary each step: three
    copies of [batch x 262,144] logits and a full-vocabulary mask for Gemma. This one touches only the answer's
    tokens, in place: a greedy decode step of 32 instruct rows on a 2-core Zen 4, 174 -> 149 ms, as fast as
    without a penalty (bench/decode_step.py)."""

    def __init__(self, penalty: float, prompt_width: int):
        self.penalty, self.prompt_width = penalty, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        answer = input_ids[:, self.prompt_width:]  # the answer's tokens all came from this head: none out of range
        if answer.shape[1] == 0:
            return scores
        used = scores.gather(1, answer)
        penalised = torch.where(used < 0, used * self.penalty, used / self.penalty)
        return scores.scatter_(1, answer, penalised)


def _picker(settings: Settings) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Next token of each row from its last logits, given the rows' answer tokens so far (`_Batch.answers`, never the
    prompt): the argmax, or a draw after transformers' own warpers; any repetition penalty first, in fp32."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList(penalties(settings, 0))
    as_fp32 = _Fp32Logits()
    if settings.greedy:
        return lambda sequences, logits: processors(sequences, as_fp32(logits)).argmax(dim=-1)
    processors.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        processors.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        processors.append(TopPLogitsWarper(settings.top_p))

    def draw(sequences: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(processors(sequences, as_fp32(logits)), dim=-1)
        return torch.multinomial(probabilities, num_samples=1).squeeze(1)

    return draw


class _Fp32Logits:
    """A batch's logits in fp32, copied into one buffer kept from step to step (fp32 logits are used as they are).

    Why not `logits.float()`: on a CPU a new [rows x vocabulary] fp32 tensor is a fresh mapping from the kernel
    every step (glibc maps blocks above 32 MB, and Gemma's 262,144 logits of 64 rows are 67 MB), whose first
    writes page-fault: 22 ms a step against 2.6 ms to copy into a kept buffer (Zen 4, 2 cores), the same values."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dtype == torch.float32:
            return logits
        rows, width = logits.shape
        kept = self.buffer
        if kept is None or kept.shape[0] < rows or kept.shape[1] != width or kept.device != logits.device:
            kept = self.buffer = torch.empty(rows, width, device=logits.device)
        return kept[:rows].copy_(logits)
