# -*- test-case-name: timtx.test.test_dashboard_browser -*-
"""
The dashboard in a real browser: Debian's C{chromium} driven by Playwright
(C{playwright-core} from npm, which never downloads a browser of its own).
The page must load, log in, show this node, and show its numbers moving
while clients send messages.

Needs C{chromium}, C{node} and C{playwright-core} (found through
C{NODE_PATH}, which C{.ci/run} sets after installing it); without them the
test skips and says what is missing, except under C{TIMTX_CI=1}, where it
fails.  C{TIMTX_DASHBOARD_SCREENSHOT=path} keeps the screenshot it takes
(how the one in C{docs/monitoring.md} was made).
"""

import json
import os
import shutil
import subprocess

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall

from timtx.admin.status import nodeIdOf
from timtx.protocols.constants import Business
from timtx.protocols.structs import Tid
from timtx.test.admintools import ROOT_PASSWORD, AdminTestCase
from timtx.testing import requireOrSkip

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

#: The browser's part, in CommonJS so that NODE_PATH finds playwright-core.
SCRIPT = r"""
const { chromium } = require("playwright-core");

async function main() {
  const [url, name, password, userDataDir, screenshot, executable, flags, settle] = process.argv.slice(2);
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: executable,
    headless: true,
    args: JSON.parse(flags),
    viewport: { width: 1360, height: 800 },
  });
  const result = { errors: [] };
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.on("pageerror", (error) => result.errors.push(String(error)));
    page.on("console", (message) => {
      // The wrong password below is answered 401, on purpose.
      if (message.type() === "error" && !message.text().includes("401")) result.errors.push(message.text());
    });
    page.on("request", (request) => {
      if (!request.url().startsWith(url)) result.errors.push("request elsewhere: " + request.url());
    });
    await page.goto(url + "/", { waitUntil: "load" });
    await page.waitForSelector("#login-form", { state: "visible", timeout: 10000 });
    result.loginShown = true;
    await page.fill("#name", name);
    await page.fill("#password", "wrong password");
    await page.click("#login-button");
    await page.waitForFunction(() => document.getElementById("login-error").textContent.length > 0, null, { timeout: 10000 });
    result.wrongPassword = await page.textContent("#login-error");
    await page.fill("#password", password);
    await page.click("#login-button");
    await page.waitForSelector("#dashboard", { state: "visible", timeout: 10000 });
    await page.waitForFunction(() => document.getElementById("node-id").textContent.length > 0, null, { timeout: 10000 });
    result.nodeId = await page.textContent("#node-id");
    const total = async () => Number((await page.textContent("#messages-total")).replace(/,/g, "")) || 0;
    result.firstTotal = await total();
    await page.waitForFunction(
      (first) => Number(document.getElementById("messages-total").textContent.replace(/,/g, "")) >= first + 20,
      result.firstTotal,
      { timeout: 20000 }
    );
    await page.waitForFunction(() => parseFloat(document.getElementById("messages-rate").textContent) > 0, null, { timeout: 10000 });
    await page.waitForFunction(() => document.getElementById("fanout-p99").textContent !== "-", null, { timeout: 10000 });
    // Some history for the charts, then the picture.
    await page.waitForTimeout(Number(settle) * 1000);
    result.lastTotal = await total();
    result.rate = await page.textContent("#messages-rate");
    result.sessions = await page.textContent("#sessions");
    result.members = await page.textContent("#members");
    result.fanout = await page.textContent("#fanout-p99");
    result.vrooms = await page.textContent("#vrooms");
    await page.screenshot({ path: screenshot, fullPage: true });
  } finally {
    await context.close();
  }
  console.log(JSON.stringify(result));
}

main().catch((error) => {
  console.error(String(error && error.stack || error));
  process.exit(1);
});
"""


class _Run(ProcessProtocol):
    def __init__(self):
        self.out = []
        self.err = []
        self.ended = Deferred()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


def findBrowser():
    """
    The chromium executable, node, and an environment whose NODE_PATH
    finds playwright-core; or a reason why not.
    """
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if chromium is None:
        return None, "Debian's chromium is not installed (apt-get install chromium)"
    node = shutil.which("node")
    if node is None:
        return None, "node is not installed (apt-get install nodejs)"
    env = dict(os.environ)
    probe = subprocess.run(
        [node, "-e", "require.resolve('playwright-core')"], env=env, capture_output=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        return (
            None,
            "playwright-core is not on NODE_PATH (npm install --prefix DIR playwright-core; NODE_PATH=DIR/node_modules)",
        )
    return (chromium, node, env), None


class DashboardBrowserTests(AdminTestCase):
    timeout = 180

    @inlineCallbacks
    def test_liveDashboard(self):
        """
        The page loads, refuses a wrong password, logs in, shows this node
        and a cluster of one, and its message counter and rate move while
        clients send 1:1 and group messages.  Nothing is fetched from
        anywhere but the node.
        """
        found, reason = findBrowser()
        if found is None:
            requireOrSkip(reason)
        chromium, node, env = found
        alice = yield self.user(self.node, "alice")
        bob = yield self.user(self.node, "bob")
        carol = yield self.user(self.node, "carol")
        yield self.befriend(self.node, alice, bob)
        gid = (yield alice.business(Business.NEWROOM, node="ops")).n
        for member in (bob, carol):
            yield member.business(Business.ADDROOM, node=gid)
        vnode = yield alice.vroomRegister()
        for member in (bob, carol):
            yield member.vroomSubscribe(vnode)
        sent = [0]

        def traffic():
            sent[0] += 1
            alice.sendMessage(bob.uid, f"hello {sent[0]}")
            if sent[0] % 2:
                alice.sendMessage(None, f"group {sent[0]}", roomTid=Tid(node=gid), msType=3)
            alice.pushStream(vnode, b"frame %d" % sent[0])
            for client in (alice, bob, carol):
                client.take()

        loop = LoopingCall(traffic)
        loop.start(0.05)
        self.addCleanup(lambda: loop.running and loop.stop())

        work = self.mktemp()
        os.makedirs(work)
        script = os.path.join(work, "dashboard.cjs")
        with open(script, "w") as f:
            f.write(SCRIPT)
        keep = os.environ.get("TIMTX_DASHBOARD_SCREENSHOT")
        screenshot = keep or os.path.join(work, "dashboard.png")
        run = _Run()
        args = [node, script, self.base, "root", ROOT_PASSWORD, os.path.join(work, "profile"), screenshot]
        args += [chromium, json.dumps(CHROMIUM_FLAGS), "60" if keep else "3"]
        transport = reactor.spawnProcess(run, node, args, env=env)
        self.addCleanup(lambda: run.ended.called or transport.signalProcess("KILL"))
        code = yield run.ended
        loop.stop()
        out, err = b"".join(run.out).decode(), b"".join(run.err).decode()
        self.assertEqual(code, 0, err + out)
        result = json.loads(out.strip().splitlines()[-1])
        self.assertEqual(result["errors"], [])
        self.assertTrue(result["loginShown"])
        self.assertIn("wrong name or password", result["wrongPassword"])
        self.assertEqual(result["nodeId"], nodeIdOf(self.node))
        self.assertIn("this node", result["members"])
        self.assertIn("alive", result["members"])
        self.assertGreaterEqual(result["lastTotal"], result["firstTotal"] + 20)
        self.assertGreater(float(result["rate"]), 0)
        self.assertEqual(result["sessions"], "3")
        self.assertEqual(result["vrooms"], "1")
        self.assertTrue(os.path.getsize(screenshot) > 10000)
