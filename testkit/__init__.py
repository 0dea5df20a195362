"""Test and benchmark kit: tiny and real-width model files in the published formats, built in seconds.

Imported by ``tests/`` and ``bench/`` alike (never shipped in the wheel). Everything is generated: no
downloads. Linted like the product.
"""
