# -*- test-case-name: timtx.test.test_quickstart -*-
"""
The code a newcomer copies runs: the README's five lines (twice in a row,
as someone trying it would) and docs/quickstart.md's script, against a
node on a port of the OS's choosing.
"""

import contextlib
import io
import re

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, inlineCallbacks

from timtx.test.base import NodeTestCase
from timtx.testing import requireOrSkip, sourceRoot


def codeBlock(path, after):
    """
    The first python block after C{after} in the file at C{path} below the
    source root, or C{None} without a source checkout.
    """
    root = sourceRoot()
    if root is None:
        return None
    text = root.preauthChild(path).getContent().decode("utf-8")
    start = text.index(after)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    return match.group(1)


class QuickstartTests(NodeTestCase):
    def load(self, code, node):
        """
        The script's C{main}, pointed at C{node}'s port.
        """
        port = node.listeningAddress("client-ws").port
        code = code.replace("127.0.0.1:5120", f"127.0.0.1:{port}")
        code = re.sub(r"\ntask\.react\(.*\)\n?$", "\n", code)
        namespace = {"__name__": "example"}
        exec(compile(code, "example", "exec"), namespace)
        return namespace["main"]

    @inlineCallbacks
    def runMain(self, main):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            yield ensureDeferred(main(reactor))
        return out.getvalue()

    @inlineCallbacks
    def test_readme(self):
        """
        The README's example logs in, and runs again as is.
        """
        code = codeBlock("README.md", "## Five lines of client")
        if code is None:
            requireOrSkip("no source checkout (README.md is not installed)")
        node = yield self.node()
        main = self.load(code, node)
        first = yield self.runMain(main)
        second = yield self.runMain(main)
        for out in (first, second):
            self.assertIn("TimAck(ok=True, timType=16", out)

    @inlineCallbacks
    def test_quickstart(self):
        """
        docs/quickstart.md's script prints what the page says, twice.
        """
        code = codeBlock("docs/quickstart.md", "<!-- example: quickstart -->")
        if code is None:
            requireOrSkip("no source checkout (docs/ is not installed)")
        node = yield self.node()
        main = self.load(code, node)
        first = yield self.runMain(main)
        self.assertIn("seq 1\n", first)
        self.assertIn("bob got: hello bob from alice\n", first)
        self.assertIn("bob missed: ['are you there?']\n", first)
        self.assertIn("history: ['are you there?', 'hello bob']\n", first)
        second = yield self.runMain(main)
        self.assertIn("seq 3\n", second)
        self.assertIn("bob missed: ['are you there?']\n", second)
