"""
Tests for L{timtx.config}.
"""

import os

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from timtx import config as configModule
from timtx.config import ConfigError, load, reference_markdown
from timtx.testing import requireOrSkip, sourceRoot

HERE = FilePath(__file__).parent()


class LoadTests(SynchronousTestCase):
    def write(self, text):
        path = FilePath(self.mktemp())
        path.makedirs()
        ini = path.child("node.ini")
        ini.setContent(text.encode("utf-8"))
        return ini.path

    def test_defaults(self):
        """
        An empty file gives every default, with paths taken from the file's
        directory.
        """
        path = self.write("")
        config = load(path)
        self.assertEqual(config.client.listen, "tcp:5120:interface=127.0.0.1")
        self.assertEqual(config.devices.overflow, "kick-oldest")
        self.assertEqual(config.store_path, os.path.join(os.path.dirname(path), "timtx-data", "tim.db"))
        self.assertEqual(config.key_path, os.path.join(os.path.dirname(path), "timtx-data", "node.key"))

    def test_typedValues(self):
        path = self.write(
            "[client]\nmax_frame_bytes = 2048\nallowed_origins = https://a, https://b\n"
            "[devices]\noverflow = reject\nlimit = 0\n[accounts]\nforbid_token = yes\n"
        )
        config = load(path)
        self.assertEqual(config.client.max_frame_bytes, 2048)
        self.assertEqual(config.client.allowed_origins, ("https://a", "https://b"))
        self.assertEqual((config.devices.overflow, config.devices.limit), ("reject", 0))
        self.assertIs(config.accounts.forbid_token, True)

    def assertConfigError(self, text, *fragments):
        path = self.write(text)
        error = self.assertRaises(ConfigError, load, path)
        message = str(error)
        self.assertIn(path, message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return error

    def test_unknownSection(self):
        error = self.assertConfigError("[clients]\nlisten = tcp:1\n", "[clients]", "unknown section", "client")
        self.assertEqual(error.section, "clients")

    def test_unknownKey(self):
        error = self.assertConfigError("[client]\nlistne = tcp:1\n", "[client] listne", "unknown key", "listen")
        self.assertEqual((error.section, error.key), ("client", "listne"))

    def test_badValues(self):
        self.assertConfigError("[client]\nmax_frame_bytes = big\n", "[client] max_frame_bytes", "expected an integer")
        self.assertConfigError("[client]\nmax_frame_bytes = 1\n", "from 64 to")
        self.assertConfigError("[devices]\noverflow = kick\n", "one of kick-oldest, reject", "'kick'")
        self.assertConfigError("[accounts]\nforbid_token = maybe\n", "true or false")
        self.assertConfigError("[client]\nlisten = nonsense:1\n", "[client] listen", "endpoint")
        self.assertConfigError("[accounts]\nlogin_webhook = ftp://x\n", "http")
        self.assertConfigError("[client]\nauth_timeout = -1\n", "seconds")
        self.assertConfigError("[protocols]\nclient-ws = no.such.module:Class\n", "[protocols] client-ws")

    def test_notINI(self):
        self.assertConfigError("listen = 1\n", "not a valid INI file")

    def test_missingFile(self):
        error = self.assertRaises(ConfigError, load, "/nonexistent/node.ini")
        self.assertIn("cannot read", str(error))

    def test_example(self):
        """
        examples/node.ini is valid and listens where the README says.
        """
        root = sourceRoot()
        if root is None:
            requireOrSkip("no source checkout (examples/ is not installed)")
        config = load(root.child("examples").child("node.ini").path)
        self.assertEqual(config.client.listen, "tcp:5120:interface=127.0.0.1")
        self.assertEqual(config.client.tcp_listen, "tcp:5121:interface=127.0.0.1")
        self.assertEqual(config.store.backend, "sqlite")

    def test_docsListEveryKey(self):
        """
        docs/configuration.md holds the reference generated from the
        declarations, so no key goes undocumented.
        """
        root = sourceRoot()
        if root is None:
            requireOrSkip("no source checkout (docs/ is not installed)")
        docs = root.child("docs").child("configuration.md").getContent().decode("utf-8")
        self.assertIn(reference_markdown(), docs, "run: python -m timtx.config --write docs/configuration.md")
        for section in configModule.SECTIONS:
            self.assertIn(f"[{section}]", docs)
