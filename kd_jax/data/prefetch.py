"""`prefetch(iterator, size)`: any batch iterator run `size` items ahead in a background thread.

The loop places each batch on the devices from that thread, so the host-to-device copy of step s + 1
overlaps step s.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_END, _ERROR, _ITEM = range(3)


class _Prefetcher(Iterator[T]):
  """See `prefetch`."""

  def __init__(self, iterator: Iterable[T], size: int):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._produce, args=(iter(iterator),), daemon=True,
                                    name="kd_jax-prefetch")
    self._thread.start()

  def _put(self, item) -> bool:
    # A timeout, so that a consumer that stopped early (close) frees the thread.
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self, iterator: Iterator[T]) -> None:
    try:
      for item in iterator:
        if not self._put((_ITEM, item)):
          return
      self._put((_END, None))
    except BaseException as e:  # handed to the consumer, raised there
      self._put((_ERROR, e))

  def __next__(self) -> T:
    if self._done:
      raise StopIteration
    kind, value = self._queue.get()
    if kind == _ITEM:
      return value
    self._done = True
    self._stop.set()
    if kind == _ERROR:
      raise value
    raise StopIteration

  def close(self) -> None:
    """Stops the background thread (the iterator then ends)."""
    self._done = True
    self._stop.set()
    self._thread.join()

  def __enter__(self) -> "_Prefetcher[T]":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    self._stop.set()


def prefetch(iterator: Iterable[T], size: int = 2) -> Iterator[T]:
  """Yields the items of `iterator`, computed up to `size` ahead in a background thread.

  Order is kept; an exception in `iterator` is raised at the consumer, at the
  position where it happened. Call `.close()` (or use `with`) to stop early.
  """
  if size < 1:
    raise ValueError(f"prefetch size must be at least 1, got {size}")
  return _Prefetcher(iterator, size)
