"""What a size cap saves: a 64 MiB envelope accepted in full vs. rejected on its length.

Run from the repository root: ``python benchmarks/envelope_caps.py``. Prints the time to
accept a 64 MiB message (copy, parse, SHA-256, signature), to reject it under a 1 MiB cap,
and to reject a message whose header length prefix announces 200 MB.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from privacy.envelope import (  # noqa: E402
    EnvelopeVerifier,
    MessageTooLargeError,
    decode_message,
    encode_message,
    make_envelope,
)
from privacy.identity import Identity  # noqa: E402


def main() -> None:
    """Measure and print the three timings."""
    logging.disable(logging.WARNING)
    ids = {p: Identity.generate(p) for p in ("server", "client-000")}
    payload = b"\0" * (64 * 1024 * 1024)
    message = encode_message(make_envelope(ids["client-000"], "server", 1, "theta", payload),
                             payload)
    verifier = EnvelopeVerifier({p: i.public for p, i in ids.items()}, "server")
    t = time.perf_counter()
    verifier.verify_message(message, 1)
    accepted = time.perf_counter() - t
    t = time.perf_counter()
    try:
        decode_message(message, max_bytes=1 << 20)
    except MessageTooLargeError:
        pass
    capped = time.perf_counter() - t
    announced = b"SFEN" + (200 * 1024 * 1024).to_bytes(4, "big") + b"{" * 1024
    t = time.perf_counter()
    try:
        decode_message(announced)
    except MessageTooLargeError:
        pass
    header = time.perf_counter() - t
    print(f"64 MiB message accepted (copy+parse+hash+verify): {accepted * 1e3:.1f} ms")
    print(f"same message rejected by a 1 MiB cap: {capped * 1e6:.1f} us")
    print(f"header announcing 200 MB rejected: {header * 1e6:.1f} us")


if __name__ == "__main__":
    main()
