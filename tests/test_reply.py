"""Bot-reply normalisation: every accepted shape, and clear errors for the rest."""
from __future__ import annotations

import unittest

from tests.support import bc


class NormalizeReply(unittest.TestCase):
    def test_accepted_shapes(self) -> None:
        table = [
            ({"response": "Hi"}, ["Hi"]),
            ({"reply_text": "Hello!"}, ["Hello!"]),
            ({"text": "Hello!"}, ["Hello!"]),
            ({"message": "Hello!"}, ["Hello!"]),
            ({"replies": ["Hello!", "How can I help?"]}, ["Hello!", "How can I help?"]),
            ({"messages": ["Hello!"]}, ["Hello!"]),
            ({"messages": [{"text": "a"}, {"text": "b"}]}, ["a", "b"]),
            ("bare string", ["bare string"]),
            (["one", "two"], ["one", "two"]),
            ([{"recipient_id": "x", "text": "rasa one"}, {"recipient_id": "x", "text": "rasa two"}],
             ["rasa one", "rasa two"]),
            ([{"recipient_id": "x", "image": "https://img.invalid/a.png"}], []),
            ({"replies": ["  ", "", "kept"]}, ["kept"]),
            ({"response": ""}, []),
            ({"response": None}, []),
            ([], []),
            ("   ", []),
            (None, []),
            (b"bytes body", ["bytes body"]),
        ]
        for body, expected in table:
            with self.subTest(body=body):
                self.assertEqual(bc.normalize_reply(body), expected)

    def test_rejected_shapes_name_what_came(self) -> None:
        table = [
            ({"status": "ok"}, "an object with keys {status}"),
            ({}, "an empty object"),
            (42, "got a number"),
            ({"text": 5}, "'text' is a number"),
            ([{"foo": 1}], "list item is an object with keys {foo}"),
            ([1], "list item is a number"),
        ]
        for body, needle in table:
            with self.subTest(body=body):
                with self.assertRaises(bc.ReplyShapeError) as ctx:
                    bc.normalize_reply(body)
                self.assertIn(needle, str(ctx.exception))


if __name__ == "__main__":
    unittest.main()
