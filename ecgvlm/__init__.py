"""ecgvlm: read ECGs with vision-language models, and run the research loop on Ray.

Importing the package does no I/O and starts nothing; heavy dependencies (torch, ray)
are imported only by the modules that need them.
"""

__version__ = "0.1.0"
