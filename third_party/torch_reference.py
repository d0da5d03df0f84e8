"""PyTorch reference train steps for `experiments/benchmark.py`.

Each builder returns a `TorchStep`: one optimisation step of the same method as
the kd_jax engine step it is compared with (same architectures, batch,
optimizer and loss), written the way a PyTorch user would write it: eager
mode, `model.train()` for what is trained and `model.eval()` + `no_grad` for a
frozen teacher, one `torch.optim.SGD` over everything trained, the uint8 batch
normalised inside the step (the kd_jax step does the same on device).

Architectures follow RepDistiller (github.com/HobbitLong/RepDistiller
`models/resnet.py`, `models/wrn.py`), whose layout and initialisation the
kd_jax zoo reproduces: CIFAR ResNets (3x3 stem, three stages of BasicBlocks,
depth 6n+2, 1x1 conv + BN shortcut where the shape changes) and pre-activation
Wide ResNets (depth 6n+4, final BN-ReLU, 1x1 shortcut on the activated input),
plus Hinton et al.'s ReLU MLPs. Forward passes return (logits, features) with
the features RepDistiller's `is_feat=True` gives: [stem, stage1, stage2, stage3,
pre_logits] for the convnets.

Losses come from torchdistill where it has them (KDLoss, ATLoss, CRDLoss);
`loss_source()` says whether torchdistill was importable or the local copy of
the same formula was used.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:  # torchdistill is installed with --no-deps; its loss modules need only torch.
  from torchdistill.losses import mid_level as _td
except Exception:  # pragma: no cover - exercised only without torchdistill
  _td = None


def loss_source() -> str:
  return "torchdistill" if _td is not None else "local"


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
  """ReLU MLP on flattened inputs, dropout on the input and hidden units (Hinton et al. 2015)."""

  def __init__(self, in_features: int, widths: Sequence[int], num_classes: int, dropout: float = 0.0,
               input_dropout: float = 0.0):
    super().__init__()
    # Rate 0 is no module at all, as flax's Dropout(0) returns its input untouched.
    drop = lambda rate: nn.Dropout(rate) if rate else nn.Identity()
    self.input_dropout = drop(input_dropout)
    layers, width_in = [], in_features
    for width in widths:
      layers += [nn.Linear(width_in, width), nn.ReLU(inplace=True), drop(dropout)]
      width_in = width
    self.hidden = nn.Sequential(*layers)
    self.head = nn.Linear(width_in, num_classes)

  def forward(self, x: torch.Tensor):
    x = self.hidden(self.input_dropout(torch.flatten(x, 1)))
    return self.head(x), [x]


class BasicBlock(nn.Module):
  """RepDistiller's CIFAR BasicBlock: conv-BN-ReLU-conv-BN + shortcut, then ReLU."""

  def __init__(self, inplanes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
  """RepDistiller's `ResNet(depth, num_filters)` for 32x32 inputs (BasicBlocks, depth 6n+2)."""

  def __init__(self, depth: int, filters: Sequence[int], num_classes: int):
    super().__init__()
    if (depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, filters[0], 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(filters[0])
    stages, inplanes = [], filters[0]
    for s, planes in enumerate(filters[1:]):
      blocks = []
      for j in range(n):
        blocks.append(BasicBlock(inplanes, planes, stride=(1 if s == 0 else 2) if j == 0 else 1))
        inplanes = planes
      stages.append(nn.Sequential(*blocks))
    self.layer1, self.layer2, self.layer3 = stages
    self.fc = nn.Linear(inplanes, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def forward(self, x: torch.Tensor):
    f0 = F.relu(self.bn1(self.conv1(x)))
    f1 = self.layer1(f0)
    f2 = self.layer2(f1)
    f3 = self.layer3(f2)
    f4 = torch.flatten(F.adaptive_avg_pool2d(f3, 1), 1)
    return self.fc(f4), [f0, f1, f2, f3, f4]


class WideBlock(nn.Module):
  """RepDistiller's pre-activation WRN block: BN-ReLU-conv-BN-ReLU-conv + shortcut."""

  def __init__(self, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equal_in_out = in_planes == out_planes
    self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    act = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(act))))
    # Where the width changes the shortcut reads the activated input, as in the reference.
    return out + (x if self.equal_in_out else self.convShortcut(act))


class WideResNet(nn.Module):
  """RepDistiller's `WideResNet(depth, num_classes, widen_factor)` (depth 6n+4, no dropout)."""

  def __init__(self, depth: int, widen_factor: int, num_classes: int):
    super().__init__()
    if (depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    n, k = (depth - 4) // 6, widen_factor
    widths = (16, 16 * k, 32 * k, 64 * k)
    self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
    stages = []
    for s, stride in enumerate((1, 2, 2)):
      stages.append(nn.Sequential(*[WideBlock(widths[s] if i == 0 else widths[s + 1], widths[s + 1],
                                              stride if i == 0 else 1) for i in range(n)]))
    self.block1, self.block2, self.block3 = stages
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)

  def forward(self, x: torch.Tensor):
    f0 = self.conv1(x)
    f1 = self.block1(f0)
    f2 = self.block2(f1)
    f3 = self.block3(f2)
    f4 = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn1(f3)), 1), 1)
    return self.fc(f4), [f0, f1, f2, f3, f4]


