"""
tim's client protocol: constants, structs and codecs without I/O, and the
Twisted protocols that serve it.
"""
