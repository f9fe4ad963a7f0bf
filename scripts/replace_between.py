"""Replaces the text between two marker lines of FILE with the contents of
NEW: `python3 replace_between.py FILE START END NEW`."""
import sys

path, start, end, new = sys.argv[1:5]
text = open(path, encoding="utf-8").read()
head, rest = text.split(start + "\n", 1)
_, tail = rest.split(end, 1)
body = open(new, encoding="utf-8").read()
open(path, "w", encoding="utf-8").write(head + start + "\n" + body + end + tail)
