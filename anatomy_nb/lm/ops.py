"""Model operations, written once and shared by every stage: residual capture at a layer (with the
forward pass cut there), the shared-prefix forward (a prompt once, several responses on its KV
cache), residual-stream edits (steering, ablation), batched generation, log-probabilities and
A/B answer probabilities.

SAE training, extraction, the interventions, evaluation and the explainer all call these; none of
them registers its own hooks or writes its own generation loop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from ..data.chat import prompt_ids, render_example, render_prompt, truncate_prompt
from .models import LoadedModel

__all__ = [
    "ResidualCapture",
    "ResidualEdit",
    "ResidualHooks",
    "ab_probabilities",
    "decoder_layers",
    "generate",
    "pair_logps",
    "pair_token_ids",
    "promoted_tokens",
    "response_residuals",
    "truncated_to_layer",
]


# --- the residual stream at a layer ---------------------------------------------------------------


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks of a causal LM (Llama, Mistral, Qwen, Gemma, GPT-2 style)."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    for attr in ("layers", "h", "blocks"):
        layers = getattr(base, attr, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise AttributeError(f"cannot find the decoder layers of {type(model).__name__}")


@contextmanager
def truncated_to_layer(model, layer: int) -> Iterator[Any]:
    """Temporarily keep only blocks 0..layer, so a forward pass stops at the hooked layer.

    Yields the inner base model (no LM head). Its ``last_hidden_state`` is the final norm of the
    residual after ``layer``; read the un-normed residual with a hook on block ``layer``.
    """
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has {len(layers)} layers")
    attr = next(a for a in ("layers", "h", "blocks") if getattr(base, a, None) is layers)
    setattr(base, attr, torch.nn.ModuleList(list(layers)[: layer + 1]))
    try:
        yield base
    finally:
        setattr(base, attr, layers)


@cache
def _cache_argument(forward_of: type) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x warns on the old name)."""
    return "cache" if "cache" in inspect.signature(forward_of.forward).parameters else "past_key_values"