_CIFAR_RESNETS = {f"resnet{d}": (d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)}
_CIFAR_RESNETS.update({"resnet8x4": (8, (32, 64, 128, 256)), "resnet32x4": (32, (32, 64, 128, 256))})
_WRNS = {f"wrn_{d}_{k}": (d, k) for d in (16, 40) for k in (1, 2)}


def create(name: str, *, num_classes: int, in_features: int = 784, **kwargs: Any) -> nn.Module:
  """The PyTorch twin of kd_jax zoo model `name` (the names of kd_jax.models)."""
  if name == "mlp":
    return MLP(in_features, kwargs.get("widths", (800, 800)), num_classes, kwargs.get("dropout", 0.0),
               kwargs.get("input_dropout", 0.0))
  if name == "mlp_1200":
    return MLP(in_features, (1200, 1200), num_classes, kwargs.get("dropout", 0.5), kwargs.get("input_dropout", 0.2))
  if name == "mlp_800":
    return MLP(in_features, (800, 800), num_classes, kwargs.get("dropout", 0.0), kwargs.get("input_dropout", 0.0))
  if name in _CIFAR_RESNETS:
    return CifarResNet(*_CIFAR_RESNETS[name], num_classes=num_classes)
  if name in _WRNS:
    return WideResNet(*_WRNS[name], num_classes=num_classes)
  if name in _IMAGENET_RESNETS:
    return ImageNetResNet(name, num_classes=num_classes)
  raise ValueError(f"no PyTorch reference for model {name!r}; known: mlp, mlp_1200, mlp_800, "
                   f"{', '.join(sorted(_CIFAR_RESNETS) + sorted(_WRNS) + list(_IMAGENET_RESNETS))}")


_IMAGENET_RESNETS = ("resnet18", "resnet34", "resnet50")  # kd_jax's zoo holds them in torchvision's layout


class ImageNetResNet(nn.Module):
  """torchvision's ImageNet ResNet of that name, returning (logits, [stem and stage outputs, pooled features])
  like the other twins here."""

  def __init__(self, name: str, *, num_classes: int):
    super().__init__()
    from third_party import torch_models
    self.net = getattr(torch_models.torchvision_models(), name)(num_classes=num_classes)

  def forward(self, x: torch.Tensor):
    n = self.net
    f0 = n.maxpool(n.relu(n.bn1(n.conv1(x))))
    f1 = n.layer1(f0)
    f2 = n.layer2(f1)
    f3 = n.layer3(f2)
    f4 = n.layer4(f3)
    pooled = torch.flatten(n.avgpool(f4), 1)
    return n.fc(pooled), [f0, f1, f2, f3, f4, pooled]


