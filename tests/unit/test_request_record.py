"""A request's submission record: what the controller writes to Redis, and the digest an
idempotency key is checked against."""

from __future__ import annotations

import hashlib
import json

from qlmserve.controller.request import Request, Sampling


def _requests() -> list[Request]:
    return [Request("r1", "sim-7b", "batch", list(range(1, 257)), 128, 1.5, 600.0,
                    sampling=Sampling(0.7, 0.9, 3, (5,)), user_id='u"\\x', tenant="ténant"),
            Request("r2", "m", "", [], 1, 0.0, 1.0),
            Request("r3", "m", "c", [0, -1, 2**31], 1, 0.0, 1.0)]


def test_fingerprint_is_the_digest_earlier_versions_stored():
    """This test verifies that:
    1. the fingerprint is the digest of the JSON list earlier versions hashed (a retry
       after an upgrade still matches the fingerprint stored with its idempotency key),
       for quoted and non-ASCII text, an empty prompt and negative ids;
    2. submission() gives the same fingerprint and fields as fingerprint() and to_redis()."""
    for r in _requests():
        body = json.dumps([r.model, r.slo_class, r.prompt_token_ids, r.max_tokens, r.sampling.to_json(),
                           r.user_id, r.tenant])
        assert r.fingerprint() == hashlib.sha256(body.encode()).hexdigest()[:32]
        assert r.submission() == (r.fingerprint(), r.to_redis())
    assert _requests()[0].fingerprint() == "6041529fdfb68cee27f0d7f91640b576"
    assert _requests()[2].to_redis()["prompt"] == "0,-1,2147483648"
