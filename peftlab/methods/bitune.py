"""Bitune: bidirectional instruction tuning (Kopiczko, Blankevoort & Asano, 2024, arXiv:2405.14862).

The prompt is read twice. For a sequence x_0 … x_{T−1} whose first P tokens are the prompt:

    K_b, V_b = f(x_0 … x_{P−2}; θ_b, every prompt token sees every other)    adapter "prefill"
    K_c, V_c = f(x_0 … x_{P−2}; θ_c, causal)                                   adapter "default"
    α^ℓ = |w^ℓ| / (|w^ℓ| + t)                       per layer ℓ, one w for keys and one for values
    K^ℓ = (1 − α_k^ℓ)·K_c^ℓ + α_k^ℓ·K_b^ℓ,     V^ℓ = (1 − α_v^ℓ)·V_c^ℓ + α_v^ℓ·V_b^ℓ
    logits_{P−1 … T−1} = f(x_{P−1} … x_{T−1}; θ_c, past = (K, V), causal)

``mixing="relu"`` puts relu(w) in place of |w| (the paper's simplified variant; a negative w then
stays stuck at α = 0). Both w start at t = 0.01, so α = ½: the prompt's keys and values start as the
average of the two passes. The last prompt token is read by the final pass, which therefore emits
the logits of the first answer token. Training is cross-entropy on the answer tokens; gradients
flow through the mixed cache into both adapters and into w. Generation runs the two prompt passes
once, mixes, and then decodes with an ordinary cache and adapter "default".

How it plugs into transformers: ``add_bitune`` replaces, on this model instance only, the forward of
its decoder (the module that returns hidden states and fills the KV cache). A call that starts a
sequence (no cache or an empty one) runs the three passes above; a call that continues a cache is
the plain forward. So ``model(...)``, ``model.generate``, the training loop and every evaluation use
a Bitune model as they use any other. The prompt is the whole input unless the caller passes
``prompt_length=P``; the returned hidden states cover every position, the first P−1 from the causal
pass (what plain LoRA computes there) and the rest from the final pass. All rows of a batch end
their prompt at column P−1 (left-pad the prompts: ``align_prompts`` does it for training batches),
and padding is whatever the attention mask (2-D, or an already built 4-D one) hides.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.adapters import AdapterConfig, AdapterConfigError
from peftlab.inject import add_adapter, adapter_layers, set_active
from peftlab.models import output_cache, with_cache
from peftlab.train import Objective, causal_lm_loss

CAUSAL, BIDIRECTIONAL = "default", "prefill"  # the adapters' names, as in the original code
MIXINGS = ("abs", "relu")


class BituneError(AdapterConfigError):
    """A model or a setting Bitune cannot work with; the message names the fix."""


@dataclass(frozen=True)
class BituneConfig:
    mixing: str = "abs"           # "abs": α = |w|/(|w|+t) (the paper's variant 607), "relu": relu(w)/(relu(w)+t) (801)
    init: float = 0.01            # s_init: the start value of every w and the constant t
    bidirectional: bool = True    # False: both prompt passes causal (the "only causal" ablation)
    shared_adapter: bool = False  # True: both prompt passes use adapter "default" (the "shared weights" ablation)

    def __post_init__(self):
        if self.mixing not in MIXINGS:
            raise BituneError(f"Bitune mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if isinstance(self.init, bool) or not isinstance(self.init, (int, float)) or not self.init > 0:
            raise BituneError(f"Bitune init (t) must be a positive number such as 0.01, got {self.init!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Bitune(nn.Module):
    """The mixing coefficients w_k, w_v ∈ ℝ^L (float32) and the three-pass prefill."""
    name = "bitune"

    def __init__(self, config: BituneConfig, num_layers: int):
        super().__init__()
        self.config = config
        self.w_k = nn.Parameter(torch.full((num_layers,), float(config.init)))
        self.w_v = nn.Parameter(torch.full((num_layers,), float(config.init)))
        self.layers: list = []  # the decoder's AdapterLayers, to switch the active adapter cheaply

    def describe(self) -> dict:
        return {"name": self.name, **self.config.to_dict()}

    def alpha(self, w: torch.Tensor) -> torch.Tensor:
        s = w.abs() if self.config.mixing == "abs" else w.relu()
        return s / (s + self.config.init)

    def mix(self, causal, bidirectional, into):
        """K = (1 − α_k)·K_c + α_k·K_b per layer (V likewise), computed in float32, written into ``into``."""
        alpha_k, alpha_v = self.alpha(self.w_k.float()), self.alpha(self.w_v.float())
        for layer, (c, b) in enumerate(zip(causal.layers, bidirectional.layers)):
            keys = torch.lerp(c.keys.float(), b.keys.float(), alpha_k[layer]).to(c.keys.dtype)
            values = torch.lerp(c.values.float(), b.values.float(), alpha_v[layer]).to(c.values.dtype)
            into.update(keys, values, layer)
        return into

    def use(self, adapter: str) -> None:
        """Make ``adapter`` the only active adapter of the decoder (no change to requires_grad, so the
        inactive adapter still gets its gradient: the pitfall of PEFT's set_adapter)."""
        for layer in self.layers:
            layer.active = (adapter,) if adapter in layer.adapters else ()

    def prefill(self, plain, tokens: dict, attention_mask, position_ids, cache, prompt_length: int, kwargs):
        """The three passes over a whole sequence; returns the decoder's output for every position."""
        from transformers import DynamicCache
        from transformers.modeling_outputs import BaseModelOutputWithPast

        decoder = plain.__self__
        batch, length = next(iter(tokens.values())).shape[:2]
        device = next(iter(tokens.values())).device
        dtype = decoder.get_input_embeddings().weight.dtype
        p = prompt_length - 1  # the prompt passes read tokens 0 … P−2
        sees = visibility(attention_mask, batch, length, device)
        if position_ids is None:
            position_ids = positions(attention_mask, batch, length, device)
        head = {k: v[:, :p] for k, v in tokens.items()}
        tail = {k: v[:, p:] for k, v in tokens.items()}
        causal_mask = sees[:, :, :p, :p]
        # Every prompt token sees every real prompt token: exactly the keys the last prompt token may see.
        bidirectional_mask = sees[:, :, p:p + 1, :p].expand(-1, -1, p, -1) | torch.eye(p, dtype=torch.bool,
                                                                                       device=device)
        if not self.config.bidirectional:
            bidirectional_mask = causal_mask

        def prompt_pass(adapter, mask):
            self.use(adapter)
            return plain(**head, attention_mask=additive(mask, dtype), position_ids=position_ids[:, :p],
                         **with_cache(decoder, DynamicCache(config=decoder.config)), use_cache=True, **kwargs)

        causal = prompt_pass(CAUSAL, causal_mask)
        bidirectional = prompt_pass(CAUSAL if self.config.shared_adapter else BIDIRECTIONAL, bidirectional_mask)
        cache = self.mix(output_cache(causal), output_cache(bidirectional),
                         into=cache if cache is not None else DynamicCache(config=decoder.config))
        self.use(CAUSAL)
        final = plain(**tail, attention_mask=additive(sees[:, :, p:, :], dtype), position_ids=position_ids[:, p:],
                      **with_cache(decoder, cache), use_cache=True, **kwargs)
        hidden = torch.cat([causal.last_hidden_state, final.last_hidden_state], dim=1)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **with_cache(decoder, output_cache(final)),
                                       hidden_states=final.hidden_states, attentions=final.attentions)


