"""The .env reader against the python-dotenv behaviour table (shared/stdlib-specs.md §a)."""
from __future__ import annotations

import os
import tempfile
import unittest

from tests.support import bc

ERR = object()

# (file text, key, expected value or ERR); EXISTING=from-env is in the environment.
TABLE = [
    ("export A=x", "A", "x"),
    ("export\tA=x", "A", "x"),
    ("EXPORT A=x", "A", ERR),
    ("  A =  b  ", "A", "b"),
    ("A=b c  d", "A", "b c  d"),
    ("A=", "A", ""),
    ("A", "A", None),
    ("export A", "A", None),
    ('A=""', "A", ""),
    ("A=''", "A", ""),
    ("A=b#c", "A", "b#c"),
    ("A=b #c", "A", "b"),
    ("A=b\t#c", "A", "b"),
    ("A= #x", "A", "#x"),
    ("A=https://h/p?x=1 #frag", "A", "https://h/p?x=1"),
    ('A="b #x" # note', "A", "b #x"),
    ('A="a"#c', "A", "a"),
    ('A="q" trailing', "A", ERR),
    ("A='a' b", "A", ERR),
    ('A="a" "b"', "A", ERR),
    ('A=b"c"', "A", 'b"c"'),
    ("A=it's", "A", "it's"),
    ("A='it\\'s'", "A", "it's"),
    ("A='it's'", "A", ERR),
    ("A='a\\nb'", "A", "a\\nb"),
    ('A="a\\nb"', "A", "a\nb"),
    ('A="say \\"hi\\""', "A", 'say "hi"'),
    ('A="\\u00e9"', "A", "\\u00e9"),
    ('A="C:\\path\\new"', "A", "C:\\path\new"),
    ("A=C:\\path\\new", "A", "C:\\path\\new"),
    ("A='C:\\path\\new'", "A", "C:\\path\\new"),
    ("A=b\\ #c", "A", "b\\"),
    ('A="line1\nline2"', "A", "line1\nline2"),
    ("A=${EXISTING}", "A", "from-env"),
    ("A=$EXISTING", "A", "$EXISTING"),
    ('A="$EXISTING"', "A", "$EXISTING"),
    ("A='${EXISTING}'", "A", "from-env"),
    ("A=\\${EXISTING}", "A", "\\from-env"),
    ("A=${MISSING:-dflt}", "A", "dflt"),
    ("A=${MISSING-dflt}", "A", ""),
    ("A=${X:=z}", "A", "${X:=z}"),
    ("A=${B:-${C:-z}}", "A", "${C:-z}"),
    ("A=${ EXISTING }", "A", ""),
    ("B=${A}\nA=x", "B", ""),
    ("A=1\nA=2", "A", "2"),
    ("A==b", "A", "=b"),
    ("A=b=c", "A", "b=c"),
    ("A=1 B=2", "A", "1 B=2"),
    ("# comment\n\n  # indented comment\nA=1", "A", "1"),
    ("A=1\r\nB=2\r\n", "B", "2"),
    ("\ufeffA=1", "A", "1"),
    ("A=x\nB=${A}", "B", "x"),
    ("'any key'=v", "any key", "v"),
]


class DotenvTable(unittest.TestCase):
    def setUp(self) -> None:
        os.environ["EXISTING"] = "from-env"
        os.environ.pop("MISSING", None)
        self.addCleanup(os.environ.pop, "EXISTING", None)
        fd, self.path = tempfile.mkstemp(suffix=".env")
        os.close(fd)
        self.addCleanup(os.unlink, self.path)

    def parse(self, text: str) -> dict:
        with open(self.path, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        return bc.dotenv_values(self.path)

    def test_table(self) -> None:
        for text, key, expected in TABLE:
            with self.subTest(line=text):
                if expected is ERR:
                    with self.assertLogs("b24common", "WARNING") as logs:
                        values = self.parse(text)
                    self.assertNotIn(key, values)
                    self.assertIn("%s:1:" % self.path, logs.output[0])
                else:
                    self.assertEqual(self.parse(text).get(key, "<absent>"), expected)

    def test_unterminated_quote_recovers_on_next_line(self) -> None:
        with self.assertLogs("b24common", "WARNING") as logs:
            values = self.parse('A="unterminated\nB=2\n')
        self.assertEqual(values, {"B": "2"})
        self.assertIn(":1: unterminated double-quoted value for A", logs.output[0])

    def test_later_quote_swallows_lines_like_dotenv(self) -> None:
        values = self.parse('A="open\nB=2\nC="\nD=4\n')
        self.assertEqual(values, {"A": "open\nB=2\nC=", "D": "4"})

    def test_strict_names_file_and_line(self) -> None:
        with open(self.path, "w") as fh:
            fh.write("GOOD=1\n\n=oops\n")
        with self.assertRaises(bc.ConfigError) as ctx:
            bc.dotenv_values(self.path, strict=True)
        self.assertEqual(str(ctx.exception).split(": ")[0], "%s:3" % self.path)

    def test_load_dotenv_real_environment_wins(self) -> None:
        with open(self.path, "w") as fh:
            fh.write("EXISTING=from-file\nNEWVAR=${EXISTING}\nNOVALUE\n")
        env = {"EXISTING": "from-env"}
        self.assertTrue(bc.load_dotenv(self.path, environ=env))
        self.assertEqual(env, {"EXISTING": "from-env", "NEWVAR": "from-env"})
        env = {"EXISTING": "from-env"}
        bc.load_dotenv(self.path, environ=env, override=True)
        self.assertEqual(env["EXISTING"], "from-file")

    def test_dotenv_values_does_not_touch_environ(self) -> None:
        with open(self.path, "w") as fh:
            fh.write("B24_TEST_ONLY_IN_FILE=1\n")
        self.assertEqual(bc.dotenv_values(self.path), {"B24_TEST_ONLY_IN_FILE": "1"})
        self.assertNotIn("B24_TEST_ONLY_IN_FILE", os.environ)

    def test_missing_and_binary_files(self) -> None:
        with self.assertRaises(bc.ConfigError) as ctx:
            bc.dotenv_values(self.path + ".nope")
        self.assertIn("not found", str(ctx.exception))
        with open(self.path, "wb") as fh:
            fh.write(b"A=\xff\xfe\n")
        with self.assertRaises(bc.ConfigError) as ctx:
            bc.dotenv_values(self.path)
        self.assertIn("not UTF-8", str(ctx.exception))


if __name__ == "__main__":
    unittest.main()


class NoValueInErrors(unittest.TestCase):
    """A malformed line is named by its file, line and key -- its text never appears (it may be a secret)."""

    SECRETS = ("s3cr3t-signing-key-0123456789", "app-token-abcdef0123456789", "Token qwertyuiop1234567890")

    def test_malformed_lines_never_echo_their_values(self) -> None:
        lines = ["BOT_HTTP_SECRET='%s' trailing words" % self.SECRETS[0],
                 "B24_APP_TOKEN %s" % self.SECRETS[1],
                 'BOT_HTTP_AUTH="%s' % self.SECRETS[2],
                 "%s and more" % self.SECRETS[0]]
        for n, line in enumerate(lines, 1):
            with self.subTest(line=n), tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "x.env")
                with open(path, "w") as fh:
                    fh.write("# settings\n" + line + "\n")
                with self.assertRaises(bc.ConfigError) as caught:
                    bc.dotenv_values(path, strict=True)
                text = str(caught.exception)
                self.assertIn("x.env:2:", text)
                for secret in self.SECRETS:
                    for piece in secret.split():
                        self.assertNotIn(piece, text)
