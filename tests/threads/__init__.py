"""Tests of stage 2: which interaction (a package: test module names repeat)."""
