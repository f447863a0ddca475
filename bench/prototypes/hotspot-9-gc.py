# Hot spot 9 as it was prototyped: a sitecustomize.py on the node's
# PYTHONPATH (the node only, told apart by its command line).  The proposal
# is to do this in timtx itself once the node is ready, plus gc.freeze().
import gc

if b"twisted" in open("/proc/self/cmdline", "rb").read():
    gc.set_threshold(100_000, 50, 1000)