# ----------------------------------------------------------------------------- losses


def make_kd_loss(*, ce_weight: float, kd_weight: float, temperature: float):
  """`(student_logits, teacher_logits, labels) -> ce_weight · CE + kd_weight · T² · KL(p_t^T ‖ p_s^T)`,
  means over the batch (torchdistill's KDLoss with alpha = ce_weight, beta = kd_weight)."""
  if _td is not None:
    module = _td.KDLoss("s", "output", "t", "output", temperature=temperature, alpha=ce_weight, beta=kd_weight)

    def loss(student_logits, teacher_logits, labels):
      s, t = {"s": {"output": student_logits}}, {"t": {"output": teacher_logits}}
      if ce_weight:
        return module(s, t, labels)
      # With alpha = 0 torchdistill returns the bare KL (no T², no beta).
      return kd_weight * temperature ** 2 * module(s, t)

    return loss

  def loss(student_logits, teacher_logits, labels):
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
    return ce_weight * F.cross_entropy(student_logits, labels) + kd_weight * temperature ** 2 * soft

  return loss


def make_at_loss(pairs: int):
  """`(student_feats, teacher_feats) -> Σ AT loss` over `pairs` matched feature maps (Zagoruyko & Komodakis
  2017), RepDistiller's / torchdistill's 'code' form: mean squared difference of L2-normalised attention maps."""
  if _td is not None:
    config = {f"p{i}": {"student": {"path": f"s{i}", "io": "output"}, "teacher": {"path": f"t{i}", "io": "output"},
                        "weight": 1} for i in range(pairs)}
    module = _td.ATLoss(config, mode="code")
    return lambda s, t: module({f"s{i}": {"output": f} for i, f in enumerate(s)},
                               {f"t{i}": {"output": f} for i, f in enumerate(t)})
  at = lambda f: F.normalize(f.pow(2).mean(1).flatten(1))
  return lambda s, t: sum((at(a) - at(b)).pow(2).mean() for a, b in zip(s, t))


class CRDHead(nn.Module):
  """CRD's embedding heads and contrast memory (Tian et al. 2020, RepDistiller `crd/`).

  Student and teacher penultimate features are each mapped by a linear layer to
  `feat_dim` and L2-normalised (both heads are trained); the memory holds
  `num_data` x `feat_dim` embeddings per view, and each example is contrasted
  with `num_negatives` uniformly drawn entries. The loss is torchdistill's
  CRDLoss (RepDistiller's NCE loss over both views).
  """

  def __init__(self, student_dim: int, teacher_dim: int, *, feat_dim: int, num_data: int, num_negatives: int,
               temperature: float = 0.07, momentum: float = 0.5):
    super().__init__()
    if _td is None:
      raise ImportError("the CRD reference uses torchdistill's CRDLoss; install torchdistill (--no-deps)")
    self.embed_s = nn.Linear(student_dim, feat_dim)
    self.embed_t = nn.Linear(teacher_dim, feat_dim)
    self.num_data, self.num_negatives = num_data, num_negatives
    self.loss = _td.CRDLoss("s", "e", "t", input_size=feat_dim, output_size=num_data,
                            num_negative_samples=num_negatives, num_samples=num_data, temperature=temperature,
                            momentum=momentum)

  def forward(self, student_feat, teacher_feat, index: torch.Tensor) -> torch.Tensor:
    s = F.normalize(self.embed_s(student_feat), dim=1)
    t = F.normalize(self.embed_t(teacher_feat), dim=1)
    # Negatives drawn here (RepDistiller's data loader draws them) with the positive in column 0;
    # torchdistill's own sampler is bypassed.
    contrast = torch.randint(0, self.num_data, (index.shape[0], self.num_negatives + 1), device=index.device)
    contrast[:, 0] = index
    return self.loss({"s": {"output": s}, "e": {"input": {"pos_idx": index, "contrast_idx": contrast}}},
                     {"t": {"output": t}})


