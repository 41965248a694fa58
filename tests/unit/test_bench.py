"""The pure parts of ``redbatch bench``: argument parsing, percentiles, the summary and the table."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.bench import (
    ClientLog,
    Sample,
    format_table,
    make_images,
    parse_int_list,
    parse_limit,
    parse_size,
    percentile,
    progress_text,
    results_table,
    summarize,
    target_for,
)
from common.client import content_type_of


def test_concurrency_lists_parse_in_order() -> None:
    assert parse_int_list("1,4,16,64") == [1, 4, 16, 64]
    assert parse_int_list("8") == [8]
    assert parse_int_list(" 2, 1 ,") == [2, 1]


@pytest.mark.parametrize("text", ["", ",", "0", "1,-4", "a,b", "1.5"])
def test_bad_concurrency_lists_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_int_list(text)


def test_sizes_parse_as_width_by_height() -> None:
    assert parse_size("640x480") == (640, 480)
    for bad in ("640", "640x", "x480", "0x10", "axb"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_percentiles_interpolate_like_numpy() -> None:
    values = sorted(np.random.default_rng(0).exponential(20.0, 997).tolist())
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile(list(range(1, 101)), 50) == pytest.approx(50.5)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_summary_counts_only_200s_in_throughput_latency_and_batches() -> None:
    samples = [Sample(0.010, 200, 4), Sample(0.020, 200, 8), Sample(0.001, 503, None), Sample(1.0, 0, None)]
    r = summarize(concurrency=4, duration_s=2.0, samples=samples, uncounted=4)
    assert (r.requests, r.ok, r.errors, r.uncounted) == (4, 2, 2, 4)
    assert r.ok_per_s == 1.0
    assert r.p50_ms == pytest.approx(15.0)
    assert r.mean_batch_size == 6.0
    assert r.batch_sizes == {4: 1, 8: 1}
    assert r.statuses == {0: 1, 200: 2, 503: 1}


def test_a_level_without_any_200_has_no_latency_nor_batch() -> None:
    r = summarize(1, 1.0, [Sample(0.001, 503, None)], 1)
    assert (r.p50_ms, r.p99_ms, r.mean_batch_size, r.ok_per_s) == (None, None, None, 0.0)
    assert "-" in results_table([r]).splitlines()[2].split()


def test_table_columns_are_aligned() -> None:
    text = format_table(("concurrency", "req/s"), [("1", "12.5"), ("64", "1234.0")])
    lines = text.splitlines()
    assert lines == [
        "concurrency   req/s",
        "-----------  ------",
        "          1    12.5",
        "         64  1234.0",
    ]
    assert len({len(line) for line in lines}) == 1


def test_results_table_has_one_row_per_level() -> None:
    levels = [summarize(c, 1.0, [Sample(0.01 * c, 200, c)], 0) for c in (1, 4, 16)]
    lines = results_table(levels).splitlines()
    assert lines[0].split() == [
        "concurrency",
        "req/s",
        "p50",
        "ms",
        "p90",
        "ms",
        "p99",
        "ms",
        "errors",
        "mean",
        "batch",
    ]
    assert [line.split()[0] for line in lines[2:]] == ["1", "4", "16"]
    assert lines[4].split()[-1] == "16.00"


def test_a_limit_adds_served_over_limit_to_every_row() -> None:
    levels = [summarize(c, 2.0, [Sample(0.01, 200, 1)] * (50 * c), 0) for c in (1, 4)]  # 25 and 100 req/s
    lines = results_table(levels, parse_limit("200")).splitlines()
    assert lines[0].split()[-1] == "served/limit"
    assert [line.split()[-1] for line in lines[2:]] == ["0.12", "0.50"]
    assert len({len(line) for line in lines}) == 1  # still aligned


def test_a_limit_is_images_a_second_or_an_in_process_report(tmp_path: Path) -> None:
    assert parse_limit("440.6").ips == 440.6
    report = tmp_path / "limit.json"
    report.write_text(
        json.dumps({"model": "mobilenet_v3_small", "device": "cpu", "dtype": "float32", "machine_limit_ips": 412.25})
    )
    limit = parse_limit(str(report))
    assert (limit.ips, limit.model) == (412.25, "mobilenet_v3_small")
    assert limit.source == "412.2 img/s (limit.json: mobilenet_v3_small, cpu, float32)"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "No such file"),
        ("{not json", "not a JSON file"),
        ('{"model": "m"}', "no machine limit"),
        ('{"machine_limit_ips": 0}', "no machine limit"),
        ('{"machine_limit_ips": true}', "no machine limit"),
        ("[1, 2]", "no machine limit"),
    ],
)
def test_a_limit_file_without_a_limit_is_refused_with_the_reason(
    tmp_path: Path, content: str | None, says: str
) -> None:
    path = tmp_path / "limit.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=says):
        parse_limit(str(path))


@pytest.mark.parametrize("text", ["0", "-5", "nan", "inf"])
def test_a_limit_must_be_a_positive_rate(text: str) -> None:
    with pytest.raises(ValueError, match="above 0"):
        parse_limit(text)


def test_the_progress_bar_fills_over_the_warm_up_then_the_measured_window() -> None:
    log = ClientLog(counted=[Sample(0.01, 200, 1)] * 7 + [Sample(0.01, 503, None)] * 2)
    # a level of 2 s warm-up and 4 s measured, started at 100.0
    warming = progress_text(64, 100.0, 102.0, 106.0, [log], now=101.0)
    assert warming == "concurrency 64 [-----" + "." * 25 + "] warming up,  1.0 s left"
    measuring = progress_text(64, 100.0, 102.0, 106.0, [log], now=104.0)
    assert measuring == "concurrency 64 [----------" + "#" * 10 + "." * 10 + "]   2.0/4.0 s, 9 requests, 2 errors"
    late = progress_text(64, 100.0, 102.0, 106.0, [log], now=107.0)
    assert late == "concurrency 64 [" + "-" * 10 + "#" * 20 + "] waiting for the last answers"


def test_generated_images_are_distinct_jpegs_of_the_size_asked() -> None:
    bodies = make_images(3, (640, 480))
    assert len(set(bodies)) == 3
    for b in bodies:
        assert content_type_of(b) == "image/jpeg"
        assert Image.open(io.BytesIO(b)).size == (640, 480)
        assert 10_000 < len(b) < 400_000  # like a photograph: neither flat colour nor pure noise


def test_target_builds_the_predict_route() -> None:
    t = target_for("http://10.0.0.5:8080/base/", "resnet18", api_key="k")
    assert (t.host, t.port, t.path) == ("10.0.0.5", 8080, "/base/v1/models/resnet18/predict")
    assert dict(t.headers) == {"Authorization": "Bearer k"}
    assert target_for("http://localhost", "m").port == 80
    with pytest.raises(ValueError):
        target_for("localhost:8000", "m")


def test_bench_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom common.cli import main\n"
        "try:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--in-process" in proc.stdout and "--concurrency" in proc.stdout


def test_a_window_of_no_time_is_refused_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    from common.cli import main

    assert main(["bench", "--url", "http://127.0.0.1:9", "--model", "m", "--duration-s", "0"]) == 2
    assert "--duration-s must be above 0" in capsys.readouterr().err
