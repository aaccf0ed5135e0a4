import unittest

from wordcount import top, words


class WordsTest(unittest.TestCase):
    def test_words_strip_punctuation(self):
        self.assertEqual(words("Hello, world! Hello."), ["hello", "world", "hello"])

    def test_top(self):
        self.assertEqual(top("a b a c a b", 2), [("a", 3), ("b", 2)])


if __name__ == "__main__":
    unittest.main()
