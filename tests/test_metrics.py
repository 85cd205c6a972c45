"""Prometheus metrics (zipmiddleware.metrics): the methods' counts in a private registry, the
no-op class, errors swallowed and logged, and multiprocess mode under a real gunicorn with two
workers (the counts of both add up whichever worker answers the scrape; a killed worker's
downloads in flight are forgotten through the child_exit hook)."""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from zipmiddleware import metrics as metrics_module  # noqa: E402
from zipmiddleware.errors import ConfigError  # noqa: E402
from zipmiddleware.metrics import (  # noqa: E402
    MISSING,
    Metrics,
    PrometheusMetrics,
    get_metrics,
    mark_process_dead,
    metrics_app,
)

from .servers import PROJECT, TESTS, GunicornServer  # noqa: E402

P = "zipmiddleware_"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def counted(registry: CollectorRegistry) -> PrometheusMetrics:
    return PrometheusMetrics(registry=registry)


@pytest.fixture
def no_multiproc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(P + name, labels)


# -- the methods -------------------------------------------------------------------------


def test_every_series_exists_at_zero(registry: CollectorRegistry, counted: PrometheusMetrics) -> None:
    assert value(registry, "downloads_in_flight") == 0
    assert value(registry, "bytes_sent_total") == 0
    for outcome in ("complete", "aborted", "client_gone"):
        assert value(registry, "downloads_total", outcome=outcome) == 0
    assert value(registry, "entry_retries_total") == 0
    for outcome in ("failed", "skipped"):
        assert value(registry, "entry_failures_total", outcome=outcome) == 0
    for result in ("hit", "miss"):
        assert value(registry, "crc_cache_lookups_total", result=result) == 0
    assert value(registry, "time_to_first_byte_seconds_count") == 0


def test_downloads(registry: CollectorRegistry, counted: PrometheusMetrics) -> None:
    counted.download_started()
    counted.download_started()
    counted.download_started()
    assert value(registry, "downloads_in_flight") == 3
    counted.download_ended("complete", 1000)
    counted.download_ended("aborted", 300)
    assert value(registry, "downloads_in_flight") == 1
    counted.download_ended("client_gone", 0)
    assert value(registry, "downloads_in_flight") == 0
    assert value(registry, "bytes_sent_total") == 1300
    assert value(registry, "downloads_total", outcome="complete") == 1
    assert value(registry, "downloads_total", outcome="aborted") == 1
    assert value(registry, "downloads_total", outcome="client_gone") == 1


def test_first_byte(registry: CollectorRegistry, counted: PrometheusMetrics) -> None:
    counted.first_byte(0.003)
    counted.first_byte(0.2)
    counted.first_byte(45.0)  # past the last bucket: only in +Inf
    counted.first_byte(-0.001)  # a clock oddity counts as 0
    assert value(registry, "time_to_first_byte_seconds_count") == 4
    assert value(registry, "time_to_first_byte_seconds_sum") == pytest.approx(45.203)
    bucket = "time_to_first_byte_seconds_bucket"
    assert value(registry, bucket, le="0.005") == 2
    assert value(registry, bucket, le="0.25") == 3
    assert value(registry, bucket, le="30.0") == 3
    assert value(registry, bucket, le="+Inf") == 4


def test_entries_and_crc_cache(registry: CollectorRegistry, counted: PrometheusMetrics) -> None:
    counted.entry_retried()
    counted.entry_retried()
    counted.entry_failed(skipped=False)
    counted.entry_failed(skipped=True)
    counted.entry_failed(skipped=True)
    counted.crc_lookups(hits=5, misses=2)
    counted.crc_lookups(hits=0, misses=0)
    counted.crc_lookups(hits=1, misses=0)
    assert value(registry, "entry_retries_total") == 2
    assert value(registry, "entry_failures_total", outcome="failed") == 1
    assert value(registry, "entry_failures_total", outcome="skipped") == 2
    assert value(registry, "crc_cache_lookups_total", result="hit") == 6
    assert value(registry, "crc_cache_lookups_total", result="miss") == 2


METHODS = {"download_started", "download_ended", "first_byte", "entry_retried", "entry_failed", "crc_lookups"}


def call_every_method(metrics: Metrics) -> None:
    metrics.download_started()
    metrics.download_ended("complete", 10)
    metrics.first_byte(0.5)
    metrics.entry_retried()
    metrics.entry_failed(True)
    metrics.crc_lookups(1, 2)


