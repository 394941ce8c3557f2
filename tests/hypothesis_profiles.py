"""Hypothesis profiles for the differential fuzz tests (tests/test_fuzz.py).

* ``ci`` (what ``make test`` runs): a fixed number of examples per fuzz test, derandomized so
  every run and every fresh clone draws the same cases, no deadline (the machine is shared).
* ``long`` (``make fuzz``): random cases, many of them, failures saved in ``.hypothesis/`` and
  replayed first next time. Set the count with ``GCONV_FUZZ_EXAMPLES`` (examples per fuzz
  test, default 5000), e.g. ``GCONV_FUZZ_EXAMPLES=50000 make fuzz``.

``pytest --hypothesis-profile=NAME`` loads the profile before test modules are imported, so this
module must be imported by ``tests/conftest.py``; test_fuzz.py imports it too, for runs that
name no profile (they get ``ci``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES_ENV = "GCONV_FUZZ_EXAMPLES"
LONG_DEFAULT_EXAMPLES = 5000

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci",
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=_HEALTH,
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get(FUZZ_EXAMPLES_ENV, LONG_DEFAULT_EXAMPLES)),
    derandomize=False,
    deadline=None,
    print_blob=True,
    suppress_health_check=_HEALTH,
)


def fuzz_settings(ci_examples: int) -> settings:
    """Settings for one fuzz test: ``ci_examples`` under ``ci``, the profile's count under ``long``.

    A run that loaded no profile of ours (plain ``pytest``) gets ``ci``.
    """
    current = settings.get_current_profile_name()
    if current == "long":
        return settings(settings.get_profile("long"))
    return settings(settings.get_profile("ci"), max_examples=ci_examples)
