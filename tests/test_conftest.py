"""The suite's own rules: references CI cannot skip, expected failures that must say why and stay strict."""
import pytest

import conftest


def test_a_missing_reference_is_skipped_locally_and_fails_where_references_are_required(monkeypatch):
  monkeypatch.setattr(conftest, "REQUIRE_REFERENCES", False)
  with pytest.raises(pytest.skip.Exception, match="kd_jax_no_such_reference"):
    conftest.require_reference("kd_jax_no_such_reference")
  monkeypatch.setattr(conftest, "REQUIRE_REFERENCES", True)
  with pytest.raises(pytest.fail.Exception, match="KD_JAX_REQUIRE_REFERENCES"):
    conftest.require_reference("kd_jax_no_such_reference")
  assert conftest.require_reference("numpy").__name__ == "numpy"


class _Item:
  def __init__(self, **kwargs):
    self.nodeid, self.kwargs = "tests/test_x.py::test_y", kwargs

  def iter_markers(self, name):
    return [pytest.mark.xfail(**self.kwargs).mark] if name == "xfail" else []


class _Config:
  def getini(self, name):
    return name == "xfail_strict"


@pytest.mark.parametrize("kwargs", [{}, {"reason": "known"} | {"strict": False}])
def test_an_xfail_without_a_reason_or_not_strict_is_refused(kwargs):
  with pytest.raises(pytest.UsageError, match="reason and strict=True"):
    conftest.pytest_collection_modifyitems(_Config(), [_Item(**kwargs)])
  conftest.pytest_collection_modifyitems(_Config(), [_Item(reason="known", strict=True), _Item(reason="known")])
