"""Firecracker's API paths and methods, each to its body schema and controller call.

Answers are Firecracker's: 200 with a JSON body for GETs, 204 for accepted changes,
400 with ``{"fault_message": ...}`` for anything refused (an unknown path or method
included).  Every request is counted in the metrics groups Firecracker uses
(``get_api_requests``, ``put_api_requests``, ``patch_api_requests``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from dksm.api.controller import ApiError, VmmController
from dksm.error import DksmError
from dksm.vmm import schema
from dksm.vmm.config import parse_json


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any] | None = None


NO_CONTENT = Answer(204)


def fault(message: str, status: int = 400) -> Answer:
    return Answer(status, {"fault_message": message})


Handler = Callable[[VmmController, Any, str], Answer | dict[str, Any] | None]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    metric: str  # the counter's stem in the method's metrics group
    body: type[BaseModel] | None  # the schema of the body; None: no body taken
    handler: Handler


ROUTES: list[Route] = []


def route(
    method: str, path: str, metric: str, body: type[BaseModel] | None = None
) -> Callable[[Handler], Handler]:
    # "{id}" matches one path segment, passed to the handler.
    pattern = re.compile("^" + re.sub(r"\{\w+\}", r"([^/]+)", path) + "$")

    def register(handler: Handler) -> Handler:
        ROUTES.append(Route(method, pattern, metric, body, handler))
        return handler

    return register


# -- GET ----------------------------------------------------------------------------


@route("GET", "/", "instance_info")
def _describe(c: VmmController, body: Any, ident: str) -> dict[str, Any]:
    return c.instance_info()


@route("GET", "/version", "vmm_version")
def _version(c: VmmController, body: Any, ident: str) -> dict[str, Any]:
    return c.version()


@route("GET", "/machine-config", "machine_cfg")
def _get_machine(c: VmmController, body: Any, ident: str) -> dict[str, Any]:
    return c.machine_config()


@route("GET", "/vm/config", "vm_config")
def _get_config(c: VmmController, body: Any, ident: str) -> dict[str, Any]:
    return c.full_config()


@route("GET", "/dksm", "dksm")
def _get_dksm(c: VmmController, body: Any, ident: str) -> dict[str, Any]:
    return c.dksm_settings()


# -- PUT / PATCH of what dksm has --------------------------------------------------------


@route("PUT", "/boot-source", "boot_source", schema.BootSource)
def _boot(c: VmmController, body: Any, ident: str) -> None:
    c.put_boot_source(body)


@route("PUT", "/machine-config", "machine_cfg", schema.MachineConfiguration)
def _machine(c: VmmController, body: Any, ident: str) -> None:
    c.put_machine_config(body)


@route("PATCH", "/machine-config", "machine_cfg", schema.MachineConfigurationUpdate)
def _patch_machine(c: VmmController, body: Any, ident: str) -> None:
    c.patch_machine_config(body)


@route("PUT", "/actions", "actions", schema.InstanceActionInfo)
def _actions(c: VmmController, body: Any, ident: str) -> None:
    c.action(body)


@route("PATCH", "/vm", "vm", schema.VmState)
def _vm(c: VmmController, body: Any, ident: str) -> None:
    c.patch_vm(body)


@route("PUT", "/logger", "logger", schema.Logger)
def _logger(c: VmmController, body: Any, ident: str) -> None:
    c.put_logger(body)


@route("PUT", "/metrics", "metrics", schema.Metrics)
def _metrics(c: VmmController, body: Any, ident: str) -> None:
    c.put_metrics(body)


@route("PUT", "/serial", "serial", schema.SerialDevice)
def _serial(c: VmmController, body: Any, ident: str) -> None:
    c.put_serial(body)


@route("PUT", "/dksm", "dksm", schema.DksmSettings)
def _dksm(c: VmmController, body: Any, ident: str) -> None:
    c.put_dksm(body)


# -- devices dksm does not have yet: validated, then refused by name ---------------


def _same_id(path_id: str, body_id: str) -> None:
    if path_id != body_id:
        raise ApiError("The id from the path does not match the id from the body!")


@route("PUT", "/drives/{id}", "drive", schema.Drive)
def _drive(c: VmmController, body: Any, ident: str) -> None:
    _same_id(ident, body.drive_id)
    c.refuse_device("drives")


@route("PATCH", "/drives/{id}", "drive", schema.PartialDrive)
def _patch_drive(c: VmmController, body: Any, ident: str) -> None:
    _same_id(ident, body.drive_id)
    raise ApiError(f"drives: {schema.UNSUPPORTED_SECTIONS['drives']}")


@route("PUT", "/network-interfaces/{id}", "network", schema.NetworkInterface)
def _network(c: VmmController, body: Any, ident: str) -> None:
    _same_id(ident, body.iface_id)
    c.refuse_device("network-interfaces")


@route("PATCH", "/network-interfaces/{id}", "network", schema.PartialNetworkInterface)
def _patch_network(c: VmmController, body: Any, ident: str) -> None:
    _same_id(ident, body.iface_id)
    raise ApiError(f"network-interfaces: {schema.UNSUPPORTED_SECTIONS['network-interfaces']}")


@route("PUT", "/vsock", "vsock", schema.Vsock)
def _vsock(c: VmmController, body: Any, ident: str) -> None:
    c.refuse_device("vsock")


@route("PUT", "/entropy", "entropy", schema.EntropyDevice)
def _entropy(c: VmmController, body: Any, ident: str) -> None:
    c.refuse_device("entropy")


@route("PUT", "/pmem/{id}", "pmem", schema.Pmem)
def _pmem(c: VmmController, body: Any, ident: str) -> None:
    c.refuse_device("pmem")


@route("PUT", "/hotplug/memory", "hotplug_memory", schema.MemoryHotplugConfig)
def _hotplug(c: VmmController, body: Any, ident: str) -> None:
    c.refuse_device("memory-hotplug")


@route("PUT", "/cpu-config", "cpu_cfg", schema.CpuConfig)
def _cpu_config(c: VmmController, body: Any, ident: str) -> None:
    c.refuse_device("cpu-config")


@route("PUT", "/mmds/config", "mmds", schema.MmdsConfig)
def _mmds_config(c: VmmController, body: Any, ident: str) -> None:
    c.refuse_device("mmds-config")


@route("PUT", "/balloon", "balloon", schema.Balloon)
def _balloon(c: VmmController, body: Any, ident: str) -> None:
    c.refuse_device("balloon")


# Paths of features dksm does not implement at all, answered 400 naming the feature.
UNIMPLEMENTED = {
    "/balloon": "balloon devices are not supported",
    "/balloon/statistics": "balloon devices are not supported",
    "/balloon/hinting/start": "balloon devices are not supported",
    "/balloon/hinting/stop": "balloon devices are not supported",
    "/balloon/hinting/status": "balloon devices are not supported",
    "/mmds": "the microVM metadata service (MMDS) is not supported",
    "/snapshot/create": "snapshots are not supported",
    "/snapshot/load": "snapshots are not supported",
    "/hotplug/memory": "memory hotplug (virtio-mem) is not supported",
}

METRIC_GROUPS = {
    "GET": "get_api_requests",
    "PUT": "put_api_requests",
    "PATCH": "patch_api_requests",
}


def dispatch(controller: VmmController, method: str, path: str, body: bytes) -> Answer:
    """Answer one request; never raises for anything a client can send."""
    path = path.split("?", 1)[0]
    for candidate in ROUTES:
        if candidate.method != method:
            continue
        matched = candidate.pattern.match(path)
        if matched is None:
            continue
        group = METRIC_GROUPS[method]
        controller.metrics.counters.add(group, f"{candidate.metric}_count")
        answer = _call(controller, candidate, matched.groups(), body)
        if answer.status >= 400:
            controller.metrics.counters.add(group, f"{candidate.metric}_fails")
        return answer
    if path in UNIMPLEMENTED:
        return fault(f"{path}: {UNIMPLEMENTED[path]}")
    return fault(f"Invalid request method and/or path: {method} {path}.")


def _call(controller: VmmController, target: Route, groups: tuple[str, ...], body: bytes) -> Answer:
    parsed: Any = None
    if target.body is None:
        if body.strip():
            return fault(f"{target.method} request cannot have a body.")
    else:
        if not body.strip():
            return fault(f"Empty {target.method} request.")
        try:
            text = body.decode()
            parsed = target.body.model_validate(parse_json(text, "request body"))
        except UnicodeDecodeError:
            return fault("request body is not UTF-8 text")
        except ValidationError as exc:
            return fault("; ".join(schema.problems(exc)))
        except DksmError as exc:
            return fault(str(exc))
    try:
        result = target.handler(controller, parsed, groups[0] if groups else "")
    except DksmError as exc:  # ApiError, and the pool's or builder's refusals
        return fault(str(exc))
    if isinstance(result, Answer):
        return result
    if result is None:
        return NO_CONTENT
    return Answer(200, result)
