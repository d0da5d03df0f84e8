r"""Converts a PyTorch checkpoint into a kd_jax teacher directory (model.json + variables), in one command.

  python -m third_party.convert_teacher resnet32x4_vanilla/ckpt_epoch_240.pth --model=resnet32x4 \
      --num_classes=100 --dataset=cifar100 --out=/tmp/teachers/resnet32x4
  python -m third_party.convert_teacher resnet18-f37072fd.pth --model=resnet18 --num_classes=1000 \
      --dataset=imagenet2012 --out=gs://my-bucket/teachers/resnet18

A table row then uses it instead of training its teacher: `--config.rows.teacher.checkpoint=<out>` (or
`rows.<row>.teacher=<out>`). The weights go through `third_party.torch_models.convert_state_dict` (every
array checked against the zoo model's shapes); needs torch (the `compare` extra).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def convert(checkpoint: str, *, model: str, num_classes: int, dataset: str, out: str,
            input_shape: tuple[int, ...] | None = None, model_kwargs: dict | None = None) -> dict:
  """Writes `out`/model.json and `out`/variables from the PyTorch `checkpoint`; returns the description."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from kd_jax import models
  from kd_jax.train import checkpoint as checkpoint_lib
  from third_party import torch_models

  model_kwargs = dict(model_kwargs or {})
  shape = tuple(input_shape) if input_shape else models.input_shape(model)
  if shape is None:
    raise ValueError(f"model {model!r} takes inputs of any shape: pass --input_shape (e.g. 32,32,3)")
  module = models.create(model, num_classes=num_classes, **model_kwargs)
  template = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *shape), jnp.float32), train=False))
  state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
  variables = jax.tree.map(np.asarray, torch_models.convert_state_dict(state_dict, template))
  description = {"model": model, "model_kwargs": model_kwargs, "num_classes": num_classes,
                 "input_shape": list(shape), "dataset": dataset}
  checkpoint_lib.save_model(out, variables, description)
  return description


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m third_party.convert_teacher", description=__doc__.split("\n")[0])
  parser.add_argument("checkpoint", help="a PyTorch .pth file: a state dict, or {'model'|'state_dict': ...}")
  parser.add_argument("--model", required=True, help="the kd_jax zoo name (e.g. resnet32x4, resnet18)")
  parser.add_argument("--num_classes", required=True, type=int)
  parser.add_argument("--dataset", required=True, help="the kd_jax dataset name the teacher was trained on")
  parser.add_argument("--out", required=True, help="the teacher directory to write (local or gs://)")
  parser.add_argument("--input_shape", default="", help="H,W,C for models without a fixed input shape")
  parser.add_argument("--model_kwargs", default="{}", help="the zoo model's options, as JSON")
  args = parser.parse_args(argv)
  try:
    shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
  except ValueError:
    parser.error(f"--input_shape must be H,W,C integers, got {args.input_shape!r}")
  try:
    kwargs = json.loads(args.model_kwargs)
  except json.JSONDecodeError as e:
    parser.error(f"--model_kwargs must be a JSON object, got {args.model_kwargs!r} ({e})")
  description = convert(args.checkpoint, model=args.model, num_classes=args.num_classes, dataset=args.dataset,
                        out=args.out, input_shape=shape, model_kwargs=kwargs)
  print(f"wrote {args.out}: {json.dumps(description)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
