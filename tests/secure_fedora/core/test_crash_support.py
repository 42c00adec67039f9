"""The tests' crash-point helper fails a block that does not crash, and always disarms."""

import pytest

from secure_fedora.core import crashpoints
from tests.secure_fedora.core.crash_support import crashes_at


def test_a_block_must_crash_at_the_armed_point_and_is_disarmed_after():
    with crashes_at("train@2"):
        crashpoints.crash_point("train")
        crashpoints.crash_point("train")
    crashpoints.crash_point("train")  # disarmed: nothing happens
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        with crashes_at("train@2"):
            crashpoints.crash_point("train")
    crashpoints.crash_point("train")
    crashpoints.crash_point("train")
