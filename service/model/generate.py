"""Batched generation: many requests, each with its own images, adapter slot and sampling settings.

Left padding, a KV cache, greedy decoding by default, per-row temperature / top-p / seed, and a
per-row stop at EOS; a row that stops leaves the batch, so the others decode without it, and
new rows can join between decode steps (:class:`RunningBatch`, what the engine's continuous
batching runs on; :func:`generate` is one batch from prefill to the last row). The vision
tower + VCE run once per distinct image (optionally cached by a hash of the image); features
are scattered into the image-token positions of the prompt embeddings. With a
:class:`~service.model.prefix_cache.PrefixCache`, a prompt whose image prefix was seen before on
the same weights runs only its instruction, over the cached keys and values.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers.cache_utils import Cache

from service.lru import SizedLRU
from service.model.attention import last_query_rows, leading_last_only_rows
from service.model.base import BaseModel
from service.model.kv_cache import (
    ReservedCache,
    ReservedLayer,
    compact_rows,
    drop_leading_columns,
    is_growing,
    left_pad,
    stack_rows,
    widen,
)
from service.model.lora.context import adapter_batch
from service.model.lora.weights import AdapterWeights
from service.model.packing import packed_tokens, packing_for
from service.model.prefix_cache import (
    PrefixCache,
    PrefixEntry,
    append_prefixes,
    cache_of_prefixes,
    prefix_key,
    prefix_length,
    read_prefix,
    supports_prefixes,
)
from service.model.serving_forward import serving_forward


class PromptTooLongError(ValueError):
    """The prompt (with its image tokens) plus ``max_new_tokens`` exceeds the model's context."""


@dataclass
class GenerationRequest:
    """One row of a batch."""

    instruction: str
    images: list[Image.Image] = field(default_factory=list)
    slot: int = 0
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # What names the weights this row runs on ("base", or one load of an adapter into its slot), so
    # that its image prefix's keys and values can be cached and reused; None: not cached.
    prefix_scope: str | None = None
    # The prompt's token ids and the images' content hashes (:func:`check_request` fills both), so
    # that a caller can compute them once, off the thread that runs the model; None: computed here.
    prompt_ids: list[int] | None = None
    image_keys: list[str] | None = None
    # Streaming and cancellation hooks, called from the generating thread.
    on_text: Callable[[str], None] | None = None
    is_cancelled: Callable[[], bool] | None = None


@dataclass
class RowTiming:
    """Where one row's time went: its prefill group's vision and prefill, its own decode steps."""

    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    batch_size: int = 1  # the most rows it shared a forward pass with


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS), "length" or "cancelled"
    timing: RowTiming = field(default_factory=RowTiming)


@dataclass
class BatchTiming:
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


