"""A pre-LN Transformer encoder-decoder (Vaswani et al. 2017; pre-LN as in Xiong et al. 2020).

The model of weight distillation's seed (Transformer MT), sized for synthetic
sequence-to-sequence tasks (kd_jax.data.sequences). Inputs are int32 token ids
[B, 2, T]: row 0 the source, row 1 the decoder input (teacher forcing); the
logits are per position, [B, T, vocab]. Tokens are embedded (times √width) with
sinusoidal positions; each encoder layer is x + SelfAttn(LN(x)), x + FFN(LN(x));
each decoder layer adds causal self-attention and cross-attention to the
encoder's output; final LayerNorms, then a linear head.

Parameters are named per layer `encoder/layers_<i>/...` and
`decoder/layers_<i>/...` (attention: `self_attention`, `cross_attention` with
query/key/value kernels [D, H, D/H] and out kernel [H, D/H, D]; FFN: `mlp/dense1`,
`mlp/dense2`), so weight distillation (kd_jax.distill.weight_distillation)
groups the instances of each class across layers.

Features: `encoder` (the encoder's output, [B, T, D]) and `pre_logits` (the
decoder's final normalised states, [B, T, D]); per layer i the attention
probabilities [B, H, Tq, Tk] `encoder_attention_<i>`, `decoder_self_attention_<i>`
(causal), `decoder_cross_attention_<i>` and the values [B, H, Tk, D/H]
`encoder_values_<i>`, `decoder_self_values_<i>`, `decoder_cross_values_<i>`;
`decoder_self_attention_mask` [B, 1, T, T] (1 where a query may attend: the
causal mask; the other attentions see every position). Attention distillation
(MiniLM, TinyBERT) reads them: kd_jax/distill/attention.py.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models import register


def sinusoidal_positions(length: int, width: int) -> np.ndarray:
  """[length, width]: sin on even, cos on odd channels, wavelengths from 2π to 10000·2π."""
  position = np.arange(length)[:, None]
  rate = np.exp(-np.log(10000.0) * (np.arange(0, width, 2) / width))[None, :]
  table = np.zeros((length, width), np.float32)
  table[:, 0::2] = np.sin(position * rate)
  table[:, 1::2] = np.cos(position * rate)[:, : width // 2]
  return table


class FeedForward(nn.Module):
  hidden: int
  dropout: float

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.relu(nn.Dense(self.hidden, name="dense1")(x))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(x.shape[-1], name="dense2")(h)


class Attention(nn.Module):
  """Multi-head dot-product attention that also returns its probabilities and values.

  The computation and the params (`query`, `key`, `value` kernels [D, H, D/H],
  `out` kernel [H, D/H, D], with biases) are those of flax's
  `nn.MultiHeadDotProductAttention` (tests/test_attention_distill.py checks the
  parity); returns (output [B, Tq, D], probabilities [B, H, Tq, Tk], values
  [B, H, Tk, D/H]), the probabilities before dropout.
  """

  heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, *, mask=None, train: bool = False):
    width = inputs_q.shape[-1]
    head_dim = width // self.heads
    dense = lambda name: nn.DenseGeneral((self.heads, head_dim), axis=-1, name=name)
    query, key, value = dense("query")(inputs_q), dense("key")(inputs_kv), dense("value")(inputs_kv)
    logits = jnp.einsum("...qhd,...khd->...hqk", query / jnp.sqrt(head_dim).astype(query.dtype), key)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probabilities = jax.nn.softmax(logits, axis=-1)
    weights = nn.Dropout(self.dropout, broadcast_dims=(0, 1), deterministic=not train)(probabilities)
    out = nn.DenseGeneral(width, axis=(-2, -1), name="out")(jnp.einsum("...hqk,...khd->...qhd", weights, value))
    return out, probabilities, jnp.swapaxes(value, -3, -2)


class EncoderLayer(nn.Module):
  heads: int
  ffn: int
  dropout: float

  @nn.compact
  def __call__(self, x, train: bool):
    drop = nn.Dropout(self.dropout, deterministic=not train)
    h = nn.LayerNorm(name="self_attention_norm")(x)
    attended, probabilities, values = Attention(self.heads, self.dropout, name="self_attention")(h, h, train=train)
    x = x + drop(attended)
    h = nn.LayerNorm(name="mlp_norm")(x)
    return x + drop(FeedForward(self.ffn, self.dropout, name="mlp")(h, train)), {
        "attention": probabilities, "values": values}


class DecoderLayer(nn.Module):
  heads: int
  ffn: int
  dropout: float

  @nn.compact
  def __call__(self, x, encoded, train: bool):
    drop = nn.Dropout(self.dropout, deterministic=not train)
    causal = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    h = nn.LayerNorm(name="self_attention_norm")(x)
    attended, self_probabilities, self_values = Attention(self.heads, self.dropout, name="self_attention")(
        h, h, mask=causal, train=train)
    x = x + drop(attended)
    h = nn.LayerNorm(name="cross_attention_norm")(x)
    attended, cross_probabilities, cross_values = Attention(self.heads, self.dropout, name="cross_attention")(
        h, encoded, train=train)
    x = x + drop(attended)
    h = nn.LayerNorm(name="mlp_norm")(x)
    return x + drop(FeedForward(self.ffn, self.dropout, name="mlp")(h, train)), {
        "self_attention": self_probabilities, "self_values": self_values,
        "cross_attention": cross_probabilities, "cross_values": cross_values}


class Stack(nn.Module):
  """`layers` encoder or decoder layers (`layers_<i>`) and a final LayerNorm (`norm`); returns the
  output and each layer's attention features, named `<kind>_<i>`."""

  layers: int
  heads: int
  ffn: int
  dropout: float
  decoder: bool

  @nn.compact
  def __call__(self, x, encoded, train: bool):
    features = {}
    for i in range(self.layers):
      if self.decoder:
        x, layer = DecoderLayer(self.heads, self.ffn, self.dropout, name=f"layers_{i}")(x, encoded, train)
      else:
        x, layer = EncoderLayer(self.heads, self.ffn, self.dropout, name=f"layers_{i}")(x, train)
      features.update({f"{kind}_{i}": value for kind, value in layer.items()})
    return nn.LayerNorm(name="norm")(x), features


