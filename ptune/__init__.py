"""ptune: P-Tuning v2 for decoder-only language models."""

import sys

# `python -m ptune.<command>` imports this package before the command's module, whose imports (torch,
# transformers) take seconds: a Ctrl-C in them should end with one line like a Ctrl-C later does, not a
# traceback through importlib. sys.argv[0] is "-m" only while Python is still locating that module.
if sys.argv[:1] == ["-m"]:
    from ptune.errors import end_quietly_if_interrupted_while_starting

    end_quietly_if_interrupted_while_starting()
