"""`qwen bench serve` end to end on the demo model with tiny settings: structure and counts, no timings."""

from __future__ import annotations

import json

import pytest

from qwen.bench.serve import Target, main, percentile, prompt_text
from qwen.hub import demo_model_available

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.skipif(not demo_model_available(), reason="the demo model is not built")

LEVELS, REQUESTS, MAX_TOKENS = (1, 2), 2, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench-serve")
    rc = main(["--in-process", "--concurrency", ",".join(map(str, LEVELS)), "--max-tokens", str(MAX_TOKENS),
               "--rounds", "1", "--min-requests", str(REQUESTS), "--warmup-tokens", "2", "--prompt-words", "4",
               "--json", str(out / "r.json"), "--plot", str(out / "r.png")])
    assert rc == 0
    assert (out / "r.png").stat().st_size > 0
    return json.loads((out / "r.json").read_text())


def test_both_servers_at_every_level(run: dict) -> None:
    assert [(s["label"], s["max_batch_size"]) for s in run["servers"]] == [("ours", 2), ("one-at-a-time", 1)]
    for server in run["servers"]:
        assert [lv["summary"]["concurrency"] for lv in server["levels"]] == list(LEVELS)


def test_counts_and_latencies_are_sane(run: dict) -> None:
    for server in run["servers"]:
        for level in server["levels"]:
            s, requests = level["summary"], level["requests"]
            expected = max(REQUESTS, s["concurrency"])
            assert s["requests"] == len(requests) == expected
            assert s["completion_tokens"] == expected * MAX_TOKENS
            assert all(r["completion_tokens"] == MAX_TOKENS for r in requests)
            # A chunk carries one token or more (a token may end inside a UTF-8 character).
            assert all(r["chunks"] <= MAX_TOKENS and len(r["itl"]) == r["chunks"] - 1 for r in requests)
            assert all(r["ttft"] > 0 and r["latency"] >= r["ttft"] and min(r["itl"]) >= 0 for r in requests)
            assert s["wall_s"] > 0 and s["throughput_tok_s"] > 0
            assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"]
            assert 0 < s["itl_p50_s"] <= s["itl_p99_s"]
            assert s["decode_steps"] > 0 and 1 <= s["mean_decode_batch"] <= server["max_batch_size"]


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0


def test_target_urls_and_prompts() -> None:
    t = Target.from_url("http://127.0.0.1:8000/v1/")
    assert (t.host, t.port, t.prefix, t.tls) == ("127.0.0.1", 8000, "", False)
    assert Target.from_url("https://example.org/api").base_url == "https://example.org:443/api"
    assert len({prompt_text(i, 8) for i in range(64)}) == 64
