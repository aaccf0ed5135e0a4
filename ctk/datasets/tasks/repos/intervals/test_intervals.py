import unittest

from intervals import merge


class MergeTest(unittest.TestCase):
    def test_overlapping(self):
        self.assertEqual(merge([(1, 3), (2, 5), (7, 8)]), [(1, 5), (7, 8)])

    def test_touching_intervals_merge(self):
        self.assertEqual(merge([(1, 2), (2, 4)]), [(1, 4)])


if __name__ == "__main__":
    unittest.main()
