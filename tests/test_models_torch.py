"""Parity with the PyTorch reference definitions that pip provides (the `compare` extra).

torchdistill's CIFAR ResNets (RepDistiller's layout) and torchvision's ImageNet
ResNets are built in PyTorch with BatchNorm statistics from a few training-mode
batches, their weights converted by `third_party.torch_models`, and the Flax
logits compared with PyTorch's in eval mode on the same input.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REQUIRE_REFERENCES, require_reference

torch = require_reference("torch")

from kd_jax import models  # noqa: E402
from third_party import torch_models  # noqa: E402


@functools.lru_cache(maxsize=None)
def torchvision_models():
  try:
    return torch_models.torchvision_models()
  except ImportError as e:
    if REQUIRE_REFERENCES:
      pytest.fail(f"torchvision unavailable but KD_JAX_REQUIRE_REFERENCES is set: {e}", pytrace=False)
    pytest.skip(f"torchvision unavailable: {e}")


def torchdistill_resnet(name):
  torchvision_models()  # torchdistill's CIFAR ResNets import torchvision's BasicBlock
  resnet = require_reference("torchdistill.models.classification.resnet")
  return getattr(resnet, name)(num_classes=100)


def cifar_resnet_x4(depth):
  """RepDistiller's resnet8x4 / resnet32x4 layout (stem 32, stages 64-128-256 of BasicBlocks, 8x8 average pool)
  built from torchdistill's CIFAR ResNet code, whose stages are fixed at 16-32-64 otherwise."""
  torchvision_models()
  resnet = pytest.importorskip("torchdistill.models.classification.resnet")
  nn = torch.nn

  class ResNetX4(resnet.ResNet4Cifar):
    def __init__(self):  # pylint: disable=super-init-not-called
      nn.Module.__init__(self)
      self._norm_layer, self.inplanes, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 32, 1, 1, 64
      self.conv1 = nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1, bias=False)
      self.bn1 = nn.BatchNorm2d(32)
      self.relu = nn.ReLU(inplace=True)
      n = (depth - 2) // 6
      self.layer1 = self._make_layer(resnet.BasicBlock, 64, n)
      self.layer2 = self._make_layer(resnet.BasicBlock, 128, n, stride=2)
      self.layer3 = self._make_layer(resnet.BasicBlock, 256, n, stride=2)
      self.avgpool = nn.AvgPool2d(8, stride=1)
      self.fc = nn.Linear(256, 100)

  return ResNetX4()


def reference(name):
  if name in ("resnet20", "resnet56"):
    return torchdistill_resnet(name)
  if name in ("resnet8x4", "resnet32x4"):
    return cifar_resnet_x4(int(name[len("resnet"):-len("x4")]))
  return getattr(torchvision_models(), name)()


def calibrated(net, shape, seed=0):
  """`net` in eval mode with BN running statistics averaged over 2 training-mode batches."""
  torch.manual_seed(seed)
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None  # cumulative average
  net.train()
  with torch.no_grad():
    for _ in range(2):
      net(torch.randn(4, 3, *shape[:2]))
  return net.eval()


def flax_logits(name, state_dict, images_nchw):
  model = models.create(name, num_classes=1000 if name in ("resnet18", "resnet34", "resnet50") else 100)
  x = jnp.asarray(images_nchw.transpose(0, 2, 3, 1))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  variables = torch_models.convert_state_dict(state_dict, template)
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


@pytest.mark.parametrize("name", [
    "resnet20",  # torchdistill, CIFAR
    pytest.param("resnet56", marks=pytest.mark.slow),
    "resnet8x4",  # RepDistiller's x4 widths (CRD's student), on torchdistill's blocks
    pytest.param("resnet32x4", marks=pytest.mark.slow),  # CRD's teacher
    "resnet18",  # torchvision, ImageNet
    pytest.param("resnet34", marks=pytest.mark.slow),
    "resnet50",
])
def test_same_logits_as_the_pytorch_reference(name):
  shape = models.input_shape(name)
  net = calibrated(reference(name), shape)
  images = torch.randn(2, 3, *shape[:2], generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = net(images).numpy()
  got = flax_logits(name, net.state_dict(), images.numpy())
  assert np.abs(expected).max() > 0.1  # a meaningful comparison, not two near-zero vectors
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_round_trip_back_to_pytorch():
  net = reference("resnet18")
  model = models.create("resnet18", num_classes=1000)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  variables = torch_models.convert_state_dict(net.state_dict(), template)
  back = torch_models.to_torch_state_dict(variables)
  original = net.state_dict()
  assert set(back) == set(original)
  for k, v in original.items():
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
  net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()})  # strict


