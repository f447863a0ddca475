"""
Tests that a user's installs work: C{pip install .} and C{pip install -e .}
both make the C{tim} plugin visible to twist.

Each test builds a fresh virtual environment that sees this environment's
dependencies (through symlinks, without timtx itself or its plugin file)
and installs the source checkout into it, offline.
"""

import os
import shutil
import sys
import sysconfig

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from timtx.testing import requireOrSkip, sourceRoot

_OURS = ("timtx", "__editable__", "_trial_temp")


def _isOurs(name):
    return name.startswith(_OURS) or name.endswith(".pth")


def dependencyDirectory(target):
    """
    Mirror this environment's site-packages into C{target} with symlinks,
    leaving out timtx, its metadata and its Twisted plugin file.
    """
    source = FilePath(sysconfig.get_paths()["purelib"])
    target.makedirs()
    for entry in source.children():
        name = entry.basename()
        if _isOurs(name) or name == "twisted":
            continue
        os.symlink(entry.path, target.child(name).path)
    twisted = target.child("twisted")
    twisted.makedirs()
    for entry in source.child("twisted").children():
        if entry.basename() != "plugins":
            os.symlink(entry.path, twisted.child(entry.basename()).path)
    plugins = twisted.child("plugins")
    plugins.makedirs()
    for entry in source.child("twisted").child("plugins").children():
        if entry.basename().startswith("tim_plugin") or entry.basename() in ("dropin.cache", "__pycache__"):
            continue
        os.symlink(entry.path, plugins.child(entry.basename()).path)


def canBuildWheels():
    try:
        import wheel  # noqa: F401
    except ImportError:
        pass
    else:
        return True
    try:
        from setuptools.command import bdist_wheel  # noqa: F401
    except ImportError:
        return False
    return True


CHECK = """
import timtx
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
print("timtx at", timtx.__file__)
print("plugins", sorted(p.tapname for p in getPlugins(IServiceMaker)))
import importlib.resources
print("dashboard", sorted(p.name for p in importlib.resources.files("timtx.admin").joinpath("static").iterdir()))
"""


class InstallTests(TestCase):
    timeout = 300

    def setUp(self):
        self.root = sourceRoot()
        if self.root is None:
            requireOrSkip("no source checkout to install")
        if sys.prefix == sys.base_prefix:
            requireOrSkip("needs to run inside a virtual environment")
        if not canBuildWheels():
            requireOrSkip("building offline needs setuptools>=70.1 or the wheel package in this environment")

    @inlineCallbacks
    def runCommand(self, executable, args, path=None):
        out, err, code = yield getProcessOutputAndValue(
            executable, args, env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}, path=path
        )
        text = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, f"{executable} {args}: {text}")
        return text

    @inlineCallbacks
    def installInto(self, editable):
        base = FilePath(self.mktemp()).realpath()
        base.makedirs()
        dependencyDirectory(base.child("deps"))
        venv = base.child("venv")
        yield self.runCommand(sys.executable, ["-m", "venv", "--without-pip", venv.path])
        python = venv.child("bin").child("python").path
        purelib = yield self.runCommand(python, ["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        FilePath(purelib.strip()).child("deps.pth").setContent(base.child("deps").path.encode() + b"\n")
        created = [p for p in ("build", "timtx.egg-info") if not self.root.child(p).exists()]
        self.addCleanup(lambda: [shutil.rmtree(self.root.child(p).path, ignore_errors=True) for p in created])
        args = ["-m", "pip", "--python", python, "install", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        args += ["-e", self.root.path] if editable else [self.root.path]
        yield self.runCommand(sys.executable, args)
        output = yield self.runCommand(python, ["-c", CHECK], path=base.path)
        return output, purelib.strip()

    @inlineCallbacks
    def test_install(self):
        output, purelib = yield self.installInto(editable=False)
        self.assertIn(f"timtx at {purelib}", output)
        self.assertIn("'tim'", output)
        # The dashboard's files are installed with the package (no CDN).
        self.assertIn("dashboard ['dashboard.css', 'dashboard.js', 'index.html']", output)

    @inlineCallbacks
    def test_editableInstall(self):
        output, purelib = yield self.installInto(editable=True)
        self.assertIn(f"timtx at {self.root.path}", output)
        self.assertIn("'tim'", output)


class PackageListTests(SynchronousTestCase):
    def test_everyPackageListed(self):
        """
        setup.cfg lists every package of the checkout: one left out is
        missing from an install (and everything importing it fails there).
        """
        import configparser

        root = sourceRoot()
        if root is None:
            raise SkipTest("no source checkout")
        config = configparser.ConfigParser()
        config.read(root.child("setup.cfg").path)
        listed = set(config["options"]["packages"].split())
        found = {
            ".".join(path.segmentsFrom(root)[:-1])
            for path in root.child("timtx").walk()
            if path.basename() == "__init__.py"
        }
        self.assertEqual(found - listed, set())
