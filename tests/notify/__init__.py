"""Tests of stage 4: what we tell the customer (a package: test module names repeat)."""
