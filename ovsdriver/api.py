"""The libnetwork remote API: JSON in, JSON out.

Each method is a plain coroutine of the request's fields. This module checks the
body's shape and field types (a 400 names the offending field), maps every
failure to ``{"Err": "<sentence>"}``, and answers unknown paths with 404 as the
engine expects. No traceback ever reaches the engine.
"""

import json

from twisted.internet import defer
from twisted.logger import Logger

from ovsdriver.driver import DriverError
from ovsdriver.firewall import FirewallError
from ovsdriver.ipam import Ipam
from ovsdriver.metrics import NO_METRICS
from ovsdriver.netlink import LinkError
from ovsdriver.northbound import NorthboundError
from ovsdriver.options import check_endpoint_options
from ovsdriver.ovsdb import OVSDBUnavailable
from ovsdriver.values import InvalidValue
from ovsdriver.vswitch import VSwitchError

log = Logger()

MAX_BODY = 1024 * 1024
#: Failures whose message is a sentence for the user; anything else is a bug.
USER_ERRORS = (
    DriverError,
    FirewallError,
    InvalidValue,
    LinkError,
    NorthboundError,
    OVSDBUnavailable,
    VSwitchError,
)

# Each method: the Handlers coroutine that serves it, and the fields it reads
# (name -> (type, required)).
_IDS = {"NetworkID": (str, True), "EndpointID": (str, True)}
METHODS = {
    "Plugin.Activate": ("activate", {}),
    "NetworkDriver.GetCapabilities": ("capabilities", {}),
    "NetworkDriver.CreateNetwork": (
        "create_network",
        {
            "NetworkID": (str, True),
            "Options": (dict, False),
            "IPv4Data": (list, False),
            "IPv6Data": (list, False),
        },
    ),
    "NetworkDriver.DeleteNetwork": ("delete_network", {"NetworkID": (str, True)}),
    "NetworkDriver.CreateEndpoint": (
        "create_endpoint",
        dict(_IDS, Interface=(dict, False), Options=(dict, False)),
    ),
    "NetworkDriver.DeleteEndpoint": ("delete_endpoint", _IDS),
    "NetworkDriver.EndpointOperInfo": ("endpoint_info", _IDS),
    "NetworkDriver.Join": ("join", dict(_IDS, SandboxKey=(str, True), Options=(dict, False))),
    "NetworkDriver.Leave": ("leave", _IDS),
    "NetworkDriver.ProgramExternalConnectivity": (
        "program_external",
        dict(_IDS, Options=(dict, False)),
    ),
    "NetworkDriver.RevokeExternalConnectivity": ("revoke_external", _IDS),
    "NetworkDriver.DiscoverNew": ("nothing", {}),
    "NetworkDriver.DiscoverDelete": ("nothing", {}),
    "NetworkDriver.AllocateNetwork": ("allocate_network", {}),
    "NetworkDriver.FreeNetwork": ("nothing", {}),
    # The IPAM driver of OVN networks (ovsdriver.ipam); its errors are {"Error": ...}.
    "IpamDriver.GetCapabilities": ("ipam_capabilities", {}),
    "IpamDriver.GetDefaultAddressSpaces": ("ipam_spaces", {}),
    "IpamDriver.RequestPool": (
        "request_pool",
        {
            "AddressSpace": (str, False),
            "Pool": (str, False),
            "SubPool": (str, False),
            "Options": (dict, False),
            "V6": (bool, False),
        },
    ),
    "IpamDriver.ReleasePool": ("release_pool", {"PoolID": (str, True)}),
    "IpamDriver.RequestAddress": (
        "request_address",
        {"PoolID": (str, True), "Address": (str, False), "Options": (dict, False)},
    ),
    "IpamDriver.ReleaseAddress": (
        "release_address",
        {"PoolID": (str, True), "Address": (str, True)},
    ),
}
_INTERFACE_FIELDS = ("Address", "AddressIPv6", "MacAddress")


class BadRequest(Exception):
    """The request cannot be parsed; answered with 400."""


def parse_body(method, raw):
    """The request body as a dict with correctly typed fields, or BadRequest."""
    fields = METHODS[method][1]
    if not raw.strip():
        if any(required for _, required in fields.values()):
            raise BadRequest(
                f"{method} needs a JSON object body, got an empty body (the engine "
                "retries a request whose answer it lost, a restarting driver's, "
                "without its body: run the command again)"
            )
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body of {method} is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body of {method} must be a JSON object")
    for name, (kind, required) in fields.items():
        value = body.get(name)
        if value is None:
            if required:
                raise BadRequest(f"{method} needs the field {name}")
            continue
        if not isinstance(value, kind):
            raise BadRequest(f"{method}: field {name} must be a {_json_type(kind)}")
    interface = body.get("Interface") if "Interface" in fields else None
    for name in _INTERFACE_FIELDS:
        value = (interface or {}).get(name)
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{method}: field Interface.{name} must be a string")
    return body