def test_load_checkpoint_file_as_saved_by_repdistiller(tmp_path):
  """RepDistiller saves {'model': state_dict, ...}; DataParallel adds 'module.' prefixes."""
  net = calibrated(reference("resnet20"), (32, 32, 3))
  path = tmp_path / "ckpt_epoch_240.pth"
  torch.save({"epoch": 240, "model": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
  module, variables = torch_models.load_checkpoint(str(path), "resnet20", num_classes=100)
  images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    expected = net(images).numpy()
  got = np.asarray(jax.jit(lambda v, x: module.apply(v, x))(variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_mismatched_checkpoint_is_a_clear_error():
  state = reference("resnet20").state_dict()
  wrong_depth = jax.eval_shape(lambda: models.create("resnet8", num_classes=100).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  with pytest.raises(ValueError, match=r"PyTorch keys with no Flax counterpart: \['layer1\.1\.conv1\.weight'"):
    torch_models.convert_state_dict(state, wrong_depth)
  wrong_classes = jax.eval_shape(lambda: models.create("resnet20", num_classes=10).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  with pytest.raises(ValueError, match=r"fc\.weight: torch \(100, 64\) -> flax fc/kernel expects \(64, 10\)"):
    torch_models.convert_state_dict(state, wrong_classes)
  missing = {k: v for k, v in state.items() if not k.startswith("fc.")}
  with pytest.raises(ValueError, match=r"Flax variables not in the state dict: \['params:fc/bias', 'params:fc/kernel'\]"):
    torch_models.convert_state_dict(missing, jax.eval_shape(lambda: models.create("resnet20", num_classes=100).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))))


def test_flax_path_rule():
  assert torch_models.flax_path("layer1.0.downsample.0") == ("layer1_0", "downsample_0")
  assert torch_models.flax_path("block1.layer.0.convShortcut") == ("block1", "layer_0", "convShortcut")
  assert torch_models.flax_path("blocks.3.1.conv.4") == ("blocks_3_1", "conv_4")


def test_convert_teacher_command_writes_a_teacher_directory(tmp_path, capsys):
  """`python -m third_party.convert_teacher` on a RepDistiller-style .pth: the directory's model, restored as
  a teacher is, gives PyTorch's logits."""
  from kd_jax.train import checkpoint as checkpoint_lib
  from third_party import convert_teacher

  net = calibrated(reference("resnet20"), (32, 32, 3))
  path = tmp_path / "ckpt_epoch_240.pth"
  torch.save({"epoch": 240, "model": net.state_dict()}, path)
  out = tmp_path / "teacher dir"
  assert convert_teacher.main([str(path), "--model=resnet20", "--num_classes=100", "--dataset=cifar100",
                               f"--out={out}"]) == 0
  assert f"wrote {out}" in capsys.readouterr().out
  variables, description = checkpoint_lib.load_model(str(out))
  assert description == {"model": "resnet20", "model_kwargs": {}, "num_classes": 100, "input_shape": [32, 32, 3],
                         "dataset": "cifar100"}
  module = models.create(description["model"], num_classes=description["num_classes"], **description["model_kwargs"])
  images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    expected = net(images).numpy()
  got = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(
      variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  with pytest.raises(SystemExit):
    convert_teacher.main([str(path), "--model=resnet20", "--num_classes=100", "--dataset=cifar100",
                          f"--out={out}", "--input_shape=32x32"])
  assert "--input_shape must be H,W,C integers, got '32x32'" in capsys.readouterr().err
