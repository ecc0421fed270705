"""MergePipe: LLM merging treated as data management.

Stages, in the order data flows: ``catalog`` (what exists), ``planner`` (what
to read and how to combine it), ``engine`` (streaming, transactional
execution), ``search`` (AP-BMM on top). ``mergepipe.api`` is the library façade.
"""
__version__ = "0.1.0"