def test_the_null_metrics_do_nothing() -> None:
    nothing = Metrics()
    call_every_method(nothing)
    assert vars(nothing) == {}


def test_both_classes_have_the_same_methods() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    assert public(PrometheusMetrics) == public(Metrics)
    assert set(public(Metrics)) == METHODS


# -- nothing raises ----------------------------------------------------------------------


class Broken:
    """Stands for a metric whose storage broke (a full disk under PROMETHEUS_MULTIPROC_DIR ...)."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> None:
            raise OSError(28, "No space left on device")

        return fail


def test_a_broken_metric_is_logged_once_then_quietly(
    counted: PrometheusMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    counted._in_flight = Broken()  # type: ignore[assignment]
    with caplog.at_level(logging.DEBUG, logger="zipmiddleware"):
        counted.download_started()
        counted.download_started()
        counted.download_started()
    records = [r for r in caplog.records if r.name == "zipmiddleware"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "download_started" in records[0].getMessage()
    assert records[0].exc_info is not None and isinstance(records[0].exc_info[1], OSError)


def test_every_method_swallows_errors(registry: CollectorRegistry, caplog: pytest.LogCaptureFixture) -> None:
    counted = PrometheusMetrics(registry=registry)
    for attribute, current in list(vars(counted).items()):
        if attribute == "_warned":
            continue
        broken: Any = {key: Broken() for key in current} if isinstance(current, dict) else Broken()
        setattr(counted, attribute, broken)
    with caplog.at_level(logging.WARNING, logger="zipmiddleware"):
        call_every_method(counted)
    assert {r.getMessage().split()[1] for r in caplog.records} == METHODS


def test_bad_arguments_are_logged_not_raised(
    registry: CollectorRegistry, counted: PrometheusMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    counted.download_started()
    with caplog.at_level(logging.WARNING, logger="zipmiddleware"):
        counted.download_ended("exploded", 10)  # an outcome that does not exist
        counted.crc_lookups("many", None)  # type: ignore[arg-type]
        counted.first_byte("soon")  # type: ignore[arg-type]
    assert len(caplog.records) == 3
    # What could be counted before the unknown outcome was.
    assert value(registry, "downloads_in_flight") == 0
    assert value(registry, "bytes_sent_total") == 10
    assert value(registry, "downloads_total", outcome="exploded") is None


def test_a_registry_that_already_holds_the_names_fails_at_start(registry: CollectorRegistry) -> None:
    PrometheusMetrics(registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        PrometheusMetrics(registry=registry)


# -- get_metrics, metrics_app, mark_process_dead -------------------------------------------


def test_get_metrics_off_gives_the_null_metrics() -> None:
    assert type(get_metrics(False)) is Metrics


def test_get_metrics_gives_one_instance_per_process(no_multiproc: None) -> None:
    first = get_metrics(True)
    assert isinstance(first, PrometheusMetrics)
    assert get_metrics(True) is first  # the default registry would refuse a second one


def test_get_metrics_without_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "_instance", None)
    for name in ("prometheus_client", "prometheus_client.values"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError) as info:
        get_metrics(True)
    assert (
        str(info.value)
        == MISSING
        == "metrics = true needs prometheus_client: pip install 'zipmiddleware[metrics]'"
    )
    with pytest.raises(ImportError, match="zipmiddleware\\[metrics\\]"):
        metrics_app()
    assert type(get_metrics(False)) is Metrics
    mark_process_dead(12345)  # nothing to do, nothing raised


def test_importing_zipmiddleware_does_not_import_prometheus_client() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import zipmiddleware, zipmiddleware.metrics as m\n"
        "m.get_metrics(False).download_started()\n"
        "m.mark_process_dead(1)\n"
        "print('fine')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT)
    assert result.stdout == "fine\n", result.stderr


def test_get_metrics_with_a_missing_multiproc_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(metrics_module, "_instance", None)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="^metrics: PROMETHEUS_MULTIPROC_DIR=.*nowhere.* is not a folder"):
        get_metrics(True)


def get(app: Any, path: str = "/metrics", **environ: str) -> tuple[str, dict[str, str], bytes]:
    from werkzeug.test import Client

    response = Client(app).get(path, environ_base=environ)
    return response.status, dict(response.headers), response.get_data()


def test_metrics_app_serves_a_registry(registry: CollectorRegistry, counted: PrometheusMetrics) -> None:
    counted.download_started()
    counted.download_ended("complete", 1234)
    status, headers, body = get(metrics_app(registry))
    assert status == "200 OK"
    assert headers["Content-Type"].startswith("text/plain")
    samples = scrape_text(body.decode())
    assert samples[(P + "bytes_sent_total", ())] == 1234
    assert samples[(P + "downloads_total", (("outcome", "complete"),))] == 1


def test_metrics_app_serves_the_default_registry(no_multiproc: None) -> None:
    get_metrics(True)
    status, _, body = get(metrics_app())
    assert status == "200 OK"
    assert P + "downloads_in_flight" in body.decode()


def test_metrics_app_with_a_broken_multiproc_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = metrics_app()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "gone"))
    with caplog.at_level(logging.ERROR, logger="zipmiddleware"):
        status, _, body = get(app)
    assert status.startswith("500")
    assert b"/" not in body.replace(b"see the server log", b"")  # no path in the answer
    assert "cannot collect" in caplog.text


def test_mark_process_dead(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_multiproc: None) -> None:
    (tmp_path / "gauge_livesum_4242.db").write_bytes(b"")
    (tmp_path / "counter_4242.db").write_bytes(b"")
    mark_process_dead(4242)  # not in multiprocess mode: nothing happens
    assert (tmp_path / "gauge_livesum_4242.db").exists()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    mark_process_dead(4242)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_4242.db"]  # the counts stay
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "gone"))
    mark_process_dead(4242)  # never raises


# -- multiprocess mode under gunicorn ------------------------------------------------------


def scrape_text(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(server: GunicornServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        return scrape_text(response.read().decode())


def fetch(server: GunicornServer, path: str) -> str:
    with urllib.request.urlopen(server.url + path, timeout=10) as response:
        return str(response.read().decode())


@dataclass
class Served:
    server: GunicornServer
    multiproc_dir: Path


@pytest.fixture(scope="module", params=["created-in-workers", "preloaded"])
def two_workers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """gunicorn with two sync workers (one request at a time each, so concurrent requests
    spread over both). "preloaded": the metrics are created in the master (``--preload``,
    as the middleware does when it is built), before the workers are forked."""
    multiproc_dir = tmp_path_factory.mktemp("prometheus-multiproc")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    args = ["--worker-class", "sync", "--workers", "2", "--config", str(TESTS / "metrics_app.py")]
    if request.param == "preloaded":
        env["ZM_TEST_METRICS_EARLY"] = "1"
        args.append("--preload")
    with GunicornServer(
        "tests.metrics_app:app", pythonpath=[PROJECT], env=env, threads=1, args=args
    ) as server:
        # Both workers must be up and accepting before the counted requests.
        deadline = time.monotonic() + 20
        seen: set[str] = set()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            while len(seen) < 2:
                assert time.monotonic() < deadline, f"only workers {seen} answered:\n{server.log()}"
                seen.update(pool.map(lambda _: fetch(server, "/pid?delay=0.2"), range(4)))
        yield Served(server, multiproc_dir)


@pytest.mark.server
def test_counts_of_two_workers_add_up(two_workers: Served) -> None:
    server, multiproc_dir = two_workers.server, two_workers.multiproc_dir
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        pids = list(pool.map(lambda _: fetch(server, "/work?delay=0.3"), range(10)))
    assert len(set(pids)) == 2, pids  # both workers counted some of the downloads
    # Every scrape (whichever worker answers it) adds up the files of both.
    for _ in range(4):
        samples = scrape(server)
        assert samples[(P + "downloads_total", (("outcome", "complete"),))] == 10
        assert samples[(P + "downloads_total", (("outcome", "aborted"),))] == 0
        assert samples[(P + "bytes_sent_total", ())] == 10000
        assert samples[(P + "downloads_in_flight", ())] == 0
        assert samples[(P + "time_to_first_byte_seconds_count", ())] == 10
        assert samples[(P + "time_to_first_byte_seconds_bucket", (("le", "0.01"),))] == 10
        assert samples[(P + "time_to_first_byte_seconds_bucket", (("le", "0.005"),))] == 0
    files = sorted(p.name for p in multiproc_dir.iterdir())
    assert {f"counter_{pid}.db" for pid in pids} <= set(files), files


@pytest.mark.server
def test_a_killed_workers_downloads_in_flight_are_forgotten(two_workers: Served) -> None:
    server, multiproc_dir = two_workers.server, two_workers.multiproc_dir
    before = scrape(server)
    connection = socket.create_connection((server.host, server.port), timeout=10)
    try:
        connection.sendall(b"GET /hang HTTP/1.0\r\nHost: test\r\n\r\n")
        received = b""
        while not (found := re.search(rb"pid=(\d+);", received)):
            chunk = connection.recv(4096)
            assert chunk, received
            received += chunk
        pid = int(found.group(1))
        # The hanging (sync) worker is busy: the other one answers and sees its download.
        assert scrape(server)[(P + "downloads_in_flight", ())] == 1
        assert (multiproc_dir / f"gauge_livesum_{pid}.db").exists()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (multiproc_dir / f"gauge_livesum_{pid}.db").exists():  # gunicorn's child_exit hook
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
    finally:
        connection.close()
    after = scrape(server)
    assert after[(P + "downloads_in_flight", ())] == 0
    # The dead worker's counts stay in the totals.
    for key, counted in before.items():
        if key[0].endswith(("_total", "_count", "_bucket", "_sum")):
            assert after[key] == counted, key


# -- through the middleware ----------------------------------------------------------------------


class FlakySource:
    """A restartable source whose first read fails after ``fail_at`` bytes."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        self.data, self.fail_at, self.size = data, fail_at, len(data)
        self.opened: list[int] = []

    def open(self, offset: int) -> Iterator[bytes]:
        self.opened.append(offset)
        first = len(self.opened) == 1

        def pieces() -> Iterator[bytes]:
            yield self.data[offset : self.fail_at] if first else self.data[offset:]
            if first:
                raise ConnectionResetError("dropped on purpose")

        return pieces()


