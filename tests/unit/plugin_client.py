"""The engine's side of the plugin socket in memory: requests written as Go's
net/http writes them to the real `ovsdriver.plugin_http` protocol, and its
answers parsed back."""

from twisted.internet.testing import StringTransport

from ovsdriver.plugin_http import PluginFactory


def request(method, body=b"", extra=b""):
    """A request as the engine sends it (no Content-Type; see remote-api.md)."""
    return (
        b"POST /%s HTTP/1.1\r\nHost: plugin\r\nUser-Agent: Go-http-client/1.1\r\n"
        b"Content-Length: %d\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n"
        b"%sAccept-Encoding: gzip\r\n\r\n%s"
    ) % (method.encode(), len(body), extra, body)


class Connection:
    """One connection to the protocol serving `plugin`."""

    def __init__(self, plugin):
        self.transport = StringTransport()
        self.protocol = PluginFactory(plugin).buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self._read = 0

    def send(self, data):
        self.protocol.dataReceived(data)

    def answers(self):
        """The answers written since the last call: (status, headers, body)."""
        data, answers = self.transport.value(), []
        while True:
            head_end = data.find(b"\r\n\r\n", self._read)
            if head_end < 0:
                return answers
            status_line, *lines = data[self._read : head_end].decode().split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines)
            end = head_end + 4 + int(headers["Content-Length"])
            if len(data) < end:
                return answers
            answers.append((int(status_line.split()[1]), headers, data[head_end + 4 : end]))
            self._read = end

    @property
    def closed(self):
        return self.transport.disconnecting
