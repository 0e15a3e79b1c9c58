"""BiTA: bi-directional tuning for lossless acceleration (Lin et al., 2024, arXiv:2401.12522).

A frozen causal LM learns to draft its own next tokens, and checks the previous drafts in the same
forward pass. The only trainable parameters are

    prefix   K_p^ℓ, V_p^ℓ ∈ ℝ^{H×P×d_h} for every layer ℓ   P "prompt tokens" (P-tuning v2): raw keys and
                                                             values, no RoPE, no sequence positions
    masks    m_1 … m_M ∈ ℝ^d                                 input embeddings of M "mask tokens"

and one attention rule makes the method lossless: only mask rows see the prefix, and no real or
candidate row sees a mask. Real and candidate rows therefore compute exactly the base model's
logits. Mask k, attached after a token at position t (it sits at position t + k and sees that token,
its past and masks 1 … k of its own group), predicts the token at t + k + 1; the base model's own
next-token output covers t + 1.

Training (self-distilled pairs: prompt p, the base model's greedy response r). Groups start at
consecutive offsets s (at most G of them, a random window for long responses); group s sees p and
r_<s, mask k of the group sits at position |p| + s + k − 1 and its target is r_{s+k}:

    L = mean over (example, s, k) of CE(W_lm · norm(h_{s,k}), r_{s+k})          (labels unshifted)

The real tokens' keys and values do not depend on θ, so training runs them once without gradient
and back-propagates only through the G·M mask rows attending to that cache.

Decoding (greedy, batch 1, KV cache of committed tokens only). One forward pass takes the newest
committed token x_t, a draft tree built from the previous pass's mask predictions (upper triangle:
level m holds the top-w_m drafts for offset m, children of level m−1's top-1 node), and one group
of masks attached to x_t and to every tree node. Walking the tree, a node is accepted iff its token
equals the base argmax at its parent; the base argmax after the last accepted node is the bonus
token, and the mask group of that node drafts the next tree. Every emitted token is thus a base
argmax on the committed prefix: the output equals plain greedy decoding. The cache then keeps x_t
and the accepted nodes and drops every other row.
"""
from __future__ import annotations

import dataclasses
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from peftlab.adapters import AdapterConfigError
from peftlab.models import with_cache
from peftlab.train import Objective

IGNORE_INDEX = -100
ATTENTION = "peftlab_bita"  # the attention implementation registered with transformers while BiTA runs
CPU_TREE = (1, 1, 1)        # default draft tree on CPU, chosen by bench/bita.py (docs/benchmarks.md)
GPU_TREE = (5, 4, 3)        # the paper's upper triangle; a wide tree costs little on a GPU at batch 1
ONE_PROJECTION_ROWS = 32    # steps up to this many rows project all of them through the output layer in one go


class BitaError(AdapterConfigError):
    """A model, file or setting BiTA cannot work with; the message names the fix."""


def parse_tree(text: str | None) -> tuple[int, ...] | None:
    """Draft-tree widths from text: "5,4,3" -> (5, 4, 3); empty -> None (the hardware's default)."""
    if text is None or not text.strip():
        return None
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise BitaError(f"draft tree {text!r} is not a list of positive widths: use e.g. 1,1,1 (a chain) or 5,4,3")
    return widths


