"""A remote network driver that does nothing: the floor of any remote driver.

    python -m benchmarks.null_driver SOCKET_PATH [TRACE_FILE]

It answers the engine's calls at once from one thread (a bare HTTP/1.1 loop,
no framework) and hands out one end of veth pairs it made before the benchmark
started, so that ``docker_run.py`` can show what the engine itself spends on a
remote driver's calls (CreateEndpoint, Join, ProgramExternalConnectivity,
EndpointOperInfo...) next to the bridge driver's function calls. With
TRACE_FILE it appends a line per call there, as ``benchmarks/trace.py`` does.
Not a driver for anything else: its containers have an address and no
connectivity.
"""

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

POOL = 64  # links made up front: more than the containers a benchmark holds at once


def make(name):
    """A veth pair (the kernel here may lack dummy links): `name` and its peer."""
    peer = ["peer", "name", name + "p"]
    subprocess.run(["ip", "link", "add", name, "type", "veth", *peer], check=True)


class NullDriver:
    def __init__(self):
        self.free = [f"nul{os.getpid() % 10000}-{i}" for i in range(POOL)]
        for name in self.free:
            make(name)
        self.taken = {}  # endpoint id -> link
        self.gateways = {}  # network id -> gateway address

    def close(self):
        for name in self.free + list(self.taken.values()):
            subprocess.run(["ip", "link", "del", name], stderr=subprocess.DEVNULL, check=False)

    def answer(self, method, body):
        if method == "Plugin.Activate":
            return {"Implements": ["NetworkDriver"]}
        if method == "NetworkDriver.GetCapabilities":
            return {"Scope": "local", "ConnectivityScope": "local"}
        if method == "NetworkDriver.CreateNetwork":
            data = body.get("IPv4Data") or [{}]
            self.gateways[body["NetworkID"]] = data[0].get("Gateway", "").split("/")[0]
        elif method == "NetworkDriver.CreateEndpoint":
            self.taken[body["EndpointID"]] = self.free.pop()
        elif method == "NetworkDriver.Join":
            answer = {
                "InterfaceName": {"SrcName": self.taken[body["EndpointID"]], "DstPrefix": "eth"}
            }
            gateway = self.gateways.get(body["NetworkID"])
            if gateway:
                answer["Gateway"] = gateway
            return answer
        elif method == "NetworkDriver.EndpointOperInfo":
            return {"Value": {}}
        elif method == "NetworkDriver.DeleteEndpoint":
            # The engine moved the link back here, under its name (or it went
            # with a namespace the engine deleted first: make it again).
            name = self.taken.pop(body["EndpointID"])
            try:
                socket.if_nametoindex(name)
            except OSError:
                make(name)
            self.free.append(name)
        return {}


def serve(path, driver, trace=None):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    buffers = {}
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                buffers[conn] = b""
                selector.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            data = conn.recv(65536)
            if not data:
                selector.unregister(conn)
                conn.close()
                del buffers[conn]
                continue
            buffers[conn] += data
            while b"\r\n\r\n" in buffers[conn]:
                head, _, rest = buffers[conn].partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.lower().partition(":")[::2] for line in lines[1:])
                length = int(headers.get("content-length", 0))
                if len(rest) < length:
                    break
                body, buffers[conn] = rest[:length], rest[length:]
                method = lines[0].split()[1].lstrip("/")
                started = time.time()
                try:
                    answer = driver.answer(method, json.loads(body or b"{}"))
                except Exception as e:  # say it to the engine, keep serving
                    answer = {"Err": f"null driver: {method}: {e!r}"}
                reply = json.dumps(answer).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.plugins.v1.2+json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply)
                )
                if trace:
                    record = {"t": started, "what": "api " + method}
                    record["ms"] = (time.time() - started) * 1000
                    trace.write(json.dumps(record) + "\n")


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up on terminate()
    driver = NullDriver()
    try:
        trace = open(sys.argv[2], "a", buffering=1) if len(sys.argv) > 2 else None  # noqa: SIM115
        serve(sys.argv[1], driver, trace)
    finally:
        driver.close()
        os.unlink(sys.argv[1])


if __name__ == "__main__":
    main()
