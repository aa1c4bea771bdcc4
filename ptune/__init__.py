"""ptune: P-Tuning v2 for decoder-only language models."""

import sys

# `python -m ptune.<command>` imports this package before the command's module, whose imports (torch,
# transformers) take seconds: a Ctrl-C in them should end with one line like a Ctrl-C later does, not a
# traceback through importlib. sys.argv[0] is "-m" only while Python is still locating that module.
if sys.argv[:1] == ["-m"]:
    import atexit
    import gc

    from ptune.errors import end_quietly_if_interrupted_while_starting

    end_quietly_if_interrupted_while_starting()
    # At exit the interpreter runs several full garbage collections over the ~400k objects torch and
    # transformers leave (about 0.3 s each on a slow core); frozen objects are skipped. The files a command
    # writes are closed or flushed by then, and the memory goes back to the system with the process.
    atexit.register(gc.freeze)