@dataclass(frozen=True)
class BitaConfig:
    prompt_tokens: int = 16        # P: prefix key/value vectors per layer (one per query head: the paper's form)
    mask_tokens: int = 3           # M: drafts per pass (3 for ≤13B models, 4 for 33B–70B in the paper)
    prefix_dropout: float = 0.1    # dropout on the prefix while training
    init_std: float = 0.02         # N(0, init_std²) for both tables (HF's initializer_range)

    def __post_init__(self):
        for name in ("prompt_tokens", "mask_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BitaError(f"BiTA {name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise BitaError(f"BiTA prefix_dropout must be in [0, 1), got {self.prefix_dropout}")
        if not self.init_std > 0:
            raise BitaError(f"BiTA init_std must be positive, got {self.init_std}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Bita(nn.Module):
    """The prefix keys/values and the mask embeddings (float32), and BiTA's forward pass."""
    name = "bita"

    def __init__(self, config: BitaConfig, model_config, vocab_size: int, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        heads = model_config.num_attention_heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        layers, P, M = model_config.num_hidden_layers, config.prompt_tokens, config.mask_tokens
        self.prefix = nn.Parameter(torch.randn(layers, 2, heads, P, head_dim, generator=generator) * config.init_std)
        self.mask_embeddings = nn.Parameter(torch.randn(M, model_config.hidden_size, generator=generator)
                                            * config.init_std)
        self.mask_id = vocab_size  # ids V … V+M−1 are the masks; the vocabulary and the output layer stay as they are

    def describe(self) -> dict:
        return {"name": self.name, **self.config.to_dict()}

    def embed(self, embed_tokens: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        is_mask = ids >= self.mask_id
        tokens = embed_tokens(ids.masked_fill(is_mask, 0))
        masks = self.mask_embeddings.to(tokens.dtype)[(ids - self.mask_id).clamp(min=0, max=len(self.mask_embeddings) - 1)]
        return torch.where(is_mask[..., None], masks, tokens)

    def hidden(self, model, ids: torch.Tensor, positions: torch.Tensor, sees: torch.Tensor, cache=None,
               use_prefix: bool = True):
        """Final hidden states of ``ids`` at ``positions``; ``sees[b, i, j]`` says whether row i attends to
        column j of [prefix (P, if ``use_prefix``) | cache | ids]. New keys and values go into ``cache``."""
        decoder = model.get_decoder()
        prefix = F.dropout(self.prefix, self.config.prefix_dropout, self.training) if use_prefix else None
        with _attention_implementation(model):
            out = decoder(inputs_embeds=self.embed(decoder.embed_tokens, ids), attention_mask=sees[:, None],
                          position_ids=positions, **with_cache(decoder, cache), use_cache=cache is not None,
                          bita_prefix=prefix)
        return out.last_hidden_state


# -- attention: the prefix joins the keys of every layer, after RoPE ---------------------------------

def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, bita_prefix=None, **kwargs):
    """Scaled dot-product attention over [prefix | keys]; the boolean mask says who sees what."""
    heads = query.shape[1]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)  # GQA: the prefix has one vector per query head
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    if bita_prefix is not None:
        prefix = bita_prefix[module.layer_idx].to(query.dtype)  # [2, H, P, d_h]
        batch = query.shape[0]
        key = torch.cat([prefix[0].expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix[1].expand(batch, -1, -1, -1), value], dim=2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _attention)  # once; a model uses it only inside the context below


@contextmanager
def _attention_implementation(model):
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


# -- attaching, saving, restoring ---------------------------------------------------------------------

def add_bita(model: nn.Module, config: BitaConfig = BitaConfig(), seed: int = 0) -> Bita:
    """Freeze ``model`` and attach BiTA's prompt and mask tokens to it (``model.peftlab_method``)."""
    from peftlab.methods import attached

    if attached(model) is not None:
        raise BitaError(f"the model already has the model-level method {attached(model).name!r}: load a fresh model")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if decoder is None or not hasattr(decoder, "embed_tokens") or not layers \
            or not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx") for layer in layers):
        raise BitaError(f"BiTA needs a Llama-style decoder (embed_tokens, layers[i].self_attn with layer_idx); "
                        f"{type(model).__name__} has none: use a Llama, Mistral, Qwen or SmolLM model")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    vocab = decoder.embed_tokens.num_embeddings
    bita = Bita(config, model.config, vocab, torch.Generator().manual_seed(seed))
    model.peftlab_method = bita.to(next(model.parameters()).device)
    return bita


def restore(model: nn.Module, described: dict, tensors: dict) -> None:
    """Re-attach BiTA from an adapter file (``peftlab.methods.restore``)."""
    from peftlab.methods import rebuild

    rebuild(model, described, tensors, BitaConfig, add_bita, lambda m: delattr(m, "peftlab_method"), BitaError,
            "BiTA tensors")


def bita_of(model: nn.Module) -> Bita:
    method = getattr(getattr(model, "module", model), "peftlab_method", None)
    if not isinstance(method, Bita):
        raise BitaError("the model has no BiTA tokens: train them with `peftlab train --method bita` and load the "
                        "run with --adapter, or call add_bita()")
    return method


# -- training ---------------------------------------------------------------------------------------

def training_example(prompt_ids: Sequence[int], response_ids: Sequence[int], bita: Bita, max_groups: int = 64,
                     rng: random.Random | None = None) -> dict | None:
    """One packed training sequence: prompt, the response cut before the last group, then G groups of M
    masks (None when the response is too short to label a whole group)."""
    M, S, T = bita.config.mask_tokens, len(prompt_ids), len(response_ids)
    if T - M <= 0:
        return None
    first = (rng or random).randint(0, T - M - max_groups) if T - M > max_groups else 0
    starts = range(first, min(T - M, first + max_groups))
    real = list(prompt_ids) + list(response_ids[:starts[-1]])
    return {"input_ids": real + [bita.mask_id + k for _ in starts for k in range(M)],
            "labels": [IGNORE_INDEX] * len(real) + [response_ids[s + k] for s in starts for k in range(1, M + 1)],
            "position_ids": list(range(len(real))) + [S + s + k - 1 for s in starts for k in range(1, M + 1)],
            "visible": [S + s for s in starts],  # real tokens each group sees
            "n_real": len(real)}


def training_data(pairs: Sequence[dict], bita: Bita, max_groups: int = 64, repeats: int = 1, seed: int = 0,
                  max_length: int | None = None) -> list[dict]:
    """Examples from distillation records (``prompt_ids``, ``response_ids``); each pair appears ``repeats``
    times with its own seeded window of groups (the paper resamples ×4). ``max_length`` cuts the response."""
    rng = random.Random(seed)
    examples = []
    for _ in range(repeats):
        for pair in pairs:
            prompt, response = pair["prompt_ids"], pair["response_ids"]
            if max_length is not None:
                prompt = prompt[-max_length:]  # keep the prompt's end: the tokens the answer follows
                response = response[:max(0, max_length - len(prompt))]
            example = training_example(prompt, response, bita, max_groups, rng)
            if example is not None:
                examples.append(example)
    return examples


def collate(features: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad packed examples into the two parts BiTA's training forward takes: the real tokens (causal) and
    the mask groups, with who-sees-what for the masks over [prefix | real | masks]."""
    n_real = [f["n_real"] for f in features]
    R, Q = max(n_real), max(len(f["input_ids"]) - r for f, r in zip(features, n_real))
    B = len(features)
    real_ids = torch.full((B, R), pad_id, dtype=torch.long)
    real_sees = torch.zeros(B, R, R, dtype=torch.bool)
    mask_ids = torch.full((B, Q), pad_id, dtype=torch.long)
    mask_positions = torch.zeros(B, Q, dtype=torch.long)
    labels = torch.full((B, Q), IGNORE_INDEX, dtype=torch.long)
    group_of = torch.full((B, Q), -1, dtype=torch.long)
    visible = torch.zeros(B, Q, dtype=torch.long)
    attention = torch.zeros(B, R + Q, dtype=torch.long)
    causal = torch.ones(R, R, dtype=torch.bool).tril()
    for b, (f, r) in enumerate(zip(features, n_real)):
        q = len(f["input_ids"]) - r
        per_group = q // len(f["visible"])
        real_ids[b, :r] = torch.tensor(f["input_ids"][:r])
        real_sees[b] = causal
        real_sees[b, :, r:] = False
        real_sees[b, torch.arange(r, R), torch.arange(r, R)] = True  # padding rows see themselves: no empty row
        mask_ids[b, :q] = torch.tensor(f["input_ids"][r:])
        mask_positions[b, :q] = torch.tensor(f["position_ids"][r:])
        labels[b, :q] = torch.tensor(f["labels"][r:])
        group_of[b, :q] = torch.arange(q) // per_group
        visible[b, :q] = torch.tensor(f["visible"]).repeat_interleave(per_group)
        attention[b, :r], attention[b, R:R + q] = 1, 1
    return {"real_ids": real_ids, "real_sees": real_sees, "mask_ids": mask_ids, "mask_positions": mask_positions,
            "labels": labels, "group_of": group_of, "visible": visible, "attention_mask": attention}


def mask_visibility(group_of: torch.Tensor, visible: torch.Tensor, prompt_tokens: int, real: int) -> torch.Tensor:
    """sees[b, i, j] over [prefix | real | masks] for mask rows: the prefix, the first ``visible`` real tokens,
    and the earlier masks of the row's own group (padding rows: the prefix and themselves)."""
    B, Q = group_of.shape
    sees_real = torch.arange(real, device=visible.device) < visible[..., None]
    index = torch.arange(Q, device=group_of.device)
    same_group = (group_of[:, :, None] == group_of[:, None, :]) & (index[None, None, :] <= index[None, :, None])
    same_group |= torch.eye(Q, dtype=torch.bool, device=group_of.device)
    prefix = torch.ones(B, Q, prompt_tokens, dtype=torch.bool, device=group_of.device)
    return torch.cat([prefix, sees_real, same_group], dim=2)


def mask_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of every mask row of a batch from ``collate``, example by example."""
    from transformers import DynamicCache

    inner = getattr(model, "module", model)
    bita = bita_of(inner)
    P, (B, R) = bita.config.prompt_tokens, batch["real_ids"].shape
    cache = DynamicCache(config=inner.config)
    with torch.no_grad():  # the real tokens' keys and values do not depend on BiTA's parameters
        bita.hidden(inner, batch["real_ids"], torch.arange(R, device=batch["real_ids"].device).expand(B, R),
                    batch["real_sees"], cache, use_prefix=False)
    sees = mask_visibility(batch["group_of"], batch["visible"], P, R)
    hidden = bita.hidden(inner, batch["mask_ids"], batch["mask_positions"], sees, cache)
    rows = batch["labels"] != IGNORE_INDEX
    return inner.get_output_embeddings()(hidden[rows]), batch["labels"][rows]


def training_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ CE over the mask rows (unshifted: a mask row's target is its own label, r_{s+k})."""
    logits, targets = mask_logits(model, batch)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class BitaObjective(Objective):
    """The shared loop's seam for BiTA: the mask-row loss, divided by the number of mask labels."""

    def loss(self, model, batch):
        return training_loss(model, batch)

    def units(self, example: dict) -> int:
        return sum(1 for label in example["labels"] if label != IGNORE_INDEX)


# -- decoding -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TreeLayout:
    """The rows of one decoding step, fixed by the tree's widths: [x_t | tree nodes | one mask group per
    anchor (x_t, then every node)], with their position offsets from t and who sees whom among them."""
    widths: tuple[int, ...]
    parent: list[int]         # row of each row's parent (x_t: -1; a mask: its anchor)
    offset: list[int]         # position − t
    group: list[int]          # first mask row of each anchor's group (anchors: x_t = row 0, node i = row i)
    sees: torch.Tensor        # [q, q] bool, among this step's rows
    reads_prefix: torch.Tensor  # [q] bool: the mask rows

    @property
    def nodes(self) -> int:
        return sum(self.widths)

    @staticmethod
    def build(widths: Sequence[int]) -> "TreeLayout":
        widths, depth = tuple(int(w) for w in widths), len(widths)
        parent, offset = [-1], [0]
        top = 0  # the row whose children the next level holds: x_t, then each level's top-1 node
        for level, width in enumerate(widths, 1):
            first = len(parent)
            parent += [top] * width
            offset += [level] * width
            top = first
        anchors = len(parent)
        group = []
        for anchor in range(anchors):
            group.append(len(parent))
            for k in range(1, depth + 1):  # mask k of the group: after the anchor (or the previous mask)
                parent.append(anchor if k == 1 else len(parent) - 1)
                offset.append(offset[anchor] + k)
        q = len(parent)
        sees = torch.eye(q, dtype=torch.bool)
        for row in range(q):  # a row sees its ancestors (x_t is every row's ancestor) and itself
            up = parent[row]
            while up >= 0:
                sees[row, up] = True
                up = parent[up]
        reads_prefix = torch.zeros(q, dtype=torch.bool)
        reads_prefix[anchors:] = True
        return TreeLayout(widths, parent, offset, group, sees, reads_prefix)


@dataclass
class Decoded:
    """What one accelerated generation produced, and how."""
    tokens: list[int]
    forwards: int = 0                                  # forward passes, the prefill included
    per_forward: list[int] = field(default_factory=list)  # tokens committed by each forward
    drafted: list[bool] = field(default_factory=list)     # per token: an accepted draft (True) or a base argmax
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(1, self.forwards)


def check_tree(widths: Sequence[int], bita: Bita, vocab_size: int) -> None:
    """Refuse a draft tree BiTA cannot build: 1 to M levels (one per trained mask token), each of 1 to
    ``vocab_size`` drafts (a level holds the top-w tokens of the vocabulary)."""
    M, text = bita.config.mask_tokens, ",".join(map(str, widths))
    if not widths or len(widths) > M or min(widths) < 1:
        raise BitaError(f"the draft tree {text!r} must have 1 to {M} levels (the mask tokens trained), "
                        f"each of width >= 1: e.g. {','.join(['1'] * M)}")
    if max(widths) > vocab_size:
        raise BitaError(f"the draft tree {text!r} has a level of {max(widths)} drafts, more than the {vocab_size} "
                        f"tokens of the vocabulary: use widths of at most {vocab_size}, e.g. {','.join(['1'] * M)}")


def _keep(cache, length: int, rows: list[int]) -> None:
    """Cut every layer of ``cache`` to its first ``length`` entries plus this step's ``rows``."""
    for layer in cache.layers:
        index = torch.tensor(rows, device=layer.keys.device) + length
        layer.keys = torch.cat([layer.keys[:, :, :length], layer.keys.index_select(2, index)], dim=2)
        layer.values = torch.cat([layer.values[:, :, :length], layer.values.index_select(2, index)], dim=2)


def _eos_ids(model, eos_token_id) -> set[int]:
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    return set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])


@torch.no_grad()
def bita_generate(model, input_ids, max_new_tokens: int = 256, tree: Sequence[int] | None = None,
                  eos_token_id=None, drafter: Callable[[list[int]], list[list[int]]] | None = None,
                  inspect: Callable[[object, list[int]], None] | None = None) -> Decoded:
    """Greedy decoding of one prompt, drafting with BiTA's masks and verifying in the same pass; the tokens
    equal ``model.generate(do_sample=False)``'s. ``tree`` gives the draft tree's widths per level (at most
    M levels; default: CPU_TREE or GPU_TREE). For tests: ``drafter(committed ids)`` replaces the mask
    drafts with ranked lists per level; ``inspect(cache, ids)`` sees the cache after every step with the
    ids it must hold (the committed tokens but the newest)."""
    from transformers import DynamicCache

    bita = bita_of(model)
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise BitaError(f"BiTA decodes one sequence at a time, got a batch of {ids.shape[0]}: "
                            "call it once per prompt")
        ids = ids[0]
    if ids.numel() == 0 or max_new_tokens <= 0:
        raise BitaError(f"BiTA needs a non-empty prompt and max_new_tokens > 0 (got {ids.numel()} tokens, "
                        f"{max_new_tokens})")
    device = next(model.parameters()).device
    widths = tuple(tree) if tree is not None else (GPU_TREE if device.type == "cuda" else CPU_TREE)
    head = model.get_output_embeddings()
    check_tree(widths, bita, head.weight.shape[0])
    layout = TreeLayout.build(widths)
    D, P, eos = len(widths), bita.config.prompt_tokens, _eos_ids(model, eos_token_id)
    was_training = bita.training
    bita.eval()
    started = time.perf_counter()
    out = Decoded(tokens=[])

    # Prefill: the prompt, causal, and one group of D masks after its last token.
    prompt = ids.tolist()
    n = len(prompt)
    step_ids = torch.tensor(prompt + [bita.mask_id + k for k in range(D)], device=device)
    positions = torch.tensor(list(range(n)) + [n - 1 + k for k in range(1, D + 1)], device=device)
    sees = torch.ones(n + D, P + n + D, dtype=torch.bool, device=device).tril(P)
    sees[:n, :P] = False
    cache = DynamicCache(config=model.config)
    hidden = bita.hidden(model, step_ids[None], positions[None], sees[None], cache)[0]
    out.forwards = 1
    logits = head(hidden[[n - 1] + list(range(n, n + D))])
    emitted = [int(logits[0].argmax())]
    drafts = logits[1:].topk(max(widths), dim=-1).indices.tolist()
    _keep(cache, 0, list(range(n)))
    if inspect is not None:
        inspect(cache, prompt)
    out.per_forward.append(1)
    out.drafted.append(False)
    t = n  # position of the newest committed token, which the cache does not hold yet

    offsets = torch.tensor(layout.offset, device=device)
    level_rows = [list(range(1 + sum(widths[:m]), 1 + sum(widths[:m + 1]))) for m in range(D)]
    mask_ids = [bita.mask_id + k for k in range(D)] * (1 + layout.nodes)
    new_sees, reads_prefix = layout.sees.to(device), layout.reads_prefix.to(device)
    while len(emitted) < max_new_tokens and emitted[-1] not in eos:
        if drafter is not None:
            drafts = drafter(prompt + emitted)
        tokens = [emitted[-1]] + [int(drafts[m][i]) for m in range(D) for i in range(widths[m])] + mask_ids
        length = cache.get_seq_length()
        sees = torch.cat([reads_prefix[:, None].expand(-1, P), new_sees.new_ones(len(tokens), length), new_sees], 1)
        hidden = bita.hidden(model, torch.tensor(tokens, device=device)[None], (offsets + t)[None], sees[None],
                             cache)[0]
        out.forwards += 1
        # Small steps project every row at once: the output layer's weights are then read once per step.
        logits = head(hidden) if len(tokens) <= ONE_PROJECTION_ROWS else None
        verdict = (logits[:1 + layout.nodes] if logits is not None else head(hidden[:1 + layout.nodes]))
        verdict = verdict.argmax(dim=-1).tolist()
        # Walk the tree: accept the child equal to the base argmax at its parent, as long as one is.
        current, accepted = 0, []
        for rows in level_rows:
            if layout.parent[rows[0]] != current:
                break  # `current` is not the top-1 node: it has no children
            child = next((r for r in rows if tokens[r] == verdict[current]), None)
            if child is None:
                break
            accepted.append(child)
            current = child
            if tokens[child] in eos:
                break
        new = [tokens[r] for r in accepted]
        if not new or new[-1] not in eos:
            new.append(verdict[current])  # the bonus: the base model's next token after the accepted path
        room = max_new_tokens - len(emitted)
        emitted += new[:room]
        out.drafted += ([True] * len(accepted) + [False])[:min(room, len(new))]
        out.per_forward.append(min(room, len(new)))
        if len(emitted) >= max_new_tokens or emitted[-1] in eos:
            break
        _keep(cache, length, [0] + accepted)
        if inspect is not None:
            inspect(cache, prompt + emitted[:-1])
        t += len(accepted) + 1
        group = layout.group[current]
        group_logits = logits[group:group + D] if logits is not None else head(hidden[group:group + D])
        drafts = group_logits.topk(max(widths), dim=-1).indices.tolist()
    out.tokens = emitted
    out.seconds = time.perf_counter() - started
    bita.train(was_training)
    return out