def _json_type(kind):
    return {str: "string", dict: "JSON object", list: "JSON array", bool: "boolean"}[kind]


class Handlers:
    """The API methods, each a coroutine from a parsed body to a response."""

    def __init__(self, driver, ipam=None):
        self.driver = driver
        self.ipam = ipam if ipam is not None else Ipam(None, None)

    async def activate(self, body):
        return {"Implements": ["NetworkDriver", "IpamDriver"]}

    async def capabilities(self, body):
        return {"Scope": "local", "ConnectivityScope": "local"}

    async def create_network(self, body):
        await self.driver.create_network(
            body["NetworkID"], body.get("Options"), body.get("IPv4Data"), body.get("IPv6Data")
        )
        return {}

    async def delete_network(self, body):
        await self.driver.delete_network(body["NetworkID"])
        return {}

    async def create_endpoint(self, body):
        check_endpoint_options(body.get("Options"))
        reply = await self.driver.create_endpoint(
            body["NetworkID"], body["EndpointID"], body.get("Interface") or {}
        )
        return {"Interface": reply} if reply else {}

    async def delete_endpoint(self, body):
        await self.driver.delete_endpoint(body["NetworkID"], body["EndpointID"])
        return {}

    async def endpoint_info(self, body):
        value = await self.driver.endpoint_info(body["NetworkID"], body["EndpointID"])
        return {"Value": value}

    async def join(self, body):
        return await self.driver.join(body["NetworkID"], body["EndpointID"], body["SandboxKey"])

    async def leave(self, body):
        await self.driver.leave(body["NetworkID"], body["EndpointID"])
        return {}

    async def program_external(self, body):
        await self.driver.program_external_connectivity(
            body["NetworkID"], body["EndpointID"], body.get("Options")
        )
        return {}

    async def revoke_external(self, body):
        await self.driver.revoke_external_connectivity(body["NetworkID"], body["EndpointID"])
        return {}

    async def nothing(self, body):
        return {}

    async def allocate_network(self, body):
        return {"Options": {}}

    async def ipam_capabilities(self, body):
        return self.ipam.capabilities()

    async def ipam_spaces(self, body):
        return self.ipam.address_spaces()

    async def request_pool(self, body):
        return await self.ipam.request_pool(
            body.get("AddressSpace"),
            body.get("Pool"),
            body.get("SubPool"),
            body.get("Options"),
            bool(body.get("V6")),
        )

    async def release_pool(self, body):
        await self.ipam.release_pool(body["PoolID"])
        return {}

    async def request_address(self, body):
        address = await self.ipam.request_address(
            body["PoolID"], body.get("Address"), body.get("Options")
        )
        return {"Address": address, "Data": {}}

    async def release_address(self, body):
        await self.ipam.release_address(body["PoolID"], body["Address"])
        return {}

    def route(self, method):
        """The coroutine serving `method`, or None for an unknown one."""
        entry = METHODS.get(method)
        return getattr(self, entry[0]) if entry else None


class Plugin:
    """The API as the plugin socket serves it (`ovsdriver.plugin_http`): a
    method's name and raw body in, an HTTP status and a JSON object out."""

    metrics = NO_METRICS

    def __init__(self, handlers):
        self.handlers = handlers

    def call(self, method, raw):
        """Deferred (status, reply): never fails."""
        handler = self.handlers.route(method)
        if handler is None:
            self.metrics.api_rejected("unknown", "unknown_method")
            return defer.succeed((404, {"Err": f"unknown method {method[:100]!r}"}))
        try:
            body = parse_body(method, raw)
        except BadRequest as e:
            self.metrics.api_rejected(method, "bad_request")
            return defer.succeed((400, {"Err": str(e)}))
        d = defer.ensureDeferred(handler(body))
        self.metrics.api_request(method, d, USER_ERRORS)
        d.addErrback(_error_response, method)
        d.addCallback(lambda reply: (200, reply))
        return d

    def too_large(self, method):
        """The answer to a body longer than `MAX_BODY` (never read)."""
        self.metrics.api_rejected(method, "too_large")
        return 413, {"Err": f"request body is larger than {MAX_BODY} bytes"}


def _error_response(failure, method):
    # The IPAM API reads {"Error": ...}; with "Err" the engine hides the message.
    key = "Error" if method.startswith("IpamDriver.") else "Err"
    if failure.check(*USER_ERRORS):
        log.info("{method} failed: {error}", method=method, error=failure.getErrorMessage())
        return {key: failure.getErrorMessage()}
    log.failure("{method} failed unexpectedly", failure, method=method)
    return {key: f"internal error in the ovs driver during {method}: {failure.getErrorMessage()}"}
