# -*- test-case-name: timtx.test.test_bench -*-
"""
The benchmarks' C{--quick} mode, end to end: every scenario runs small
against a real node and loses nothing.  Timings are not asserted.

The benchmarks live in C{bench/} of a source checkout, not in the installed
package, so this test finds the checkout as L{timtx.test.test_config} does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from timtx.testing import requireOrSkip, sourceRoot

#: Scenarios that must run today, and how many runs of each C{all} makes
#: (1:1 runs once per store); the others may be skipped until the node
#: serves what they measure (groups, virtual rooms).
MUST_RUN = {"login": 1, "direct": 2, "codec": 1}

#: Seconds the whole quick run may take (about 15 on a 2-core machine).
TIMEOUT = 110


def checkout():
    root = sourceRoot()
    if root is None or not root.child("bench").child("__main__.py").exists():
        requireOrSkip("bench/ is only in a source checkout")
    return root


def requirePostgreSQL():
    """
    Skip (fail under CI) unless this machine's PostgreSQL, where the
    benchmark creates its databases, answers.
    """
    try:
        import psycopg2
    except ImportError:
        requireOrSkip("psycopg2 is not installed")
    from timtx.test.databases import POSTGRESQL_ADMIN

    try:
        psycopg2.connect(POSTGRESQL_ADMIN, connect_timeout=5).close()
    except Exception as e:
        requireOrSkip(f"PostgreSQL is not reachable with {POSTGRESQL_ADMIN!r}: {str(e).strip().splitlines()[0]}")


def runBench(testCase, root, *args):
    """
    Run C{python -m bench <args> --summary ...} from the checkout and return
    the process and the summary it wrote.
    """
    out = os.path.abspath(testCase.mktemp())
    os.makedirs(out)
    summary = os.path.join(out, "summary.json")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root.path, *filter(None, [env.get("PYTHONPATH")])])
    argv = [sys.executable, "-m", "bench", *args, "--out", out, "--summary", summary]
    # A session of its own: a run that does not end is killed with the
    # nodes and generator workers it started, not only the parent.
    running = subprocess.Popen(
        argv, cwd=root.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = running.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(running.pid, signal.SIGKILL)
        stdout, stderr = running.communicate()
        testCase.fail(f"bench {' '.join(args)} did not end in {TIMEOUT} s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    process = subprocess.CompletedProcess(argv, running.returncode, stdout, stderr)
    outcome = None
    if os.path.exists(summary):
        with open(summary, encoding="utf-8") as f:
            outcome = json.load(f)
    return process, outcome


class QuickTests(SynchronousTestCase):
    def test_everyScenarioLosesNothing(self):
        """
        C{python -m bench all --quick} runs the login storm, 1:1 with both
        stores and the codec, skips only group and vroom fan-out (while the
        node lacks them), and every scenario ends with 0 lost.
        """
        root = checkout()
        process, outcome = runBench(self, root, "all", "--quick")
        self.assertIsNotNone(outcome, process.stderr[-3000:])
        for scenario, runs in MUST_RUN.items():
            entries = [entry for entry in outcome if entry["scenario"] == scenario]
            self.assertEqual(len(entries), runs, scenario)
            for entry in entries:
                self.assertEqual(entry["status"], "ok", f"{entry['variant']}: {entry['reason']}")
        for entry in outcome:
            self.assertIn(entry["status"], ("ok", "skipped"), f"{entry['variant']}: {entry['reason']}")
            self.assertEqual(entry["lost"], 0, f"{entry['variant']} lost messages")
            if entry["status"] == "ok":
                with open(entry["files"]["json"], encoding="utf-8") as f:
                    record = json.load(f)
                self.assertIn("cpu", record["conditions"])
                self.assertTrue(os.path.exists(entry["files"]["md"]))
        self.assertEqual(process.returncode, 0, process.stderr[-3000:])

    def test_soak(self):
        """
        C{python -m bench soak --quick}: rounds of mixed 1:1, group and
        room traffic with every client connecting and disconnecting lose
        nothing, show no duplicates and leak no descriptors; resident memory
        after warm-up is reported (the 5% goal is judged on the long run of
        docs/benchmarks.md).
        """
        root = checkout()
        process, outcome = runBench(self, root, "soak", "--quick")
        self.assertIsNotNone(outcome, process.stderr[-3000:])
        [entry] = outcome
        self.assertEqual(entry["status"], "ok", f"{entry['reason']}\n{process.stderr[-3000:]}")
        with open(entry["files"]["json"], encoding="utf-8") as f:
            metrics = json.load(f)["metrics"]
        self.assertGreaterEqual(metrics["rounds"], 3)
        self.assertEqual((metrics["lost"], metrics["duplicates"]), (0, 0))
        self.assertLessEqual(metrics["open_files_last"], metrics["open_files_first"])

    def test_fanOutAgainstStandIn(self):
        """
        The group and vroom fan-out scenarios, run against
        C{bench/standin.py} (a toy that serves groups and vrooms as tim
        documents them), deliver every message to every member in both
        encodings: the generator's side of c) and d) works before the node
        serves them.
        """
        root = checkout()
        for scenario in ("group", "vroom"):
            process, outcome = runBench(self, root, scenario, "--quick", "--standin", "1")
            self.assertIsNotNone(outcome, process.stderr[-3000:])
            [entry] = outcome
            self.assertEqual(entry["status"], "ok", f"{scenario}: {entry['reason']}\n{process.stderr[-3000:]}")
            self.assertEqual(entry["lost"], 0)
            with open(entry["files"]["json"], encoding="utf-8") as f:
                record = json.load(f)
            self.assertGreater(record["metrics"]["received"], 0)
            self.assertEqual(record["metrics"]["duplicates"], 0)

    def test_directAcrossNodes(self):
        """
        C{python -m bench direct --quick --store postgresql --nodes 2}
        starts two nodes forming one cluster on one PostgreSQL database,
        logs the two users of every pair in to different nodes, and every
        message crosses the mesh and arrives: 0 lost, no duplicates, CPU
        counted over both nodes.
        """
        root = checkout()
        requirePostgreSQL()
        process, outcome = runBench(self, root, "direct", "--quick", "--store", "postgresql", "--nodes", "2")
        self.assertIsNotNone(outcome, process.stderr[-3000:])
        [entry] = outcome
        self.assertEqual(entry["status"], "ok", f"{entry['reason']}\n{process.stderr[-3000:]}")
        self.assertEqual(entry["variant"], "direct-postgresql-mixed-2nodes")
        self.assertEqual(entry["lost"], 0)
        with open(entry["files"]["json"], encoding="utf-8") as f:
            record = json.load(f)
        self.assertGreater(record["metrics"]["received"], 0)
        self.assertEqual(record["metrics"]["duplicates"], 0)
        self.assertIn("mesh_seconds", record)
        self.assertEqual(len(record["other_node_exits"]), 1)
        self.assertEqual(process.returncode, 0, process.stderr[-3000:])

    def test_vroomAcrossNodes(self):
        """
        C{python -m bench vroom --quick --store postgresql --nodes 3}
        spreads the subscribers over three nodes of one cluster; every
        frame reaches every subscriber: 0 lost, no duplicates.
        """
        root = checkout()
        requirePostgreSQL()
        process, outcome = runBench(self, root, "vroom", "--quick", "--store", "postgresql", "--nodes", "3")
        self.assertIsNotNone(outcome, process.stderr[-3000:])
        [entry] = outcome
        self.assertEqual(entry["status"], "ok", f"{entry['reason']}\n{process.stderr[-3000:]}")
        self.assertEqual(entry["variant"], "vroom-20-postgresql-3nodes")
        self.assertEqual(entry["lost"], 0)
        with open(entry["files"]["json"], encoding="utf-8") as f:
            record = json.load(f)
        self.assertEqual(record["metrics"]["duplicates"], 0)
        self.assertEqual(len(record["other_node_exits"]), 2)

    def test_groupAcrossProcesses(self):
        """
        C{python -m bench group --quick --store postgresql --processes 3}
        runs one node host of three processes behind one client port: every
        member gets every message, whichever process accepted it; the
        report says how many sessions each process holds (all the members)
        and how many peer bytes each group message cost.
        """
        root = checkout()
        requirePostgreSQL()
        process, outcome = runBench(self, root, "group", "--quick", "--store", "postgresql", "--processes", "3")
        self.assertIsNotNone(outcome, process.stderr[-3000:])
        [entry] = outcome
        self.assertEqual(entry["status"], "ok", f"{entry['reason']}\n{process.stderr[-3000:]}")
        self.assertEqual(entry["variant"], "group-20-postgresql-3processes")
        self.assertEqual(entry["lost"], 0)
        with open(entry["files"]["json"], encoding="utf-8") as f:
            metrics = json.load(f)["metrics"]
        self.assertGreater(metrics["received"], 0)
        self.assertEqual(metrics["duplicates"], 0)
        processes = metrics["per_process"]
        self.assertEqual(sorted(processes), ["node/p1", "node/p2", "node/p3"])
        self.assertEqual(sum(p["sessions"] for p in processes.values()), 20)
        self.assertEqual(sum(p["group_deliveries"] for p in processes.values()), metrics["received"])
        self.assertGreater(metrics["peer_bytes_per_message_per_node"], 0)
        self.assertEqual(process.returncode, 0, process.stderr[-3000:])