def image_key(image: Image.Image) -> str:
    """Content hash of an image (mode, size and pixels)."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ImageFeatureCache(SizedLRU[torch.Tensor]):
    """LRU of image features ``[tokens_per_image, d_llm]`` keyed by :func:`image_key`, at most ``capacity``."""

    def __init__(self, capacity: int = 256):
        super().__init__(capacity)


def encode_prompt(base: BaseModel, instruction: str, n_images: int) -> list[int]:
    """Token ids of the prompt with every ``<image>`` expanded to ``tokens_per_image`` ids.

    Kept in ``base.prompt_ids`` by instruction and image count: services ask the same questions
    over and over, and tokenising was the largest single cost of a request on the HTTP side
    (16 % of its samples under load; the tokenizer's call, not the Rust encoder, is most of it).
    """
    key = f"{n_images}\0{instruction}"
    cached = base.prompt_ids.get(key)
    if cached is not None:
        return list(cached)
    text = base.prompt.render(instruction, n_images)
    ids = base.tokenizer(text, add_special_tokens=True)["input_ids"]
    image_id = base.image_token_id
    if ids.count(image_id) != n_images:
        raise ValueError("the instruction must not contain the image token")
    expanded: list[int] = []
    for token in ids:
        expanded.extend([image_id] * base.tokens_per_image if token == image_id else [token])
    base.prompt_ids.put(key, tuple(expanded))
    return expanded


def answer_token_ids(base: BaseModel, answer: str) -> list[int]:
    """The tokens of ``answer`` as the model writes it after the prompt (answer prefix, no EOS)."""
    return base.tokenizer(base.prompt.answer_prefix + answer, add_special_tokens=False)["input_ids"]


def answer_token_budget(base: BaseModel, answers: list[str], margin: int = 4) -> int:
    """``max_new_tokens`` that fits the longest of ``answers`` (as the model writes it) plus ``margin``.

    Scoring generated answers against references with a fixed cap silently truncates the long
    ones (an inspection answer such as ``defect: missing_hole, top-right`` is 23 tokens with the
    demo tokenizer), and a truncated answer counts as wrong.
    """
    longest = max((len(answer_token_ids(base, a)) for a in answers), default=0)
    return longest + margin


def _check_length(base: BaseModel, n_tokens: int, max_new_tokens: int) -> None:
    if n_tokens + max_new_tokens > base.max_context:
        raise PromptTooLongError(
            f"prompt of {n_tokens} tokens + max_new_tokens {max_new_tokens} exceeds the context of {base.max_context}"
        )


def check_request(base: BaseModel, request: GenerationRequest) -> int:
    """Validate one request up front and fill in its ``prompt_ids`` and, unless the caller gave
    them, its ``image_keys`` (which :meth:`RunningBatch.prefill` then need not compute again);
    returns its prompt length in tokens."""
    ids = encode_prompt(base, request.instruction, len(request.images))
    _check_length(base, len(ids), request.max_new_tokens)
    if request.image_keys is not None and len(request.image_keys) != len(request.images):
        raise ValueError(f"{len(request.image_keys)} image keys for {len(request.images)} images")
    request.prompt_ids = ids
    if request.image_keys is None:
        request.image_keys = [image_key(im) for im in request.images]
    return len(ids)


def image_features(
    base: BaseModel, images: list[Image.Image], cache: ImageFeatureCache | None = None,
    keys: list[str] | None = None,
) -> list[torch.Tensor]:
    """Features ``[tokens_per_image, d_llm]`` per image; each distinct image is encoded once.

    ``keys``: the images' :func:`image_key` s, when the caller has them already.
    """
    keys = keys if keys is not None else [image_key(im) for im in images]
    found: dict[str, torch.Tensor] = {}
    todo: dict[str, Image.Image] = {}
    for key, im in zip(keys, images, strict=True):
        if key in found or key in todo:
            continue
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            found[key] = cached
        else:
            todo[key] = im
    if todo:
        feats = base.encode_images(base.preprocess_images(list(todo.values())))
        for key, feat in zip(todo, feats, strict=True):
            found[key] = feat
            if cache is not None:
                cache.put(key, feat)
    return [found[k] for k in keys]


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]`` of left-padded rows with ``mask [B, T]`` (1 = token): each row's first
    token is position 0, and its padding is clamped to 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def embed_prompts(
    base: BaseModel, rows: list[list[int]], features: list[list[torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``rows`` and embed them, image positions filled with ``features``.

    Returns ``inputs_embeds [B, T, d]`` and ``attention_mask [B, T]``.
    """
    device = base.device
    width = max(len(r) for r in rows)
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    embeds = base.model.get_input_embeddings()(ids)
    flat = [f for row in features for f in row]
    if flat:
        image_mask = (ids == base.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, torch.cat(flat).to(embeds.dtype))
    return embeds, mask


def _next_tokens(
    logits: torch.Tensor, requests: list[GenerationRequest], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """``logits [B, V]`` → ``[B]``: greedy where temperature is 0, else temperature / top-p sampling."""
    out = logits.argmax(-1)
    for i, req in enumerate(requests):
        if req.temperature <= 0:
            continue
        probs = torch.softmax(logits[i].float() / req.temperature, -1)
        if req.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < req.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        out[i] = torch.multinomial(probs.cpu(), 1, generator=generators[i]).to(out.device)[0]
    return out


def _emit(base: BaseModel, request: GenerationRequest, ids: list[int], sent: str, final: bool = False) -> str:
    """Send the new text of a row; held back while the last token ends mid-character (until final)."""
    text = base.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
    if final:
        text = text.rstrip()
    if (text.endswith("\ufffd") and not final) or not text.startswith(sent):
        return sent
    if len(text) > len(sent):
        request.on_text(text[len(sent) :])
    return text


def _keep_rows(
    cache: Cache, keep: list[int], mask: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor
) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop every row of the KV cache (and of ``mask [B, T]``, ``positions [B, 1+]``, ``slots [B]``)
    not in ``keep``, then the leading columns that are padding in every row left.

    Returns the rows' new order (``order[j]``: the old index of row ``j``; see
    :func:`~service.model.kv_cache.compact_rows`) and the three tensors in it.
    """
    order = compact_rows(cache, keep)
    index = torch.tensor(order, dtype=torch.long, device=mask.device)
    mask, positions, slots = mask[index], positions[index], slots[index]
    # Left padding that no remaining row needs (e.g. a text-only row outliving the image rows).
    # Only plain growing layers are cut: a sliding-window layer keeps its own position count.
    lead = int((mask.sum(0) == 0).long().cumprod(0).sum())
    if lead and all(is_growing(layer) for layer in cache.layers):
        mask = mask[:, lead:]
        drop_leading_columns(cache, lead)
    return order, mask, positions, slots


@dataclass
class _Row:
    """A request being decoded: what it has generated so far and how it will stop."""

    key: Any  # the caller's handle for this row, returned with its result
    request: GenerationRequest
    prompt_tokens: int
    generator: torch.Generator | None
    timing: RowTiming
    outputs: list[int] = field(default_factory=list)
    streamed: str = ""
    finish: str = "length"
    done: bool = False

    def result(self, base: BaseModel) -> GenerationResult:
        if self.request.on_text is not None:
            _emit(base, self.request, self.outputs, self.streamed, final=True)
        return GenerationResult(
            text=base.tokenizer.decode(self.outputs, skip_special_tokens=True).strip(),
            token_ids=self.outputs,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.outputs) + (1 if self.finish == "stop" else 0),
            finish_reason=self.finish,
            timing=self.timing,
        )


def _new_rows(keys: list[Any], requests: list[GenerationRequest], ids: list[list[int]], timing: RowTiming) -> list[_Row]:
    """A prefilled group's rows: each with its own copy of the group's ``timing`` and its sampler."""
    rows = []
    for key, req, prompt in zip(keys, requests, ids, strict=True):
        generator = None
        if req.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(req.seed if req.seed is not None else torch.seed())
        rows.append(_Row(key, req, len(prompt), generator, RowTiming(**timing.__dict__), done=req.max_new_tokens <= 0))
    return rows


@dataclass
class _Joiner:
    """A row admitted over its cached image prefix, whose prompt's rest runs in the next step."""

    row: _Row
    entry: PrefixEntry
    rest: list[int]  # the prompt's token ids after the prefix


@dataclass
class _Plan:
    """What a group of requests needs before its forward passes: each prompt's ids and image
    hashes, which rows' image prefixes are cached (``hits``) and which are to be (``missed``:
    row -> (prefix key, prefix length))."""

    ids: list[list[int]]
    image_keys: list[list[str]]
    hits: dict[int, PrefixEntry]
    missed: dict[int, tuple[str, int]]

    def subset(self, rows: list[int]) -> _Plan:
        """The plan of ``rows`` alone, renumbered in their order."""
        new = {old: j for j, old in enumerate(rows)}
        return _Plan([self.ids[i] for i in rows], [self.image_keys[i] for i in rows],
                     {new[i]: e for i, e in self.hits.items() if i in new},
                     {new[i]: m for i, m in self.missed.items() if i in new})


def _plan(base: BaseModel, requests: list[GenerationRequest], prefixes: PrefixCache | None,
          adapter: AdapterWeights | None) -> _Plan:
    """Tokenise (unless checked already), check lengths and look up each row's image prefix."""
    ids = [r.prompt_ids if r.prompt_ids is not None else encode_prompt(base, r.instruction, len(r.images))
           for r in requests]
    for row, req in zip(ids, requests, strict=True):
        _check_length(base, len(row), req.max_new_tokens)
    image_keys = [r.image_keys if r.image_keys is not None else [image_key(im) for im in r.images]
                  for r in requests]
    plan = _Plan(ids, image_keys, {}, {})
    if prefixes is not None and adapter is None and supports_prefixes(base.model.config):
        for i, (req, row) in enumerate(zip(requests, ids, strict=True)):
            n = prefix_length(row, base.image_token_id)
            if req.prefix_scope is None or n in (0, len(row)):  # (no image, or nothing after it to run)
                continue
            key = prefix_key(req.prefix_scope, row[:n], image_keys[i])
            entry = prefixes.get(key)
            if entry is None:
                plan.missed[i] = (key, n)
            else:
                plan.hits[i] = entry
    return plan


class RunningBatch:
    """Rows decoding together, one token per :meth:`step`; rows can join (:meth:`add`) between steps.

    This is iteration-level scheduling (Orca, vLLM's continuous batching) on a left-padded KV
    cache: a row that finishes leaves at once, and requests that arrive meanwhile join the running
    rows instead of waiting for the whole batch to end. A newcomer whose image prefix is cached
    runs the rest of its prompt in the running rows' next decode pass (prefill tokens riding along
    with decode tokens, as in Sarathi's and vLLM's chunked prefill): one forward pass instead of
    two, and its keys and values written into spare rows of the cache, without copying the running
    rows'. Other newcomers are prefilled as a group and merged in (:meth:`merge`).

    State, for the ``B`` rows still decoding: the KV cache ``[B, heads, T, head_dim]`` per layer,
    ``mask [B, T]`` (0 on left padding), ``positions [B, 1]`` (each row's last position), ``slots
    [B]`` and ``logits [B, V]``, the next-token logits not yet sampled.
    """

    def __init__(self, base: BaseModel, rows: list[_Row], cache: Cache, mask: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, logits: torch.Tensor, adapter: AdapterWeights | None):
        self.base, self.rows, self.cache, self.mask = base, rows, cache, mask
        self.positions, self.slots, self.logits, self.adapter = positions, slots, logits, adapter
        self.joining: list[_Joiner] = []  # rows admitted by :meth:`add` whose prompts run at the next step

    @classmethod
    @torch.no_grad()
    def prefill(
        cls,
        base: BaseModel,
        requests: list[GenerationRequest],
        cache: ImageFeatureCache | None = None,
        adapter: AdapterWeights | None = None,
        keys: list[Any] | None = None,
        prefixes: PrefixCache | None = None,
    ) -> RunningBatch:
        """Encode ``requests`` (images once each), run their prompts in one forward pass.

        ``adapter`` applies one (e.g. still training) adapter to every row instead of the slots;
        ``keys`` (default: the row's index) are what :meth:`step` returns with each result.
        With ``prefixes``, rows with a ``prefix_scope`` whose image prefix is cached run only the
        rest of their prompt (a second forward pass, merged in), and the others' prefixes are
        cached. Raises :class:`PromptTooLongError` / ``ValueError`` for a request that cannot run.
        """
        t0 = time.perf_counter()
        keys = list(keys) if keys is not None else list(range(len(requests)))
        plan = _plan(base, requests, prefixes, adapter)
        return cls._prefill_planned(base, requests, keys, plan, cache, adapter, prefixes, t0)

    @classmethod
    def _prefill_planned(cls, base: BaseModel, requests: list[GenerationRequest], keys: list[Any], plan: _Plan,
                         cache: ImageFeatureCache | None, adapter: AdapterWeights | None,
                         prefixes: PrefixCache | None, t0: float) -> RunningBatch:
        """:meth:`prefill` once the rows are planned: whole prompts first, then the prefix hits."""
        ids, hits = plan.ids, plan.hits
        batch: RunningBatch | None = None
        full = [i for i in range(len(requests)) if i not in hits]
        if full:
            batch = cls._prefill_prompts(base, [requests[i] for i in full], [ids[i] for i in full],
                                         [plan.image_keys[i] for i in full], [keys[i] for i in full], cache, adapter, t0)
            width = batch.mask.shape[1]
            for j, i in enumerate(full):
                if i in plan.missed:
                    key, n = plan.missed[i]
                    prefixes.put(key, read_prefix(batch.cache, j, width - len(ids[i]), n))
        if hits:
            rest = sorted(hits)
            after = cls._prefill_after_prefixes(base, [requests[i] for i in rest], [ids[i] for i in rest],
                                                [hits[i] for i in rest], [keys[i] for i in rest],
                                                time.perf_counter() if batch else t0)
            if batch is None:
                batch = after
            else:
                batch.merge(after)
        return batch

    @classmethod
    def _prefill_prompts(cls, base: BaseModel, requests: list[GenerationRequest], ids: list[list[int]],
                         image_keys: list[list[str]], keys: list[Any], cache: ImageFeatureCache | None,
                         adapter: AdapterWeights | None, t0: float) -> RunningBatch:
        """The whole prompts in one forward pass, images encoded (or taken from ``cache``)."""
        all_images = [im for r in requests for im in r.images]
        flat_keys = [k for row in image_keys for k in row]
        feats = image_features(base, all_images, cache, keys=flat_keys) if all_images else []
        per_row, k = [], 0
        for r in requests:
            per_row.append(feats[k : k + len(r.images)])
            k += len(r.images)
        t1 = time.perf_counter()
        embeds, mask = embed_prompts(base, ids, per_row)
        positions = left_padded_positions(mask)
        slots = torch.tensor([r.slot for r in requests], dtype=torch.long, device=base.device)
        out = _forward(base, slots, adapter, inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                       last_only=True, cache=ReservedCache(base.model.config))
        t2 = time.perf_counter()
        rows = _new_rows(keys, requests, ids, RowTiming((t1 - t0) * 1e3, (t2 - t1) * 1e3, 0.0, len(requests)))
        return cls(base, rows, out.cache, mask, positions[:, -1:], slots, out.logits[:, -1], adapter)

    @classmethod
    def _prefill_after_prefixes(cls, base: BaseModel, requests: list[GenerationRequest], ids: list[list[int]],
                                entries: list[PrefixEntry], keys: list[Any], t0: float) -> RunningBatch:
        """The prompts after their cached prefixes (``entries``), attending to them (see
        :func:`_forward_after_prefixes`)."""
        rests = [row[entry.length :] for row, entry in zip(ids, entries, strict=True)]
        t1 = time.perf_counter()
        cache, mask, positions, slots, logits = _forward_after_prefixes(base, requests, rests, entries)
        t2 = time.perf_counter()
        rows = _new_rows(keys, requests, ids, RowTiming((t1 - t0) * 1e3, (t2 - t1) * 1e3, 0.0, len(requests)))
        return cls(base, rows, cache, mask, positions, slots, logits, None)

    def add(self, requests: list[GenerationRequest], cache: ImageFeatureCache | None = None,
            keys: list[Any] | None = None, prefixes: PrefixCache | None = None) -> None:
        """Admit ``requests`` (on the slots) to the running rows, ``keys`` as in :meth:`prefill`.

        Rows whose image prefix is cached join the next :meth:`step`'s forward pass, when the
        cache allows (every layer a :class:`~service.model.kv_cache.ReservedLayer`); the others are
        prefilled now, as one group, and merged. Raises as :meth:`prefill` does, before changing
        anything.
        """
        if self.adapter is not None or not self.can_merge:
            raise ValueError("rows join only batches on the slots with plain growing KV caches")
        t0 = time.perf_counter()
        keys = list(keys) if keys is not None else list(range(len(requests)))
        plan = _plan(self.base, requests, prefixes, None)
        if not all(isinstance(layer, ReservedLayer) for layer in self.cache.layers):
            plan.hits.clear()  # (run them whole; their prefixes were looked up, not missed)
        full = [i for i in range(len(requests)) if i not in plan.hits]
        if full:
            group = self._prefill_planned(self.base, [requests[i] for i in full], [keys[i] for i in full],
                                          plan.subset(full), cache, None, prefixes, t0)
            self.merge(group)
        for i in sorted(plan.hits):
            entry = plan.hits[i]
            row, = _new_rows([keys[i]], [requests[i]], [plan.ids[i]], RowTiming(batch_size=len(self) + 1))
            self.joining.append(_Joiner(row, entry, plan.ids[i][entry.length :]))

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining)

    @property
    def requests(self) -> list[GenerationRequest]:
        return [row.request for row in self.rows] + [joiner.row.request for joiner in self.joining]

    @property
    def keys(self) -> list[Any]:
        """The keys of every row, those waiting to join included."""
        return [row.key for row in self.rows] + [joiner.row.key for joiner in self.joining]

    @property
    def can_merge(self) -> bool:
        """Whether rows can join: only plain growing KV caches can be left-padded to a new width
        (a sliding-window layer keeps its own position count)."""
        return all(is_growing(layer) for layer in self.cache.layers)

    def merge(self, other: RunningBatch) -> None:
        """Append ``other``'s rows (e.g. just prefilled); both caches are left-padded to one width."""
        if other.adapter is not self.adapter:
            raise ValueError("only batches on the same trainable adapter (or the slots) can merge")
        if other.joining:
            raise ValueError("a batch with rows waiting to join cannot be merged")
        if not (self.can_merge and other.can_merge):
            raise ValueError("only plain growing KV caches can merge")
        width = max(self.mask.shape[1], other.mask.shape[1])
        stack_rows(self.cache, other.cache, width)
        self.mask = torch.cat([left_pad(self.mask, width, 1), left_pad(other.mask, width, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.slots = torch.cat([self.slots, other.slots])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows
        for row in self.rows:
            row.timing.batch_size = max(row.timing.batch_size, len(self.rows))

    @torch.no_grad()
    def step(self) -> list[tuple[Any, GenerationResult]]:
        """Sample each row's next token, retire the rows that finished, and run one decode pass for
        the rest. Returns the finished rows' keys and results."""
        started = time.perf_counter()
        live = [row for row in self.rows if not row.done]
        live_index = [i for i, row in enumerate(self.rows) if not row.done]
        tokens = torch.empty(0, dtype=torch.long, device=self.logits.device)
        if live:
            logits = self.logits
            if len(live) < len(self.rows):
                logits = logits[torch.tensor(live_index, device=logits.device)]
            tokens = _next_tokens(logits, [row.request for row in live], [row.generator for row in live])
        eos = self.base.tokenizer.eos_token_id
        for row, tok in zip(live, tokens.tolist(), strict=True):
            req = row.request
            if req.is_cancelled is not None and req.is_cancelled():
                row.done, row.finish = True, "cancelled"
                continue
            if tok == eos:
                row.done, row.finish = True, "stop"
                continue
            row.outputs.append(tok)
            if len(row.outputs) >= req.max_new_tokens:
                row.done = True
            if req.on_text is not None:
                row.streamed = _emit(self.base, req, row.outputs, row.streamed)
        finished = [row for row in self.rows if row.done]
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if finished:
            # Rows that finished leave the batch, so the next steps cost only what the rows still
            # generating need (answers of 1-12 tokens would otherwise all run to the longest).
            order: list[int] = []
            if keep:
                order, self.mask, self.positions, self.slots = _keep_rows(
                    self.cache, keep, self.mask, self.positions, self.slots)
                position = {i: j for j, i in enumerate(live_index)}  # every kept row was live
                tokens = tokens[torch.tensor([position[i] for i in order], device=tokens.device)]
            self.rows = [self.rows[i] for i in order]
        joined = [joiner.row for joiner in self.joining]
        if self.joining:
            self._join(tokens)
        elif self.rows:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
            self.positions = self.positions + 1
            out = _forward(self.base, self.slots, self.adapter, input_ids=tokens.unsqueeze(1),
                           attention_mask=self.mask, position_ids=self.positions, cache=self.cache)
            self.logits = out.logits[:, -1]
        elapsed = (time.perf_counter() - started) * 1e3
        for row in (*finished, *self.rows[: len(self.rows) - len(joined)]):
            row.timing.decode_ms += elapsed
        for row in joined:
            row.timing.prefill_ms += elapsed
        return [(row.key, row.result(self.base)) for row in finished]

    def _join(self, tokens: torch.Tensor) -> None:
        """One forward pass over the running rows' next ``tokens [B]`` and the joiners' prompts
        after their cached prefixes; then the joiners are rows like the others.

        The pass is ``L`` positions wide, ``L`` the longest joiner's rest: each running row's token
        sits in the last position, after ``L - 1`` masked ones (left behind in its cache, masked
        for good), and each joiner's rest is right-aligned, its prefix written into the cache's
        next rows, right-aligned to the cache's width (the cache is widened first if a prefix is
        longer). Every position has some unmasked key before it, so no masked one reads garbage.
        """
        joining = self.joining
        entries = [joiner.entry for joiner in joining]
        if not self.rows:  # every running row finished: the joiners run alone
            self.cache, self.mask, self.positions, self.slots, self.logits = _forward_after_prefixes(
                self.base, [j.row.request for j in joining], [j.rest for j in joining], entries)
            self.rows, self.joining = [j.row for j in joining], []
            return
        device, running = self.mask.device, len(self.rows)
        width = max(self.mask.shape[1], *(entry.length for entry in entries))
        span = max(len(joiner.rest) for joiner in joining)
        if width > self.mask.shape[1]:
            widen(self.cache, width)
            self.mask = left_pad(self.mask, width, 1)
        prefix_mask = append_prefixes(self.cache, entries, room=span)
        pad = self.base.tokenizer.pad_token_id if self.base.tokenizer.pad_token_id is not None else 0
        ids = torch.full((running + len(joining), span), pad, dtype=torch.long, device=device)
        new_mask = torch.zeros((running + len(joining), span), dtype=self.mask.dtype, device=device)
        ids[:running, -1], new_mask[:running, -1] = tokens, 1
        for j, joiner in enumerate(joining, start=running):
            ids[j, span - len(joiner.rest) :] = torch.tensor(joiner.rest, device=device)
            new_mask[j, span - len(joiner.rest) :] = 1
        mask = torch.cat([torch.cat([self.mask, prefix_mask.to(device)]), new_mask], dim=1)
        positions = left_padded_positions(mask)[:, -span:]
        slots = torch.cat([self.slots, torch.tensor([j.row.request.slot for j in joining], device=device)])
        out = _forward(self.base, slots, None, input_ids=ids, attention_mask=mask, position_ids=positions,
                       last_only=True, cache=self.cache)
        self.mask, self.positions, self.slots, self.logits = mask, positions[:, -1:], slots, out.logits[:, -1]
        self.rows, self.joining = self.rows + [joiner.row for joiner in joining], []
        for row in self.rows:
            row.timing.batch_size = max(row.timing.batch_size, len(self.rows))


def _forward_after_prefixes(base: BaseModel, requests: list[GenerationRequest], rests: list[list[int]],
                            entries: list[PrefixEntry]) -> tuple[Cache, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass over ``rests`` (the prompts after their cached prefixes ``entries``), on
    the requests' slots; the state of a :class:`RunningBatch` of those rows: its cache, ``mask``,
    ``positions [B, 1]``, ``slots`` and ``logits [B, V]``.

    Each row's positions are ``[padding, its prefix][padding, the rest of its prompt]``: the
    mask hides both paddings and the position ids count only real tokens, so each row sees
    exactly what its whole prompt, run alone, would have.
    """
    cache, prefix_mask = cache_of_prefixes(base.model.config, entries)
    embeds, rest_mask = embed_prompts(base, rests, [[] for _ in rests])
    mask = torch.cat([prefix_mask, rest_mask], dim=1)
    positions = left_padded_positions(mask)[:, prefix_mask.shape[1] :]
    slots = torch.tensor([r.slot for r in requests], dtype=torch.long, device=base.device)
    out = _forward(base, slots, None, inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                   last_only=True, cache=cache)
    return out.cache, mask, positions[:, -1:], slots, out.logits[:, -1]


def _forward(base: BaseModel, slots: torch.Tensor, adapter: AdapterWeights | None, last_only: bool = False,
             **inputs):
    """The model's forward pass on per-row ``slots`` (or one trainable ``adapter``).

    ``last_only``: logits of the last position only, ``[B, 1, V]``. The position is picked by an
    index tensor rather than ``logits_to_keep=1``: transformers slices with the latter, and the
    LM head over that strided ``[B, 1, d]`` view runs as a batched matmul against ``B`` copies of
    its weight (a 16-row pass of 12 positions spent about 1 ms copying them on a 2-core CPU), while
    the indexed hidden states are contiguous and take one plain matmul. A pass of several positions
    skips its padding where it can (:func:`_new_positions`). Inference on a Llama base runs
    :mod:`service.model.serving_forward` (the same computation without transformers' per-call
    glue), anything else transformers' forward.
    """
    real = _new_positions(base, inputs)
    with adapter_batch(None, trainable=adapter) if adapter is not None else adapter_batch(slots), \
            packed_tokens(None if real is None else packing_for(real)), \
            last_query_rows(0 if real is None else leading_last_only_rows(real)):
        forward = serving_forward(base.model)
        if forward is not None:
            return forward(last_only=last_only, **inputs)
        if last_only:
            inputs["logits_to_keep"] = torch.tensor([-1], device=base.device)
        return base.model(use_cache=True, **inputs)


def _new_positions(base: BaseModel, inputs: dict[str, Any]) -> torch.Tensor | None:
    """``[B, L]``, 1 where a pass of several positions has a token, for skipping its padding
    (:mod:`service.model.packing`, :func:`~service.model.attention.last_query_rows`); on a CPU only.
    (On a GPU the multiplies of these small passes run in parallel anyway, and finding the real
    positions would wait for the device; unmeasured, so left as it was.)"""
    new = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
    mask = inputs.get("attention_mask")
    if base.device.type != "cpu" or new.shape[1] == 1 or mask is None or mask.dim() != 2:
        return None
    return mask[:, -new.shape[1] :]


@torch.no_grad()
def generate(
    base: BaseModel,
    requests: list[GenerationRequest],
    cache: ImageFeatureCache | None = None,
    timing: BatchTiming | None = None,
    adapter: AdapterWeights | None = None,
    prefixes: PrefixCache | None = None,
) -> list[GenerationResult]:
    """Answer a batch of requests in one set of forward passes (rows may use different slots).

    ``adapter`` applies one (e.g. still training) adapter to every row instead of the slots;
    ``prefixes`` caches and reuses image prefixes (see :meth:`RunningBatch.prefill`).
    """
    if not requests:
        return []
    batch = RunningBatch.prefill(base, requests, cache=cache, adapter=adapter, prefixes=prefixes)
    results: list[GenerationResult | None] = [None] * len(requests)
    while batch:
        for index, result in batch.step():
            results[index] = result
    if timing is not None:  # the rows share their prefill; the last to finish saw every decode step
        timing.vision_ms += results[0].timing.vision_ms
        timing.prefill_ms += results[0].timing.prefill_ms
        timing.decode_ms += max(r.timing.decode_ms for r in results)
    return results
