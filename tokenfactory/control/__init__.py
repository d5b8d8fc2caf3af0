"""Pure policies of the factory: state in, decision out, clock passed in, no I/O.

The live runtime and the digital twin are two thin drivers around the same objects.
"""
