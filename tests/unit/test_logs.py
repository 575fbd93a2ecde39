"""One log format per process: library records (stdlib logging) are rendered by the
same structlog processors as our own events."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from bluemarble.runtime import logs


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("restore_logging")
class TestLibraryLogsGoThroughStructlog:
    def test_json_mode_renders_a_stdlib_record_like_our_own_events(self) -> None:
        out = io.StringIO()
        logs.configure("info", "json", stream=out)
        logging.getLogger("etcd3aio").warning("watch on %s broke", "/bluemarble/x/nodes/")
        structlog.get_logger("bluemarble.test").warning("ours", n=1)
        library, ours = lines(out)
        assert library["event"] == "watch on /bluemarble/x/nodes/ broke"
        assert (library["level"], library["logger"]) == ("warning", "etcd3aio")
        assert ours["event"] == "ours" and ours["level"] == "warning"
        assert set(library) >= {"event", "level", "timestamp", "logger"}
        assert {"event", "level", "timestamp"} <= set(ours)

    def test_exceptions_and_request_context_are_rendered(self) -> None:
        out = io.StringIO()
        logs.configure("info", "json", stream=out)
        structlog.contextvars.bind_contextvars(rpc="Heartbeat")
        try:
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logging.getLogger("grpc._cython.cygrpc").exception("Unexpected error")
        finally:
            structlog.contextvars.clear_contextvars()
        (record,) = lines(out)
        assert record["rpc"] == "Heartbeat"
        assert "RuntimeError: boom" in str(record["exception"])

    def test_a_late_answer_to_a_call_that_ended_is_not_an_error(self) -> None:
        """grpc.aio logs an error with a traceback when a method answers a call whose
        deadline already passed; other grpc errors still show, and at debug level so does
        this one."""
        out = io.StringIO()
        logs.configure("info", "json", stream=out)
        grpc_aio = logging.getLogger("grpc._cython.cygrpc")
        grpc_aio.error("ExecuteBatchError raised in core by servicer method [%s]", "/bluemarble.v1.ControlPlane/X")
        grpc_aio.error("Unexpected [%s] raised by servicer method [%s]", "KeyError", "/x")
        (record,) = lines(out)
        assert "Unexpected [KeyError]" in str(record["event"])
        debug = io.StringIO()
        logs.configure("debug", "json", stream=debug)
        grpc_aio.error("ExecuteBatchError raised in core by servicer method [%s]", "/x")
        assert "ExecuteBatchError" in debug.getvalue()

    def test_library_info_is_quiet_and_console_mode_is_one_line(self) -> None:
        out = io.StringIO()
        logs.configure("info", "console", stream=out)
        logging.getLogger("asyncio").info("noise")
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        (line,) = out.getvalue().splitlines()
        assert "[error" in line and "Task exception was never retrieved" in line and "asyncio" in line

    def test_configuring_again_replaces_the_handler(self) -> None:
        first, second = io.StringIO(), io.StringIO()
        logs.configure("info", "json", stream=first)
        logs.configure("info", "json", stream=second)
        logging.getLogger("etcd3aio").error("once")
        assert first.getvalue() == ""
        assert len(lines(second)) == 1