class Transformer(nn.Module):
  """Encoder-decoder over token ids [B, 2, T] -> per-position logits [B, T, num_classes]."""

  num_classes: int  # the vocabulary
  layers: int = 6
  decoder_layers: int | None = None  # default: as many as the encoder
  width: int = 64
  heads: int = 4
  ffn: int = 256
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    if x.ndim != 3 or x.shape[1] != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"transformer: inputs must be integer token ids [B, 2, T] (source, decoder input), got "
                       f"{x.dtype} {x.shape}")
    positions = jnp.asarray(sinusoidal_positions(x.shape[2], self.width))
    drop = nn.Dropout(self.dropout, deterministic=not train)

    def embed(tokens, name):
      embedded = nn.Embed(self.num_classes, self.width, name=name)(tokens)
      return drop(embedded * np.sqrt(self.width) + positions[None].astype(embedded.dtype))

    stack = lambda n, decoder, name: Stack(n, self.heads, self.ffn, self.dropout, decoder, name=name)
    encoded, encoder_features = stack(self.layers, False, "encoder")(embed(x[:, 0], "source_embed"), None, train)
    decoded, decoder_features = stack(self.decoder_layers or self.layers, True, "decoder")(
        embed(x[:, 1], "target_embed"), encoded, train)
    logits = nn.Dense(self.num_classes, name="head")(decoded)
    if not return_features:
      return logits
    causal = nn.make_causal_mask(jnp.ones(x.shape[:1] + x.shape[2:], jnp.int32))  # [B, 1, T, T]
    features = {"encoder": encoded, "pre_logits": decoded, "decoder_self_attention_mask": causal.astype(jnp.float32),
                **{f"encoder_{k}": v for k, v in encoder_features.items()},
                **{f"decoder_{k}": v for k, v in decoder_features.items()}}
    return logits, features


@register("transformer", input_shape=None)
def transformer(*, num_classes: int, layers: int = 6, decoder_layers: int | None = None, width: int = 64,
                heads: int = 4, ffn: int = 256, dropout: float = 0.0) -> Transformer:
  """A pre-LN encoder-decoder; `num_classes` is the vocabulary size."""
  for name, value in (("layers", layers), ("width", width), ("heads", heads), ("ffn", ffn)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"transformer: {name} must be a positive int, got {value!r}")
  if width % heads or width % 2:
    raise ValueError(f"transformer: width {width} must be even and divisible by heads={heads}")
  return Transformer(num_classes=num_classes, layers=layers, decoder_layers=decoder_layers, width=width,
                     heads=heads, ffn=ffn, dropout=dropout)
