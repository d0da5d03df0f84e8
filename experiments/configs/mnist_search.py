r"""Student architecture search under the Hinton MNIST teacher (experiments/search.py).

Search to Distill (Liu, Jia, Tang, Xie & Tian 2020, CVPR) in the width/depth
space of ReLU MLPs: hidden depth 1-3, each hidden width in {50, 100, 200, 400,
800}; every candidate trained with CE + KD (T=20, as hinton_mnist.py's
student_kd) from the one `teacher` row (784-1200-1200-10, dropout, jitter,
max-norm; Adam 1e-3, cosine decay, batch 128). Successive halving: every
candidate trains `rungs[0]` epochs, the best third by Pareto rank (eta=3)
`rungs[1]` more from those weights. Writes search.json / search.csv (every
candidate, `on_front`) and pareto.png (accuracy vs parameters, the front
highlighted) in the workdir; resumable.

Measured (tests/test_search.py, slow: a 784-400-400-10 teacher of 2 epochs, 5 random
candidates, rungs [1, 1], eta 2): front w400x200x100 96.69%, w800x200 96.98%,
w800x400 97.04% (2 epochs each); stopped after 1 epoch: w50 89.49%, w800 95.50%.

  python -m experiments.search --config=experiments/configs/mnist_search.py --workdir=/tmp/mnist_search
  python -m experiments.search --config=experiments/configs/mnist_search.py --workdir=/tmp/mnist_search_evo \
      --strategy=evolution --candidates=24 --seed=1
"""
import ml_collections

from kd_jax.train.tables import mnist_table
from kd_jax.train import row


def get_config():
  c = mnist_table(paper_metric="test_accuracy")
  adam = {"name": "adam", "learning_rate": 1e-3}
  cosine = {"name": "cosine"}
  c.rows.teacher = row(model="mlp_1200", terms={"ce": {}}, optimizer={**adam, "max_norm": 3.5}, schedule=cosine,
                       data={"augment": "jitter"},
                       epochs=60)
  c.search = ml_collections.ConfigDict({
      "model": "mlp", "model_kwargs": {}, "teacher": "teacher",
      "depths": [1, 2, 3], "widths": [50, 100, 200, 400, 800],
      "strategy": "random",  # or "evolution"
      "candidates": 16, "population": 6,  # population: evolution's first sample and generation size
      "rungs": [3, 12], "eta": 3,  # epochs per rung; successive halving keeps 1/eta at each rung
      "terms": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 20.0}},
      "optimizer": adam, "schedule": cosine,
      "cache_teacher": True,  # KD reads only the teacher's logits on un-augmented inputs
  })
  return c
