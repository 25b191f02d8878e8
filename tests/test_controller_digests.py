"""The controller's record of writers' digests agrees with a plain model: the first digest of a
key stands, a different one is refused (and counted), and past the cap the oldest records go."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from lmshare.controller.digests import DigestRecords

KEYS = [bytes([i]) * 16 for i in range(12)]
DIGESTS = [bytes([0xD0 + i]) * 16 for i in range(2)]

admit = st.lists(st.tuples(st.sampled_from(KEYS), st.none() | st.sampled_from(DIGESTS)),
                 max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(admit, max_size=20), st.integers(1, 8))
def test_records_agree_with_a_fifo_model(admits, cap):
    records = DigestRecords(max_records=cap)
    model: OrderedDict[bytes, bytes] = OrderedDict()
    conflicts = 0
    for pairs in admits:
        keys = [key for key, _ in pairs]
        digests = {key: digest for key, digest in pairs if digest is not None}
        expected = []
        for key in keys:
            digest = digests.get(key)
            if digest is not None:
                if key not in model:
                    if len(model) >= cap:
                        model.popitem(last=False)
                    model[key] = digest
                elif model[key] != digest:
                    conflicts += 1
                    continue
            expected.append(key)
        assert records.admit(keys, digests) == expected
        assert len(records) == len(model) <= cap
        assert records.conflicts == conflicts
        for key in KEYS:
            assert records.get(key) == model.get(key)