# -- masks and positions (shared by the three passes) ---------------------------------------------

def visibility(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    """Which key each query may see, (B, 1, T, T) bool: causal and not padding, or the caller's own 4-D mask
    (bool, or additive with 0 for visible). Padding queries see themselves, so no row is empty."""
    if attention_mask is not None and attention_mask.dim() == 4:
        sees = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return sees.expand(batch, 1, length, length)
    real = torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None \
        else attention_mask.bool()
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=device)
    return (causal & real[:, None, None, :]) | eye


def positions(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    """0, 1, … counted over real tokens (left padding does not shift a sequence's positions)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.arange(length, device=device).expand(batch, -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def additive(sees: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool visibility mask as the additive float mask attention adds to its scores."""
    return torch.zeros(sees.shape, dtype=dtype, device=sees.device).masked_fill(~sees, torch.finfo(dtype).min)


def _decoder_forward(decoder, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                     inputs_embeds=None, use_cache=None, prompt_length: int | None = None, **kwargs):
    """The decoder's forward on a Bitune model (bound to the decoder instance by ``attach``)."""
    past_key_values = kwargs.pop("cache", past_key_values)  # the name transformers ≥ 5.24 passes it under
    bitune: Bitune = decoder.__dict__["peftlab_bitune"]
    plain = type(decoder).forward.__get__(decoder)
    tokens = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
    length = next(iter(tokens.values())).shape[1]
    continues = past_key_values is not None and past_key_values.get_seq_length() > 0
    if continues and prompt_length is not None:
        raise BituneError("prompt_length was given with a non-empty cache: pass it only when a sequence starts")
    prompt_length = length if prompt_length is None else int(prompt_length)
    if not 1 <= prompt_length <= length:
        raise BituneError(f"prompt_length {prompt_length} is outside the sequence of {length} tokens")
    if continues or prompt_length < 2:  # cached decoding, or a prompt of one token: the plain causal forward
        bitune.use(CAUSAL)
        return plain(**tokens, attention_mask=attention_mask, position_ids=position_ids,
                     **with_cache(decoder, past_key_values), use_cache=use_cache, **kwargs)
    return bitune.prefill(plain, tokens, attention_mask, position_ids, past_key_values, prompt_length, kwargs)


# -- attaching ------------------------------------------------------------------------------------

def add_bitune(model: nn.Module, adapter_config: AdapterConfig, config: BituneConfig = BituneConfig(),
               seed: int | None = None) -> Bitune:
    """Add the two adapters (``default`` for the causal pass and the answer, ``prefill`` for the
    bidirectional pass, both with ``adapter_config``) and the mixing coefficients to ``model``."""
    _refuse_second_method(model)
    check_supported(model)
    add_adapter(model, adapter_config, name=CAUSAL, seed=seed)
    add_adapter(model, adapter_config, name=BIDIRECTIONAL, seed=None if seed is None else seed + 1, activate=False)
    return attach(model, config)


def attach(model: nn.Module, config: BituneConfig) -> Bitune:
    """Put the Bitune forward on a model that already has adapters ``default`` and ``prefill``."""
    _refuse_second_method(model)
    decoder = model.get_decoder()
    layers = [layer for _, layer in adapter_layers(decoder)]
    missing = [n for n in (CAUSAL, BIDIRECTIONAL) if not any(n in layer.adapters for layer in layers)]
    if missing:
        raise BituneError(f"Bitune needs adapters {CAUSAL!r} and {BIDIRECTIONAL!r} in the decoder; missing {missing}: "
                          "use add_bitune()")
    parameter = next(model.parameters())
    bitune = Bitune(config, model.config.num_hidden_layers).to(parameter.device)
    bitune.layers = layers
    model.peftlab_method = bitune  # registered on the model: trained, checkpointed and saved with the adapters
    decoder.__dict__["peftlab_bitune"] = bitune  # a plain reference, so the parameters are not listed twice
    decoder.forward = types.MethodType(_decoder_forward, decoder)
    set_active(model, [CAUSAL])
    return bitune


def _refuse_second_method(model: nn.Module) -> None:
    from peftlab.methods import attached

    if attached(model) is not None:
        raise BituneError(f"the model already has the model-level method {attached(model).name!r}: load a fresh model")


def restore(model: nn.Module, described: dict, tensors: dict) -> None:
    """Re-attach Bitune from an adapter file (``peftlab.methods.restore``)."""
    from peftlab.methods import rebuild

    rebuild(model, described, tensors, BituneConfig, attach, detach, BituneError, "Bitune coefficients")


def detach(model: nn.Module) -> None:
    """Remove the Bitune forward and coefficients (the adapters stay)."""
    decoder = model.get_decoder()
    decoder.__dict__.pop("forward", None)
    decoder.__dict__.pop("peftlab_bitune", None)
    if hasattr(model, "peftlab_method"):
        del model.peftlab_method


def is_bitune(model: nn.Module) -> bool:
    from peftlab.methods import attached

    return isinstance(attached(model), Bitune)


def check_supported(model: nn.Module) -> None:
    """Refuse models Bitune cannot run on, before anything changes: no separate decoder, sliding-window
    layers (the bidirectional pass over a window is undefined), an attention implementation that
    ignores custom 4-D masks, or a decoder without a KV cache."""
    from transformers import DynamicCache

    name = type(model).__name__
    if not hasattr(model, "get_decoder") or model.get_decoder() is model:
        raise BituneError(f"{name} has no separate decoder module: Bitune needs a decoder-only transformers "
                          "model such as Llama, Qwen2, Gemma or Phi")
    config = model.config
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()) or \
            (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)):
        raise BituneError(f"{name} uses sliding-window attention, under which the bidirectional prompt pass is "
                          "undefined: use a full-attention model (or disable the sliding window in its config)")
    decoder = model.get_decoder()
    implementation = getattr(config, "_attn_implementation", None)
    probe = torch.arange(3, device=next(model.parameters()).device)[None] % config.vocab_size
    dtype = decoder.get_input_embeddings().weight.dtype
    everything = torch.ones(1, 1, 3, 3, dtype=torch.bool, device=probe.device)
    try:
        with torch.no_grad():
            seen = [decoder(input_ids=probe, attention_mask=additive(mask, dtype), use_cache=True,
                            **with_cache(decoder, DynamicCache(config=config)))
                    for mask in (everything, everything.tril())]
        layers = len(output_cache(seen[0]).layers)
    except Exception as err:  # noqa: BLE001 — any failure here means the model lacks what Bitune needs
        raise BituneError(f"{name} does not run with a 4-D attention mask and a DynamicCache "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:160]}): Bitune needs both") from None
    if layers != config.num_hidden_layers:
        raise BituneError(f"{name} caches {layers} layers for {config.num_hidden_layers} hidden layers: "
                          "Bitune mixes one cache entry per layer")
    if torch.equal(seen[0].last_hidden_state[:, 0], seen[1].last_hidden_state[:, 0]):
        raise BituneError(f"{name} ignores custom 4-D attention masks with attn_implementation={implementation!r}: "
                          "load it with attn_implementation='sdpa' or 'eager'")


