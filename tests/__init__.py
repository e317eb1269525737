"""The toolkit's tests: stdlib unittest, real processes and real HTTP on 127.0.0.1."""