def test_the_middleware_counts_downloads_entries_and_cache_lookups(games: Path, no_multiproc: None) -> None:
    """metrics = true, in process, with prometheus_client's default registry: what one folder
    download and one download with a retried source add to each series."""
    from prometheus_client import REGISTRY
    from werkzeug.test import Client

    from zipmiddleware import ZipEntry, ZipMiddleware, ZipTarget

    source = FlakySource(os.urandom(100_000), fail_at=30_000)

    def remote(request: object) -> ZipTarget:
        return ZipTarget([ZipEntry("flaky.bin", source=source)], "flaky.zip")

    app = ZipMiddleware(
        lambda environ, start_response: [],
        routes={
            "/games/<path:name>": lambda request, name: ZipTarget.from_directory(games / name),
            "/flaky.zip": remote,
        },
        roots=[games],
        metrics=True,
        retry_backoff=0,
        prefetch=0,  # read by the download itself: its first piece goes out before the failure
        crc_cache=":memory:",
    )

    def now(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    names = [
        ("zipmiddleware_downloads_total", {"outcome": "complete"}),
        ("zipmiddleware_bytes_sent_total", {}),
        ("zipmiddleware_time_to_first_byte_seconds_count", {}),
        ("zipmiddleware_entry_retries_total", {}),
        ("zipmiddleware_crc_cache_lookups_total", {"result": "miss"}),
        ("zipmiddleware_crc_cache_lookups_total", {"result": "hit"}),
        ("zipmiddleware_downloads_in_flight", {}),
    ]
    before = [now(name, **labels) for name, labels in names]
    sizes = []
    for path in ("/games/quake", "/games/quake", "/flaky.zip"):
        response = Client(app).get(path)
        sizes.append(len(response.get_data()))
        response.close()
    after = [now(name, **labels) for name, labels in names]
    added = [later - earlier for earlier, later in zip(before, after, strict=True)]
    # 3 downloads; the folder's 6 files missed the cache once, then hit it; one retry.
    assert added == [3, sum(sizes), 3, 1, 6, 6, 0]
    assert source.opened == [0, 30_000]


@pytest.mark.server
@pytest.mark.parametrize("multiprocess", [False, True], ids=["single-process-mode", "multiprocess-mode"])
def test_several_workers_without_multiprocess_mode_are_warned_about(
    tmp_path: Path, multiprocess: bool
) -> None:
    """metrics = true, 2 gunicorn workers: without PROMETHEUS_MULTIPROC_DIR each worker counts on
    its own, which the log says when the app is loaded."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    env = {
        "ZM_TEST_ORIGIN": "http://127.0.0.1:9",
        "ZM_TEST_MANIFEST": str(manifest),
        "ZM_TEST_SETTINGS": '{"metrics": true}',
    }
    if multiprocess:
        (tmp_path / "metrics").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    with GunicornServer(
        "tests.remote_app:app", pythonpath=[PROJECT], env=env, args=["--workers", "2", "--preload"]
    ) as server:
        log = server.log()
    warned = "PROMETHEUS_MULTIPROC_DIR is not set" in log
    assert warned != multiprocess, log