# ----------------------------------------------------------------------------- steps


@dataclasses.dataclass
class TorchStep:
  """`step()` runs one optimisation step on the fixed batch and returns the loss tensor (unsynchronised)."""

  step: Callable[[], torch.Tensor]
  device: torch.device
  channels_last: bool
  images_per_step: int
  trained_params: int  # number of trained scalars (models and connectors)

  def sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)


def setup(threads: int | None = None) -> torch.device:
  """Threads = all cores (PyTorch's default can be fewer) and the device: CUDA if there is one."""
  torch.set_num_threads(threads or os.cpu_count() or 1)
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _normalizer(images: np.ndarray, *, scale: float, mean: Sequence[float], std: Sequence[float],
                device: torch.device, channels_last: bool):
  """The uint8 [..., H, W, C] batch on device once, and `normalize(u8) -> float NCHW` run inside each step."""
  x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
  mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
  std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

  def normalize(u8: torch.Tensor) -> torch.Tensor:
    # NHWC storage viewed as NCHW is exactly the channels_last layout; otherwise make it NCHW-contiguous.
    v = u8.permute(0, 3, 1, 2)
    return (v if channels_last else v.contiguous()).float().mul(scale).sub(mean_t).div(std_t)

  return x, normalize


def _sgd(params, optimizer: dict[str, Any]) -> torch.optim.Optimizer:
  """PyTorch SGD: momentum without dampening and coupled L2, as optax.sgd after add_decayed_weights."""
  return torch.optim.SGD(params, lr=optimizer["learning_rate"], momentum=optimizer.get("momentum", 0.0),
                         weight_decay=optimizer.get("weight_decay", 0.0))


