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
decoder's final normalised states, [B, T, D]).
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


def _attention(heads: int, width: int, dropout: float, train: bool, name: str):
  return nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=width, out_features=width,
                                         dropout_rate=dropout, deterministic=not train, name=name)


class EncoderLayer(nn.Module):
  heads: int
  ffn: int
  dropout: float

  @nn.compact
  def __call__(self, x, train: bool):
    drop = nn.Dropout(self.dropout, deterministic=not train)
    h = nn.LayerNorm(name="self_attention_norm")(x)
    x = x + drop(_attention(self.heads, x.shape[-1], self.dropout, train, "self_attention")(h, h))
    h = nn.LayerNorm(name="mlp_norm")(x)
    return x + drop(FeedForward(self.ffn, self.dropout, name="mlp")(h, train))


class DecoderLayer(nn.Module):
  heads: int
  ffn: int
  dropout: float

  @nn.compact
  def __call__(self, x, encoded, train: bool):
    drop = nn.Dropout(self.dropout, deterministic=not train)
    causal = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    h = nn.LayerNorm(name="self_attention_norm")(x)
    x = x + drop(_attention(self.heads, x.shape[-1], self.dropout, train, "self_attention")(h, h, mask=causal))
    h = nn.LayerNorm(name="cross_attention_norm")(x)
    x = x + drop(_attention(self.heads, x.shape[-1], self.dropout, train, "cross_attention")(h, encoded))
    h = nn.LayerNorm(name="mlp_norm")(x)
    return x + drop(FeedForward(self.ffn, self.dropout, name="mlp")(h, train))


class Stack(nn.Module):
  """`layers` encoder or decoder layers (`layers_<i>`) and a final LayerNorm (`norm`)."""

  layers: int
  heads: int
  ffn: int
  dropout: float
  decoder: bool

  @nn.compact
  def __call__(self, x, encoded, train: bool):
    for i in range(self.layers):
      if self.decoder:
        x = DecoderLayer(self.heads, self.ffn, self.dropout, name=f"layers_{i}")(x, encoded, train)
      else:
        x = EncoderLayer(self.heads, self.ffn, self.dropout, name=f"layers_{i}")(x, train)
    return nn.LayerNorm(name="norm")(x)


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
    encoded = stack(self.layers, False, "encoder")(embed(x[:, 0], "source_embed"), None, train)
    decoded = stack(self.decoder_layers or self.layers, True, "decoder")(
        embed(x[:, 1], "target_embed"), encoded, train)
    logits = nn.Dense(self.num_classes, name="head")(decoded)
    return (logits, {"encoder": encoded, "pre_logits": decoded}) if return_features else logits


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
