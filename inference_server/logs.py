"""loguru setup: pretty or JSON lines, stdout or a rotated file, stdlib logging routed in.

Logging must not block the event loop: sinks are ``enqueue=True``, so the request path only
formats the record and puts it on a queue; a loguru thread does the write.  JSON lines are flat
objects with stable field names (time, level, message, request_id, logger, plus bound extras).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import orjson
from loguru import logger

from inference_server.settings import LoggingSettings

if TYPE_CHECKING:
    from loguru import Record

_PRETTY = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
    "<cyan>{extra[request_id]}</cyan> | <level>{message}</level>{extra[_kv]}"
)
_RESERVED = {"request_id", "_kv", "_json"}


class InterceptHandler(logging.Handler):
    """Sends stdlib ``logging`` records (aiohttp, asyncio, libraries) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).bind(logger_name=record.name).log(
            level, record.getMessage()
        )


def _patch(record: Record) -> None:
    extra = record["extra"]
    extra.setdefault("request_id", "-")
    fields = {k: v for k, v in extra.items() if k not in _RESERVED}
    extra["_kv"] = "".join(f" {k}={v}" for k, v in fields.items()) if fields else ""


def _json_format(record: Record) -> str:
    extra = record["extra"]
    obj: dict[str, Any] = {
        "time": record["time"].isoformat(),
        "level": record["level"].name.lower(),
        "message": record["message"],
        "request_id": extra.get("request_id", "-"),
        "logger": extra.get("logger_name", record["name"]),
    }
    for key, value in extra.items():
        if key not in _RESERVED and key != "logger_name":
            obj[key] = value
    if record["exception"] is not None:
        obj["exception"] = "".join(__import__("traceback").format_exception(*record["exception"]))
    extra["_json"] = orjson.dumps(obj, default=str).decode()
    return "{extra[_json]}\n"


def setup_logging(settings: LoggingSettings) -> None:
    """Replace every loguru sink with the configured one and route stdlib logging into it."""
    logger.remove()
    logger.configure(patcher=_patch, extra={"request_id": "-"})
    level = settings.level.upper()
    fmt: Any = _json_format if settings.format == "json" else _PRETTY
    if settings.output == "file":
        logger.add(
            settings.file.path,
            level=level,
            format=fmt,
            rotation=settings.file.rotation,
            retention=settings.file.retention,
            enqueue=True,
            colorize=False,
        )
    else:
        logger.add(
            sys.stdout,
            level=level,
            format=fmt,
            enqueue=True,
            colorize=settings.format == "pretty" and sys.stdout.isatty(),
        )
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)
    # aiohttp's own access log would duplicate ours (which carries model and provider).
    logging.getLogger("aiohttp.access").disabled = True


async def complete() -> None:
    """Wait until queued log lines are written (at shutdown)."""
    await logger.complete()