def _to(module: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
  return module.to(device, memory_format=torch.channels_last) if channels_last else module.to(device)


def _float32(tree):
  """Floating tensors of a (nested tuple / list / dict of) model output as float32 (mixed-precision outputs)."""
  if isinstance(tree, torch.Tensor):
    return tree.float() if tree.is_floating_point() else tree
  if isinstance(tree, dict):
    return {k: _float32(v) for k, v in tree.items()}
  if isinstance(tree, (tuple, list)):
    return type(tree)(_float32(v) for v in tree)
  return tree


def offline_step(*, student: nn.Module, teacher: nn.Module, images: np.ndarray, labels: np.ndarray,
                 index: np.ndarray, loss_fn: Callable[..., torch.Tensor], optimizer: dict[str, Any],
                 normalize: dict[str, Any], channels_last: bool, extra: nn.Module | None = None,
                 device: torch.device | None = None) -> TorchStep:
  """Student trained (BN in train mode) against a frozen teacher (eval mode, no grad).

  loss_fn(student_out, teacher_out, labels, index, extra) with outputs = (logits, features);
  extra: trained connector modules (CRD's heads), optimised with the student.
  images: uint8 [B, H, W, C]; labels, index: [B].
  """
  device = device or setup()
  channels_last = channels_last and not isinstance(student, MLP)
  student = _to(student, device, channels_last).train()
  teacher = _to(teacher, device, channels_last).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  if extra is not None:
    extra = extra.to(device).train()
  params = list(student.parameters()) + (list(extra.parameters()) if extra is not None else [])
  opt = _sgd(params, optimizer)
  x_u8, norm = _normalizer(images, device=device, channels_last=channels_last, **normalize)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  idx = torch.from_numpy(index.astype(np.int64)).to(device)

  def step() -> torch.Tensor:
    x = norm(x_u8)
    with torch.no_grad():
      t_out = teacher(x)
    s_out = student(x)
    with torch.autocast(device_type=device.type, enabled=False):  # under mixed precision too: the loss in f32
      loss = loss_fn(_float32(s_out), _float32(t_out), y, idx, extra)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

  return TorchStep(step, device, channels_last, images.shape[0], sum(p.numel() for p in params))


def peers_step(*, peers: Sequence[nn.Module], images: np.ndarray, labels: np.ndarray, mode: str,
               optimizer: dict[str, Any], normalize: dict[str, Any], channels_last: bool, temperature: float = 1.0,
               exchange_every: int = 1, device: torch.device | None = None) -> TorchStep:
  """K peers trained together by one SGD over all of them (the kd_jax step updates all peers at once).

  mode:
    "independent": each peer CE on its own batch, nothing exchanged (K separate runs in one step);
    "dml": each peer CE + mean over the other peers of T² KL(p_other ‖ p_self), one shared batch
      (Zhang et al. 2018; the others' predictions detached);
    "codistill_stale": each peer CE on its own batch + T² KL(mean of the stale copies' p ‖ p_self), the
      stale copies (eval mode, no grad, run on the peer's own batch) refreshed from the peers every
      `exchange_every` steps (Anil et al. 2018);
    "codistill_predictions": each peer CE + T² KL(mean of the other peers' current p ‖ p_self) on one
      shared batch, the others' predictions detached (co-distillation exchanging predictions every step:
      no extra forward pass, unlike the stale copies).
  images: uint8 [S, B, H, W, C], labels [S, B] with S = K streams ("independent", "codistill_stale") or 1.
  """
  if mode not in ("independent", "dml", "codistill_stale", "codistill_predictions"):
    raise ValueError(f"unknown peers mode {mode!r}")
  device = device or setup()
  peers = [_to(p, device, channels_last).train() for p in peers]
  k = len(peers)
  params = [p for m in peers for p in m.parameters()]
  opt = _sgd(params, optimizer)
  x_u8, norm = _normalizer(images, device=device, channels_last=channels_last, **normalize)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  soft = make_kd_loss(ce_weight=0.0, kd_weight=1.0, temperature=temperature)
  stale: list[nn.Module] = []
  counter = {"step": 0}

  def refresh() -> None:
    stale.clear()
    for m in peers:
      frozen = copy.deepcopy(m).eval()
      for p in frozen.parameters():
        p.requires_grad_(False)
      stale.append(frozen)

  if mode == "codistill_stale":
    refresh()

  def step() -> torch.Tensor:
    streams = [norm(x_u8[s]) for s in range(x_u8.shape[0])]
    xs = streams if len(streams) == k else streams * k
    ys = [y[s] for s in range(y.shape[0])] if y.shape[0] == k else [y[0]] * k
    logits = [m(x)[0].float() for m, x in zip(peers, xs)]  # the losses in f32, also under mixed precision
    loss = 0.0
    for i in range(k):
      loss = loss + F.cross_entropy(logits[i], ys[i])
      others = [j for j in range(k) if j != i]
      if mode == "dml":
        loss = loss + sum(soft(logits[i], logits[j].detach(), ys[i]) for j in others) / len(others)
      elif mode in ("codistill_stale", "codistill_predictions"):
        with torch.no_grad():
          outputs = [stale[j](xs[i])[0].float() if mode == "codistill_stale" else logits[j] for j in others]
          target = torch.stack([F.softmax(o / temperature, dim=1) for o in outputs]).mean(0)
        log_p = F.log_softmax(logits[i] / temperature, dim=1)
        loss = loss + temperature ** 2 * F.kl_div(log_p, target, reduction="batchmean")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    counter["step"] += 1
    if mode == "codistill_stale" and counter["step"] % exchange_every == 0:
      refresh()
    return loss.detach() / k

  return TorchStep(step, device, channels_last, images.shape[0] * images.shape[1], sum(p.numel() for p in params))
