"""Adapters that evaluate torchdistill's loss modules on numpy inputs, for parity tests.

Inputs follow kd_jax's conventions (NHWC feature maps, [B, K] logits, [B, D]
embeddings); each adapter transposes to PyTorch's NCHW where needed, builds the
pip-installed torchdistill module with the io-dict wiring it expects, and
returns the loss as a float (torchdistill's own reduction). Nothing here copies
torchdistill's code: it is called.
"""
from __future__ import annotations

import numpy as np
import torch
from torchdistill.losses import mid_level


def _t(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x, np.float32))  # a writable copy


def _nchw(x) -> torch.Tensor:
  return _t(np.transpose(np.asarray(x), (0, 3, 1, 2)))


def _io(tensor, io="output", path="m"):
  return {path: {io: tensor}}


def _pairs(**extra):
  return {"pair1": {"student": {"io": "output", "path": "m"}, "teacher": {"io": "output", "path": "m"},
                    "weight": 1, **extra}}


def kd(student_logits, teacher_logits, temperature):
  """torchdistill KDLoss without the hard-label part: batch-mean KL at T (no T² factor)."""
  loss = mid_level.KDLoss("m", "output", "m", "output", temperature=temperature, alpha=0.0, beta=1.0)
  return float(loss(_io(_t(student_logits)), _io(_t(teacher_logits))))


def attention_transfer(student_map, teacher_map):
  loss = mid_level.ATLoss(_pairs(), mode="code")
  return float(loss(_io(_nchw(student_map)), _io(_nchw(teacher_map))))


def similarity_preserving(student, teacher):
  loss = mid_level.SPKDLoss("m", "m", reduction="batchmean")
  as_torch = lambda x: _nchw(x) if np.ndim(x) == 4 else _t(x)
  return float(loss(_io(as_torch(student)), _io(as_torch(teacher))))


def rkd(student, teacher, distance_weight, angle_weight):
  loss = mid_level.RKDLoss("m", "m", dist_factor=distance_weight, angle_factor=angle_weight, reduction="mean")
  return float(loss(_io(_t(student)), _io(_t(teacher))))


def pkt(student, teacher):
  loss = mid_level.PKTLoss("m", "output", "m", "output")
  return float(loss(_io(_t(student)), _io(_t(teacher))))


def dist(student_logits, teacher_logits, beta, gamma, temperature):
  loss = mid_level.DISTLoss("m", "output", "m", "output", beta=beta, gamma=gamma, tau=temperature)
  return float(loss(_io(_t(student_logits)), _io(_t(teacher_logits))))


def fitnet(student_map, teacher_map):
  """FitNets' hint as torchdistill trains it (MSE over all elements)."""
  return float(torch.nn.functional.mse_loss(_nchw(student_map), _nchw(teacher_map)))


def correlation_congruence(student, teacher, gamma, order):
  loss = mid_level.CCKDLoss("m", "m", kernel_config={"type": "gaussian", "gamma": gamma, "max_p": order},
                            reduction="batchmean")
  return float(loss(_io(_t(student)), _io(_t(teacher))))


def vid(predicted_mean, teacher_map, variance):
  loss = mid_level.VIDLoss(_pairs())
  student = {"m": {"output": (_nchw(predicted_mean), _t(np.asarray(variance))[None, :, None, None])}}
  return float(loss(student, _io(_nchw(teacher_map))))


def factor_transfer(student_factor, teacher_factor, p):
  loss = mid_level.FTLoss(p=p, reduction="mean", paraphraser_path="m", translator_path="m")
  return float(loss(_io(_nchw(student_factor)), _io(_nchw(teacher_factor))))


def activation_boundary(student_preact, teacher_preact, margin):
  loss = mid_level.AltActTransferLoss(_pairs(), margin=margin, reduction="mean")
  return float(loss(_io(_nchw(student_preact)), _io(_nchw(teacher_preact))))


def crd(student_embed, teacher_embed, indices, contrast_indices, student_memory, teacher_memory,
        temperature, momentum):
  """CRDLoss with its memory set to the given banks; returns (loss, new student memory, new teacher memory)."""
  num_data, dim = np.shape(student_memory)
  k = np.shape(contrast_indices)[1]
  loss = mid_level.CRDLoss("s", "empty", "t", input_size=dim, output_size=num_data, num_negative_samples=k,
                           num_samples=num_data, temperature=temperature, momentum=momentum, eps=1e-7)
  loss.memory_v1.copy_(_t(student_memory))
  loss.memory_v2.copy_(_t(teacher_memory))
  indices = torch.from_numpy(np.asarray(indices, np.int64))
  contrast = torch.from_numpy(np.concatenate([np.asarray(indices)[:, None], contrast_indices], 1).astype(np.int64))
  student = {"s": {"output": _t(student_embed)}, "empty": {"input": {"pos_idx": indices, "contrast_idx": contrast}}}
  value = float(loss(student, {"t": {"output": _t(teacher_embed)}}))
  return value, loss.memory_v1.numpy().copy(), loss.memory_v2.numpy().copy()


def fsp(student_first, student_second, teacher_first, teacher_second):
  """FSPLoss on one pair of stages (torchdistill's own reduction: Σ over the batch / B)."""
  config = {"pair1": {name: {"io": "output", "path": name} for name in
                      ("student_first", "student_second", "teacher_first", "teacher_second")}}
  config["pair1"]["weight"] = 1
  loss = mid_level.FSPLoss(config)
  student = {"student_first": {"output": _nchw(student_first)}, "student_second": {"output": _nchw(student_second)}}
  teacher = {"teacher_first": {"output": _nchw(teacher_first)}, "teacher_second": {"output": _nchw(teacher_second)}}
  return float(loss(student, teacher))


def hierarchical_context(student_map, teacher_map, output_sizes=(4, 2, 1)):
  """HierarchicalContextLoss on one stage (its student input is a (features, residual) pair)."""
  loss = mid_level.HierarchicalContextLoss("s", "output", "t", "output", reduction="mean",
                                           output_sizes=list(output_sizes))
  return float(loss({"s": {"output": (_nchw(student_map), None)}}, _io(_nchw(teacher_map), path="t")))