# -- training -------------------------------------------------------------------------------------

def align_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """Re-pad a batch so that every prompt ends at the same column. The prompt of a row is its tokens
    before the first label (training data masks the prompt out of the labels). Returns
    (input_ids, attention_mask, labels, prompt_length) with pads on the left of short prompts and on
    the right of short answers."""
    rows, prompt_lengths = [], []
    for ids, mask, target in zip(input_ids, attention_mask, labels):
        keep = mask.bool()
        ids, target = ids[keep], target[keep]
        answer = (target != -100).nonzero()
        prompt = int(answer[0]) if len(answer) else len(ids)
        if prompt == 0:
            raise BituneError("a training example has no prompt tokens (every token is a label): Bitune needs the "
                              "prompt masked out of the loss; train without --train-on-prompt")
        rows.append((ids, target))
        prompt_lengths.append(prompt)
    longest = max(prompt_lengths)
    width = max(longest - p + len(ids) for p, (ids, _) in zip(prompt_lengths, rows))
    out_ids = input_ids.new_zeros(len(rows), width)
    out_mask = attention_mask.new_zeros(len(rows), width)
    out_labels = labels.new_full((len(rows), width), -100)
    for row, (p, (ids, target)) in enumerate(zip(prompt_lengths, rows)):
        start = longest - p
        out_ids[row, start:start + len(ids)] = ids
        out_mask[row, start:start + len(ids)] = 1
        out_labels[row, start:start + len(ids)] = target
    return out_ids, out_mask, out_labels, longest


class BituneObjective(Objective):
    """The training loop's objective: the causal LM loss on batches whose prompts end at one column,
    with that prompt length passed to the model."""

    def loss(self, model, batch):
        ids, mask, labels, prompt_length = align_prompts(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return causal_lm_loss(model, ids, mask, labels, prompt_length=prompt_length)