def with_cache(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword that passes a KV cache to ``module``'s forward, whichever name it takes."""
    return {_cache_argument(type(module)): cache}


class ResidualCapture:
    """Run a model only up to the deepest of ``layers`` (early exit) and keep the residual stream
    after each of them. A context manager: the hooks and the cut are undone on exit, also on error.

    ``capture(ids)`` returns the residual after the first layer, (batch, tokens, d_model);
    ``capture.at[layer]`` holds every requested layer's after a call."""

    def __init__(self, lm: LoadedModel, layers: int | Sequence[int]):
        self.lm = lm
        self.layers = [int(layers)] if isinstance(layers, int) else [int(x) for x in layers]
        self.at: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> ResidualCapture:
        blocks = decoder_layers(self.lm.model)
        try:
            for layer in self.layers:
                self._handles.append(blocks[layer].register_forward_hook(self._hook(layer)))
            self._cut = truncated_to_layer(self.lm.model, max(self.layers))
            self.base = self._cut.__enter__()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._cut.__exit__(*exc)
        finally:
            self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: int) -> Callable:
        def hook(module, inputs, output):
            self.at[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        device = self.lm.device
        kwargs = {"attention_mask": attention_mask.to(device)} if attention_mask is not None else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.to(device)
        self.base(input_ids=input_ids.to(device), use_cache=cache is not None, **with_cache(self.base, cache), **kwargs)
        return self.at[self.layers[0]]

    @torch.no_grad()
    def shared_prefix(
        self, prompt: list[int], responses: Sequence[list[int]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Residual (float) at the prompt's positions and at each response's positions. The prompt
        runs once; its KV cache serves every response, and the responses run as one batch."""
        return self.shared_prefix_batch([prompt], [responses])[0]

    @torch.no_grad()
    def shared_prefix_batch(
        self, prompts: Sequence[list[int]], responses: Sequence[Sequence[list[int]]]
    ) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """``shared_prefix`` for several prompts at once (each with the same number of responses),
        in two forwards, so a GPU is kept busy.

        Prompts are right-padded; their KV cache is repeated once per response; the responses are
        right-padded after the padded prompts, with an attention mask that hides every prompt's
        pads and position ids that continue each prompt's own length, so each row computes what
        ``prompt + response`` alone would (causal attention never lets a real token see a later pad).
        """
        n = len(responses[0])
        if any(len(r) != n for r in responses) or len(prompts) != len(responses):
            raise ValueError("shared_prefix_batch needs one list of responses per prompt, all of the same length")
        pad = self.lm.tokenizer.pad_token_id or 0
        lengths = torch.tensor([len(p) for p in prompts])
        P = int(lengths.max())
        prompt_mask = torch.arange(P)[None, :] < lengths[:, None]
        ids = torch.tensor([list(p) + [pad] * (P - len(p)) for p in prompts])
        cache = DynamicCache()
        prompt_resid = self(ids, attention_mask=prompt_mask.long(), cache=cache).float()
        flat = [list(r) for rs in responses for r in rs]
        R = max(len(r) for r in flat)
        if R == 0:
            empty = prompt_resid.new_zeros((0, prompt_resid.shape[-1]))
            return [(prompt_resid[i, : len(p)], [empty] * n) for i, p in enumerate(prompts)]
        cache.batch_repeat_interleave(n)
        resp_len = torch.tensor([len(r) for r in flat])
        resp_mask = torch.arange(R)[None, :] < resp_len[:, None]
        batch = torch.tensor([r + [pad] * (R - len(r)) for r in flat])
        mask = torch.cat([prompt_mask.repeat_interleave(n, 0), resp_mask], 1).long()
        positions = lengths.repeat_interleave(n)[:, None] + torch.arange(R)[None, :]
        x = self(batch, attention_mask=mask, position_ids=positions, cache=cache).float()
        return [
            (prompt_resid[i, : len(p)], [x[i * n + j, : len(flat[i * n + j])] for j in range(n)])
            for i, p in enumerate(prompts)
        ]

    @torch.no_grad()
    def separately(self, prompt: list[int], responses: Sequence[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The same as ``shared_prefix`` with prompt + response run once per response (the naive
        baseline the benchmark compares against)."""
        P = len(prompt)
        outs = []
        for r in responses:
            x = self(torch.tensor([prompt + list(r)]))
            outs.append(x[0, P:].float())
        return x[0, :P].float(), outs


def response_residuals(
    lm: LoadedModel,
    layer: int,
    items: Sequence[tuple[Sequence[dict], str]],
    *,
    max_prompt_tokens: int | None = None,
    max_response_tokens: int | None = None,
) -> Iterator[torch.Tensor]:
    """Per (prompt messages, response): the residual stream after block ``layer`` at the response's
    tokens (float, (tokens, d_model); empty for an empty response). Prompts longer than
    ``max_prompt_tokens`` keep their first and last tokens, as in stage 1."""
    with ResidualCapture(lm, layer) as capture:
        for messages, response in items:
            r = render_example(lm.tokenizer, messages, response)
            resp = r.response_ids[:max_response_tokens] if max_response_tokens else r.response_ids
            if not resp:
                yield torch.zeros(0, lm.d_model)
                continue
            p_ids = (
                truncate_prompt(r.prompt_ids, r.prompt_content, max_prompt_tokens)[0]
                if max_prompt_tokens
                else r.prompt_ids
            )
            yield capture(torch.tensor([p_ids + resp]))[0, len(p_ids) :].float()


# --- editing the residual stream ---------------------------------------------------------------------


@dataclass
class ResidualEdit:
    """One edit of the residual stream after block ``layer``.

    steer: h + vector. ablate: h − fraction·((h − mean)·Qᵀ)·Q (zero ablation: mean = 0), i.e. the
    component in span(Q) is replaced by the mean's (scaled by ``fraction``). interchange (DAS): at
    one position per sequence, the component in span(Q) is replaced by a source run's,
    h + ((source − h)·Qᵀ)·Q; ``basis`` may carry gradients (the subspace being learned). With
    ``positions=None`` the interchange covers every position (``source``: (batch, seq, d_model))
    and ``basis`` may be one per sequence, (batch, k, d_model) (HyperDAS)."""

    layer: int
    kind: str  # "steer" | "ablate" | "interchange"
    concept: str = ""
    vector: torch.Tensor | None = None  # steer: α·v (d_model)
    basis: torch.Tensor | None = None  # ablate: (k, d_model) orthonormal rows
    mean: torch.Tensor | None = None  # ablate="mean": the mean residual (d_model)
    fraction: float = 1.0
    in_reference: bool = False  # does the DPO reference pass see it? (stages.interventions docstring)
    # interchange: the source residuals (batch, d_model), or (batch, seq, d_model) with positions=None
    source: torch.Tensor | None = None
    # interchange: the position edited in each sequence (batch,); None: every position
    positions: torch.Tensor | None = None

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "steer":
            return h + self.vector.to(device=h.device, dtype=h.dtype)
        if self.kind == "interchange":
            Q = self.basis.to(device=h.device, dtype=h.dtype)
            if self.positions is None:
                delta = self.source.to(h)[:, : h.shape[1]] - h
                if Q.dim() == 2:
                    return h + (delta @ Q.T) @ Q
                return h + torch.einsum("btk,bkd->btd", torch.einsum("btd,bkd->btk", delta, Q), Q)
            rows = torch.arange(h.shape[0], device=h.device)
            at = h[rows, self.positions]
            h = h.clone()
            h[rows, self.positions] = at + ((self.source.to(h) - at) @ Q.T) @ Q
            return h
        Q = self.basis.to(device=h.device, dtype=h.dtype)
        centred = h if self.mean is None else h - self.mean.to(device=h.device, dtype=h.dtype)
        return h - self.fraction * (centred @ Q.T) @ Q


class ResidualHooks:
    """Forward hooks that apply ``edits`` on the decoder blocks of ``model`` while the context is
    open; removed on exit, also on error. ``reference()`` turns off the edits the reference pass
    must not see."""

    def __init__(self, model: torch.nn.Module, edits: Sequence[ResidualEdit]):
        self.model, self.edits = model, list(edits)
        self._handles: list = []
        self._reference = False

    def _hook_for(self, edits: list[ResidualEdit]) -> Callable:
        def hook(module, inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            for e in edits:
                if self._reference and not e.in_reference:
                    continue
                h = e.apply(h)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

        return hook

    def __enter__(self) -> ResidualHooks:
        layers = decoder_layers(self.model)
        by_layer: dict[int, list[ResidualEdit]] = {}
        for e in self.edits:
            if not 0 <= e.layer < len(layers):
                raise ValueError(f"{e.concept}: layer {e.layer} out of range (the model has {len(layers)} layers)")
            by_layer.setdefault(e.layer, []).append(e)
        try:
            for layer, edits in sorted(by_layer.items()):
                self._handles.append(layers[layer].register_forward_hook(self._hook_for(edits)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def reference(self) -> Iterator[None]:
        """While open, only the edits with ``in_reference`` apply (ablation, not steering)."""
        prev, self._reference = self._reference, True
        try:
            yield
        finally:
            self._reference = prev


# --- generation, log-probabilities, A/B answers ------------------------------------------------------


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    max_prompt_tokens: int | None = 384,
) -> tuple[list[str], list[int]]:
    """Responses (decoded, special tokens dropped) and their new-token counts, in prompt order.

    Batches are length-sorted and left-padded; the seed is set once per call, so a sampled
    evaluation is reproducible model by model. ``max_prompt_tokens``: keep the prompt's last tokens
    (None: all)."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id
    ids = [prompt_ids(tok, p, max_prompt_tokens) if max_prompt_tokens else render_prompt(tok, p)[0] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts, counts = [""] * len(ids), [0] * len(ids)
    torch.manual_seed(seed)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        L = max(len(ids[i]) for i in chunk)
        input_ids = torch.tensor([[pad] * (L - len(ids[i])) + ids[i] for i in chunk], device=lm.device)
        mask = torch.tensor([[0] * (L - len(ids[i])) + [1] * len(ids[i]) for i in chunk], device=lm.device)
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
        out = lm.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            **kw,
        )
        for row, i in enumerate(chunk):
            new = out[row, L:].tolist()
            if eos in new:
                new = new[: new.index(eos)]
            counts[i] = len(new)
            texts[i] = tok.decode(new, skip_special_tokens=True)
    return texts, counts


def pair_token_ids(
    tok, messages: Sequence[dict], chosen: str, rejected: str, max_length: int
) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids: each response is kept whole up to max_length − 16
    tokens, and the prompt keeps its first token and its most recent ones so that the prompt and
    the longer response fit ``max_length`` (as stage 1 truncates)."""
    ids, content = render_prompt(tok, messages)
    resp = [list(tok(r, add_special_tokens=False)["input_ids"])[: max(1, max_length - 16)] for r in (chosen, rejected)]
    prompt, _, _ = truncate_prompt(ids, content, max(2, max_length - max(map(len, resp))))
    return prompt, resp[0], resp[1]


@torch.no_grad()
def pair_logps(
    lm: LoadedModel, pairs: Sequence[tuple[Sequence[dict], str, str]], *, max_length: int = 256
) -> np.ndarray:
    """(n, 2): summed log-probability of the chosen and the rejected response given their prompt
    (chat template applied). The prompt runs once and its KV cache serves both responses, as in
    stage 1's extraction: the prompt is most of an HH-RLHF pair's tokens."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = np.zeros((len(pairs), 2))
    for i, (messages, chosen, rejected) in enumerate(pairs):
        prompt, *resp = pair_token_ids(tok, messages, chosen, rejected, max_length)
        cache = DynamicCache()
        first = (
            lm.model(
                input_ids=torch.tensor([prompt], device=lm.device),
                use_cache=True,
                logits_to_keep=1,
                **with_cache(lm.model, cache),
            )
            .logits[0, -1:]
            .float()
        )
        cache.batch_repeat_interleave(2)
        R = max(map(len, resp))
        # right padding needs no mask: under causal attention no real token sees a later pad
        batch = torch.tensor([r + [pad] * (R - len(r)) for r in resp], device=lm.device)
        logits = lm.model(input_ids=batch, use_cache=True, **with_cache(lm.model, cache)).logits.float()
        for j, r in enumerate(resp):
            # the logits that predict each response token
            lg = torch.cat([first, logits[j, : max(len(r) - 1, 0)]])[: len(r)]
            out[i, j] = float(torch.log_softmax(lg, -1).gather(-1, batch[j, : len(r), None]).sum())
    return out


@torch.no_grad()
def ab_probabilities(
    lm: LoadedModel,
    prompts: Sequence[Sequence[dict]],
    answers: Sequence[tuple[str, str]],
    *,
    max_prompt_tokens: int = 384,
    batch_size: int = 8,
) -> np.ndarray:
    """P(first answer) / (P(first) + P(second)) at the token where the two answers first differ.

    For "(A)" vs "(B)" that is the letter after the shared "(": the answer-letter probability,
    one forward pass per item, robust to how a tokenizer splits the brackets."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs, cand = [], []
    for messages, (a, b) in zip(prompts, answers):
        p = prompt_ids(tok, messages, max_prompt_tokens)
        ta = tok(a, add_special_tokens=False)["input_ids"]
        tb = tok(b, add_special_tokens=False)["input_ids"]
        k = 0
        while k < min(len(ta), len(tb)) and ta[k] == tb[k]:
            k += 1
        if k == len(ta) or k == len(tb):
            raise ValueError(
                f"answers {a!r} and {b!r} are not distinguishable at a token (one is a prefix of the other)"
            )
        seqs.append(p + ta[:k])
        cand.append((ta[k], tb[k]))
    out = np.zeros(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        L = max(len(seqs[i]) for i in chunk)
        ids = torch.tensor([seqs[i] + [pad] * (L - len(seqs[i])) for i in chunk], device=lm.device)
        att = torch.tensor([[1] * len(seqs[i]) + [0] * (L - len(seqs[i])) for i in chunk], device=lm.device)
        logits = lm.model(input_ids=ids, attention_mask=att).logits.float()
        for row, i in enumerate(chunk):
            last = logits[row, len(seqs[i]) - 1]
            two = torch.stack([last[cand[i][0]], last[cand[i][1]]])
            out[i] = float(torch.softmax(two, 0)[0])
    return out


@torch.no_grad()
def promoted_tokens(lm: LoadedModel, directions: torch.Tensor | np.ndarray, n: int) -> list[str]:
    """Per direction (a row in the residual stream), the ``n`` tokens it promotes most through the
    final norm's scale and the unembedding, as one readable string."""
    W_U = lm.model.get_output_embeddings().weight.detach().float().cpu()
    norm = getattr(getattr(lm.model, "model", lm.model), "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        W_U = W_U * norm.weight.detach().float().cpu()
    dirs = torch.nn.functional.normalize(torch.as_tensor(np.asarray(directions), dtype=torch.float32), dim=-1)
    top = (dirs @ W_U.T).topk(n, dim=-1).indices
    tok = lm.tokenizer
    return [" · ".join(repr(tok.decode([int(t)]))[1:-1] for t in row) for row in top]
