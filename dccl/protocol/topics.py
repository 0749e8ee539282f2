"""MQTT topic layout: every topic of the protocol is built here, under one prefix.

    {prefix}/device/{device_id}/patch          device -> cloud  QoS 1  signed binary envelope
    {prefix}/device/{device_id}/heartbeat      device -> cloud  QoS 0  retained JSON
    {prefix}/device/{device_id}/availability   device -> cloud  QoS 1  retained online|offline|stopped
    {prefix}/device/{device_id}/report         device -> cloud  QoS 1  JSON (test / update reports)
    {prefix}/model/announce                    cloud -> device  QoS 1  retained JSON
    {prefix}/model/{version}/chunk/{f}/{c}     cloud -> device  QoS 1  retained raw bytes
    {prefix}/cmd/{device_id} , {prefix}/cmd/all cloud -> device QoS 1  JSON command

Devices write only under ``{prefix}/device/{own id}/`` and read only ``model/`` and ``cmd/``
(the Mosquitto ACL in deploy/mosquitto enforces it). docs/PROTOCOL.md is the reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
DEFAULT_PREFIX = "dccl"

QOS_PATCH = 1
QOS_HEARTBEAT = 0
QOS_AVAILABILITY = 1
QOS_REPORT = 1
QOS_MODEL = 1
QOS_COMMAND = 1

ONLINE, OFFLINE, STOPPED = "online", "offline", "stopped"


def check_id(value: str, what: str = "device id") -> str:
    """Device ids and bundle versions appear in topics: no '/', '+', '#', spaces."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"invalid {what} {value!r}: 1-64 chars of [A-Za-z0-9_.:-], starting alphanumeric")
    return value


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        p = self.prefix
        if not p or p.startswith("/") or p.endswith("/") or any(c in p for c in "+#\0") or p.startswith("$"):
            raise ValueError(f"invalid topic prefix {p!r}: no leading/trailing '/', no '+', '#', '$'")

    # device -> cloud
    def device(self, device_id: str, kind: str) -> str:
        return f"{self.prefix}/device/{check_id(device_id)}/{kind}"

    def patch(self, device_id: str) -> str:
        return self.device(device_id, "patch")

    def heartbeat(self, device_id: str) -> str:
        return self.device(device_id, "heartbeat")

    def availability(self, device_id: str) -> str:
        return self.device(device_id, "availability")

    def report(self, device_id: str) -> str:
        return self.device(device_id, "report")

    def all_devices(self, kind: str) -> str:
        """Filter over every device, e.g. ``all_devices("patch")`` -> ``dccl/device/+/patch``."""
        return f"{self.prefix}/device/+/{kind}"

    def shared(self, group: str, topic_filter: str) -> str:
        """MQTT 5 shared subscription: the broker splits the stream across the group."""
        check_id(group, "share group")
        return f"$share/{group}/{topic_filter}"

    def parse_device_topic(self, topic: str) -> tuple[str, str] | None:
        """``{prefix}/device/{id}/{kind}`` -> ``(id, kind)``; anything else -> None."""
        head = f"{self.prefix}/device/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) != 2 or not _ID.match(parts[0]):
            return None
        return parts[0], parts[1]

    # cloud -> device
    def model_announce(self) -> str:
        return f"{self.prefix}/model/announce"

    def model_chunk(self, version: str, file_index: int, chunk_index: int) -> str:
        return f"{self.prefix}/model/{check_id(version, 'bundle version')}/chunk/{int(file_index)}/{int(chunk_index)}"

    def model_chunks(self, version: str) -> str:
        return f"{self.prefix}/model/{check_id(version, 'bundle version')}/chunk/#"

    def command(self, device_id: str) -> str:
        return f"{self.prefix}/cmd/{check_id(device_id)}"

    def command_all(self) -> str:
        return f"{self.prefix}/cmd/all"
